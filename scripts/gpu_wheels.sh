#!/usr/bin/env bash
# The pure-Python wheels the GPU machine lacks (docs/gpu.md), downloaded into .whl/ of this
# checkout for a device run to carry: jax-triton, beartype and the authors' retention kernels,
# plus any NAME==VERSION given. .whl/ is recorded in .git/info/exclude, so git ignores it.
#   bash scripts/gpu_wheels.sh [NAME==VERSION ...]     (scripts/gpu_checks.sh wheels calls it)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
mkdir -p .git/info .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
# The machine's Python and platform, whatever this one's are.
target=(--only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# One package a call, without dependencies: pip refuses two versions of a name in one call, and
# the machine has the rest.
for spec in jax-triton==0.4.1 beartype==0.23.1 retention==1.0.7 "$@"; do
    python3 -m pip download -q --no-deps "${target[@]}" -d .whl "$spec" 2>&1 | grep -v '^WARNING' || true
done
du -sh .whl
