#!/usr/bin/env bash
# Create .venv with Python 3.12 (jax 0.11 and jax-triton 0.4 need it) and install the project
# with its test extras. Safe to run again: it only installs what is missing.
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

if [ ! -x .venv/bin/python ] || ! is_312 .venv/bin/python; then
    rm -rf .venv
    "$(find_python)" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
