#!/usr/bin/env bash
# Sets up .venv (first run only), runs the whole test suite (arguments go to pytest), then checks lint and
# formatting with ruff (installed by setup.sh through the dev extra). Fails if any of the three fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
status=0
.venv/bin/python -m pytest -q "$@" || status=$?
.venv/bin/ruff check src tests benchmarks || status=1
.venv/bin/ruff format --check src tests benchmarks || status=1
exit "$status"
