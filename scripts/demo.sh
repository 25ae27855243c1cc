#!/usr/bin/env bash
# Sets up .venv (first run only) and runs the main job: train, evaluate and report on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/unillava demo "$@"
