#!/usr/bin/env bash
# Create .venv with Python 3.12 (jax 0.11 and jax-triton 0.4 need it) and install the project
# with its test extras under constraints.txt, the exact tested set. Safe to run again: it only
# installs what is missing.
#
#   bash scripts/setup.sh            # .venv, the tested set
#   bash scripts/setup.sh --newest   # .venv-newest: the newest releases pyproject.toml's ranges
#                                    # admit (jax 0.12 today), for scripts/test.sh --newest
set -euo pipefail
cd "$(dirname "$0")/.."

is_312() { "$@" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; }

find_python() {
    if command -v pyenv >/dev/null; then
        for version in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.|$)' | sort -V -r); do
            candidate="$(pyenv root)/versions/$version/bin/python3.12"
            is_312 "$candidate" && { echo "$candidate"; return; }
        done
    fi
    for candidate in python3.12 python3; do
        is_312 "$candidate" && { command -v "$candidate"; return; }
    done
    echo "sympow needs Python 3.12 (found none: install it, e.g. with pyenv)" >&2
    exit 1
}

venv=.venv
[ "${1:-}" = --newest ] && venv=.venv-newest
if [ ! -x $venv/bin/python ] || ! is_312 $venv/bin/python; then
    rm -rf $venv
    "$(find_python)" -m venv $venv
fi
pip="$venv/bin/python -m pip install -q --disable-pip-version-check"
if [ $venv = .venv-newest ]; then
    $pip --upgrade --upgrade-strategy eager -e ".[test]"
    $venv/bin/python -c "import jax, jax_triton, triton; print('newest: jax', jax.__version__, 'jax-triton', jax_triton.__version__, 'triton', triton.__version__)"
    exit 0
fi
$pip -e ".[test]" -c constraints.txt

# The lent GPU machine has triton 3.6.0 (docs/gpu.md) where users get 3.7: tests/test_triton.py
# compiles and lowers every kernel with it too, from this folder put ahead of the venv's triton.
LENT_GPU_TRITON=.venv/triton-3.6.0
if [ ! -f "$LENT_GPU_TRITON/triton/__init__.py" ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --target "$LENT_GPU_TRITON" triton==3.6.0
fi
