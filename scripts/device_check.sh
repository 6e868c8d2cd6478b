#!/usr/bin/env bash
# The GPU checks as one command, for a GPU host that has torch but not this project's serving
# stack and no internet (docs/server.md, "The GPU path": measure it there). Prepare here:
#
#   bash scripts/fetch_test_data.sh && bash scripts/fetch_device_wheels.sh
#
# then run it there with .whl and .cache/test-data carried along with the working tree:
#
#   bash scripts/device_check.sh        # logs and tables into $OUT (default /tmp/kvclip-device)
#
# 1. installs the wheels (--target /tmp/site, on PYTHONPATH) and kvclip itself (editable);
# 2. the tests with a CUDA path (tests/integration/test_cuda_serving.py among them: a CUDA
#    server scores as the CPU one), skips listed;
# 3. scripts/bench_server.py on cuda, ViT-B-32 fp16 with random weights: the raw batched
#    encoder A (decode included) against kvclip end to end over HTTP, small JPEGs, then
#    4000x3000 photos. Clients in several processes, several JPEGs per request: one Python
#    event loop cannot send thousands of images a second. Each step's output is kept as it
#    comes, so a run stopped at its time limit still returns what it measured.
# Knobs (environment): CONCURRENCY (16,64), PER_REQUEST (8), CLIENT_PROCESSES (8), ROUNDS (3),
# SECONDS_EACH (8), KVCLIP_ARGS (server flags for that many images in flight), STEPS (tests,small,photo),
# DEVICE (cuda; cpu runs the same steps here, as a smoke test of the script), WHEELS (.whl).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kvclip-device}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
STEPS=${STEPS:-tests,small,photo}

WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    || { echo "device_check: installing $WHEELS/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# Editable: the repository's folders map onto kvclip.* (pyproject.toml), which only an install sees.
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | grep -v "^WARNING" \
  || true
"$PY" -c "import kvclip.service.app" || { echo "device_check: kvclip does not import" >&2; exit 1; }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'cuda', torch.cuda.is_available(), 'cores', __import__('os').cpu_count())"
} | tee "$OUT/gpu.txt"

status=0
if [[ ,$STEPS, == *,tests,* ]]; then
  "$PY" -m pytest -q -p no:cacheprovider -rs \
    tests/unit/test_device_decode.py tests/unit/test_device_pixels.py tests/unit/test_models.py \
    tests/unit/test_search_path.py tests/unit/test_blend_fp16.py tests/integration/test_cuda_serving.py \
    2>&1 | tee "$OUT/tests.log"
  status=${PIPESTATUS[0]}
fi

KVCLIP_ARGS=${KVCLIP_ARGS:---max-batch 256 --max-queue 4096 --max-decode-backlog 2048 --max-images 64 --decode-workers 8}
BENCH=(--device "${DEVICE:-cuda}" --systems A,kvclip --concurrency "${CONCURRENCY:-16,64}" --images-per-request "${PER_REQUEST:-8}"
       --client-processes "${CLIENT_PROCESSES:-8}" --rounds "${ROUNDS:-3}" --seconds "${SECONDS_EACH:-8}"
       --kvclip-args "$KVCLIP_ARGS")
for images in small photo; do
  if [[ ,$STEPS, == *,$images,* ]]; then
    "$PY" scripts/bench_server.py "${BENCH[@]}" --images "$images" 2>&1 | tee "$OUT/bench-$images.txt"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
  fi
done
exit "$status"
