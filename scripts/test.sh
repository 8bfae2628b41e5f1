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
# One persistent compilation cache for the run, fresh unless given: the same model compiled by
# several train.py processes and test workers compiles once (the train and distributed tests
# took 226 s instead of 283 s with a cold cache, on the 2-core machine).
if [ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]; then
    JAX_COMPILATION_CACHE_DIR="$(mktemp -d)"
    trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
fi
export JAX_COMPILATION_CACHE_DIR
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}"
case "${1:-}" in
--newest)
    shift
    bash scripts/setup.sh --newest
    .venv-newest/bin/python -m pytest -n auto -m fast "$@"
    lowering=tests/test_triton.py::test
    .venv-newest/bin/python -m pytest -n auto ${lowering}_attention_kernels_compile_for_sm90 \
        ${lowering}_chunked_kernels_compile_for_sm90 ${lowering}_gpu_lowering_through_jax_triton "$@"
    exit
    ;;
--fast)
    shift
    set -- -m fast "$@"
    ;;
esac
bash scripts/setup.sh
.venv/bin/ruff format --check .
.venv/bin/ruff check .
.venv/bin/python -m pytest -n auto "$@"
