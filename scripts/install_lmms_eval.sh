#!/usr/bin/env bash
# Installs lmms-eval (for `lmms-eval --model unillava` and tests/test_lmms_eval.py) into an environment that
# already has unillava and its torch, without touching that torch.
#
# `pip install lmms-eval` would pull a CUDA torch and torchvision (and ~50 other packages), so lmms-eval goes
# in with --no-deps, after only the modules it imports on the paths unillava uses (its CLI, registry, task
# loading from local files, generate_until and loglikelihood, the results table). filelock stays below 4:
# lmms-eval 0.7.3 imports filelock._api, which filelock 4 removed. The installed torch is held as a
# constraint, so a resolver that wanted another one fails here instead of replacing it.
#
# Usage: bash scripts/install_lmms_eval.sh [PYTHON]   (default: .venv/bin/python beside this repository)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
LMMS_EVAL_VERSION=${LMMS_EVAL_VERSION:-0.7.3}

torch_version=$("$PY" -c "import importlib.metadata as m; print(m.version('torch'))")
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" >"$constraints"

"$PY" -m pip install -q -c "$constraints" \
    "datasets==5.2.0" "evaluate==0.4.6" "sacrebleu==2.6.0" "loguru==0.7.3" "pytz==2026.6" \
    "tenacity==9.2.1" "pytablewriter==1.2.1" "filelock==3.32.7"
"$PY" -m pip install -q --no-deps "lmms-eval==$LMMS_EVAL_VERSION"
"$PY" -c "import importlib.metadata as m, lmms_eval.evaluator, lmms_eval.models, lmms_eval.tasks, pytablewriter
print('lmms-eval', m.version('lmms-eval'), 'installed beside torch', m.version('torch'))"
