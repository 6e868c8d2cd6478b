#!/usr/bin/env bash
# The wheels a GPU host without internet needs beside its own PyTorch, into .whl/ (git-ignored):
# the serving stack this project's venv runs, at the versions it runs, for CPython 3.12 on
# manylinux x86-64. scripts/device_check.sh installs them there (--target /tmp/site, no
# dependencies resolved: this list names each one). Run here, where PyPI is reachable:
#
#   bash scripts/fetch_device_wheels.sh          # then carry .whl and .cache/test-data
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${PY_VERSION:-3.12}
# What the GPU image lacks, or may hold too old a version of (typing_extensions, anyio, timm;
# fastapi imports opentelemetry-api). Its torch, torchvision, numpy, pillow, httpx, huggingface_hub,
# safetensors, regex, tqdm, prometheus-client, uvloop, jinja2, pytest, pytest-timeout and
# pytest-xdist are used as they are (huggingface_hub stays the image's: its transformers needs it);
# setuptools is carried for the editable install, whatever version the image has.
NAMES=(open_clip_torch ftfy wcwidth faiss-cpu fastapi starlette pydantic pydantic_core annotated-types
       annotated-doc typing-inspection typing_extensions anyio opentelemetry-api uvicorn httptools python-multipart
       swagger-ui-bundle timm setuptools)
version_of() {  # the version installed in this project's venv
  .venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"
}
mkdir -p .whl
for name in "${NAMES[@]}"; do
  spec="$name==$(version_of "$name")"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec" 2>&1 \
    | { grep -v "^WARNING: Location" || true; }  # pip's note on this machine's unused local indexes
done
du -sh .whl
