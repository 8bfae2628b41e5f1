#!/usr/bin/env bash
# The paper's two findings, in kind, on a CPU: train the four variants at context 256 on the
# embedded corpus, then evaluate each at 8x that context. Results: runs/context256/eval/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
steps=${STEPS:-300}
for attention in softmax sympow sympow_gated conformal; do
    .venv/bin/python train.py --attention "$attention" --context 256 --steps "$steps" --out "runs/context256/$attention"
done
.venv/bin/python eval.py runs/context256/{softmax,sympow,sympow_gated,conformal} --context 2048 --windows 96 --batch-size 4 --out runs/context256/eval
