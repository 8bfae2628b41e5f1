#!/usr/bin/env bash
# The GPU check of the Triton kernels, for the lent GPU machine (docs/gpu.md): one
# command within a 15-minute loan, tools/gpu_check.py: no new case starts after 6 minutes ($MINUTES),
# so with the case running then it ends within about 7, and a second run still fits the loan.
#
#   bash scripts/gpu_checks.sh wheels     # here, first: the wheels that machine lacks, into .whl/
#   bash scripts/gpu_checks.sh            # there, carrying .whl: versions, a launch of each kernel
#                                         # family, the bf16 rule, T = 64K/16K/4K against the pure-JAX
#                                         # form, cuDNN and the authors' retention kernels, p = 4 at
#                                         # 16K, tuning with the time left; results in $OUT (or runs/gpu)
#   bash scripts/gpu_checks.sh --dry-run  # here: the same stages at toy sizes in the interpreter
#                                         # (the test suite runs it)
#
# Longer, one stage per call (each fits the 10-minute limit of a command), for a longer loan:
#   bash scripts/gpu_checks.sh tests|bench|tune|train
# `train` also needs the embedded corpus built into the repository (17 MB), then carried:
#   SYMPOW_CACHE=$PWD/.cache .venv/bin/python -c "from sympow.data import resolve; resolve('embedded')"
set -uo pipefail
cd "$(dirname "$0")/.."

# What the GPU machine lacks (docs/gpu.md) that the benchmark (tqdm, matplotlib) and train.py
# (tiktoken, zarr) import, with their own dependencies; gpu_wheels.sh adds jax-triton, beartype
# and the authors' retention kernels.
MISSING_ON_GPU_MACHINE="tqdm matplotlib contourpy cycler fonttools kiwisolver pillow pyparsing python-dateutil
    tiktoken regex requests urllib3 idna charset-normalizer certifi zarr numcodecs donfig pyyaml google-crc32c msgspec"
if [ "${1:-}" = wheels ]; then
    pins=$(for name in $MISSING_ON_GPU_MACHINE; do .venv/bin/pip freeze | grep -i "^${name}=="; done)
    bash scripts/gpu_wheels.sh $pins || exit 1
    # A device run carries the working tree and the named paths, 64 MiB in all.
    tree=$(git ls-files -z | du -cm --files0-from=- | tail -1 | cut -f1)
    carried=$(du -scm .whl $( [ -d .cache ] && echo .cache ) | tail -1 | cut -f1)
    echo "to carry: ${carried} MiB (.whl$( [ -d .cache ] && echo ' and .cache')) + ${tree} MiB of tracked files, of 64 MiB"
    [ $((carried + tree)) -le 64 ] || { echo "more than the 64 MiB a device run may carry" >&2; exit 1; }
    exit 0
fi
out=${OUT:-runs/gpu}
mkdir -p "$out"
if [ "${1:-}" = --dry-run ]; then
    exec .venv/bin/python -m tools.gpu_check --dry-run --minutes "${MINUTES:-6}" --out "$out"
fi
python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl
export PYTHONPATH=$PWD:$PWD/.site SYMPOW_CACHE=$PWD/.cache
python3 -c "import jax, triton; print('jax', jax.__version__, jax.devices(), 'triton', triton.__version__)"

case "${1:-check}" in
check)
    # JAX must leave GPU memory for torch (the retention kernels) beside it.
    XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -m tools.gpu_check --minutes "${MINUTES:-6}" --out "$out"
    ;;
tests)
    # The interpreter tests are not run here: triton 3.6's interpreter fails with this machine's
    # numpy 2.5 (docs/gpu.md). CI compiles and lowers every kernel with triton 3.6.
    python3 -m pytest -q -p no:cacheprovider tests/test_triton_gpu.py 2>&1 | tee "$out/test_triton_gpu.txt"
    ;;
bench)
    # Longest first, so that the 65,536-token targets are measured whatever --max-minutes cuts;
    # the kernels take seq at run time, so each chunk size compiles once for all lengths.
    python3 -m tools.benchmark --seqs 65536 32768 16384 8192 4096 2048 1024 --chunk-sizes 128 256 512 1024 --max-minutes 6 \
        --out "$out/p2.json" | tee "$out/p2.txt"
    python3 -m tools.benchmark --p 4 --impls softmax triton attention --seqs 16384 8192 4096 2048 1024 --max-minutes 1.5 \
        --out "$out/p4.json" | tee "$out/p4.txt"
    ;;
tune)
    # The flash-style kernels' sweep is short (a few seconds a setting at 16K tokens); it goes second.
    python3 -m tools.tune --max-minutes 6 --out "$out/tune.json" | tee "$out/tune.txt"
    python3 -m tools.tune --kernels attention --max-minutes 2 --out "$out/tune_attention.json" | tee "$out/tune_attention.txt"
    ;;
train)
    for attention in softmax conformal; do
        python3 train.py --preset 124m --attention "$attention" --context 16384 --steps 6 --tokens-per-update 65536 \
            --micro-batch 1 --log-every 1 --checkpoint-every 1000 --out "$out/train_$attention" | tail -3
    done
    python3 - "$out" <<'EOF'
import json, statistics, sys
from pathlib import Path
print("| attention | tokens/s (median of steps 3..6) |\n|---|---|")
for attention in ("softmax", "conformal"):
    rows = [json.loads(line) for line in (Path(sys.argv[1]) / f"train_{attention}" / "metrics.jsonl").read_text().splitlines()]
    print(f"| {attention} | {statistics.median(r['tokens_per_second'] for r in rows[2:]):.0f} |")
EOF
    ;;
*)
    echo "usage: bash scripts/gpu_checks.sh [wheels|--dry-run|tests|bench|tune|train]" >&2
    exit 2
    ;;
esac
