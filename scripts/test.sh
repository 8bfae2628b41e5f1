#!/usr/bin/env bash
# Set up (scripts/setup.sh), check formatting and lint with ruff (configured in pyproject.toml),
# and run the whole test suite on every core. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff format --check .
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -n auto "$@"
