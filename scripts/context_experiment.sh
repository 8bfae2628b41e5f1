#!/usr/bin/env bash
# The paper's two findings, in kind, on a CPU: train the four variants at context 256 on the
# embedded corpus, then evaluate each at 8x that context. Results: runs/context256/eval/
# (SEED=1: runs/context256-seed1/eval/; the seed sets the initialisation, the data order is fixed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
steps=${STEPS:-300}
seed=${SEED:-0}
runs=runs/context256$([ "$seed" = 0 ] || echo "-seed$seed")
for attention in softmax sympow sympow_gated conformal; do
    .venv/bin/python train.py --attention "$attention" --context 256 --steps "$steps" --seed "$seed" --out "$runs/$attention"
done
.venv/bin/python eval.py "$runs"/{softmax,sympow,sympow_gated,conformal} --context 2048 --windows 96 --batch-size 4 --out "$runs/eval"
