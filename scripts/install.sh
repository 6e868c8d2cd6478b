#!/usr/bin/env bash
# Create .venv and install kvclip with the server (builder + server) and test extras. Safe to run again.
# torch/torchvision are pinned to the releases these machines carry on disk; elsewhere pip
# downloads them (override with TORCH_SPEC="torch==X torchvision==Y").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC2086
.venv/bin/pip install -q $TORCH_SPEC 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/pip install -q -e '.[server,test]' 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, torchvision, open_clip, faiss, kvclip" \
  || { echo "install.sh: the environment does not import; see pip's output above" >&2; exit 1; }
