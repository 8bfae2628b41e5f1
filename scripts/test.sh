#!/usr/bin/env bash
# Set up (scripts/setup.sh), check formatting and lint with ruff (configured in pyproject.toml),
# and run the tests on every core. Extra arguments go to pytest.
#
#   bash scripts/test.sh            # the whole suite (CI runs it)
#   bash scripts/test.sh --fast     # the tests marked fast: one of each kind, about a minute
#   bash scripts/test.sh --newest   # the fast tier, then every sm_90 compile and jax-triton
#                                   # lowering, with the newest jax, jax-triton and triton (CI too)
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
--newest)
    shift
    bash scripts/setup.sh --newest
    .venv-newest/bin/python -m pytest -n auto -m fast "$@"
    lowering=tests/test_triton.py::test
    exec .venv-newest/bin/python -m pytest -n auto ${lowering}_attention_kernels_compile_for_sm90 \
        ${lowering}_chunked_kernels_compile_for_sm90 ${lowering}_gpu_lowering_through_jax_triton "$@"
    ;;
--fast)
    shift
    set -- -m fast "$@"
    ;;
esac
bash scripts/setup.sh
.venv/bin/ruff format --check .
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -n auto "$@"
