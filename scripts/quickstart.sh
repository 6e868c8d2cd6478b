#!/usr/bin/env bash
# Install kvclip, build a cache, evaluate it, serve it and classify a test image over HTTP.
#   bash scripts/quickstart.sh [DATA_DIR [TEST_DIR]]
# KVCLIP_MODEL picks the model (default ViT-B-32:openai, fetched from the hub; offline:
# ARCH:/path/to/checkpoint, or tiny-random for plumbing only). Without DATA_DIR, a
# Fashion-MNIST demo (16 shots per class, 1000 test images) is exported first.
# KVCLIP_CACHE_NAME names the cache (default: from DATA_DIR, e.g. pets for pets/train).
set -euo pipefail
usage="usage: bash scripts/quickstart.sh [DATA_DIR [TEST_DIR]]"
[ $# -le 2 ] || { echo "$usage" >&2; exit 2; }
# Folders are the caller's: check and resolve them before moving to the repository.
absolute() { (cd "$1" && pwd); }
DATA=${1:-}; TEST=${2:-}
for dir in "$DATA" "$TEST"; do
  [ -z "$dir" ] || [ -d "$dir" ] || { echo "quickstart: $dir is not a folder. $usage" >&2; exit 2; }
done
[ -z "$DATA" ] || DATA=$(absolute "$DATA")
[ -z "$TEST" ] || TEST=$(absolute "$TEST")
cd "$(dirname "$0")/.."
MODEL=${KVCLIP_MODEL:-ViT-B-32:openai}
OUT=${KVCLIP_OUT:-caches}
if [ -n "$DATA" ]; then
  # A cache name from the folder: pets/train -> pets; characters a name cannot hold become '-'.
  base=$(basename "$DATA")
  case "$base" in train|training|support|images) base=$(basename "$(dirname "$DATA")") ;; esac
  NAME=${KVCLIP_CACHE_NAME:-$(printf '%s' "$base" | tr -c 'A-Za-z0-9._-' '-' | sed -E 's/^[^A-Za-z0-9]+//' | cut -c1-128)}
  NAME=${NAME:-mine}
else
  NAME=${KVCLIP_CACHE_NAME:-demo}
fi
echo "== installing kvclip and its dependencies (torch, open_clip, faiss) into .venv; the first run takes a few minutes"
bash scripts/install.sh
if [ -z "$DATA" ]; then
  echo "== exporting the Fashion-MNIST demo (16 images per class, 1000 test images)"
  bash scripts/fetch_test_data.sh
  DATA=demo-data/fashion-mnist/train; TEST=demo-data/fashion-mnist/test
  [ -d "$DATA" ] || .venv/bin/kvclip export-dataset fashion-mnist --out "$DATA" --per-class 16
  [ -d "$TEST" ] || .venv/bin/kvclip export-dataset fashion-mnist --out "$TEST" --split test --limit 1000
fi
# Sidecar captions only when every image has one; otherwise image keys only.
CAPTIONER=none
if [ -z "$(find "$DATA" -type f \( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.png' \) | while read -r f; do [ -f "${f%.*}.txt" ] || echo missing; done | head -1)" ]; then
  CAPTIONER=sidecar
fi
echo "== building cache '$NAME' from $DATA with $MODEL"
.venv/bin/kvclip build "$DATA" --out "$OUT/$NAME" --model "$MODEL" --shots 16 --captioner "$CAPTIONER"
[ -z "$TEST" ] || echo "== evaluating on $TEST"
[ -z "$TEST" ] || .venv/bin/kvclip eval --cache "$OUT/$NAME" --data "$TEST"
# Serve the cache for a moment and classify one test image over HTTP.
if [ -n "$TEST" ] && [ "${KVCLIP_SKIP_SERVE:-0}" != 1 ]; then
  PORT=${KVCLIP_PORT:-$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
  echo "== serving $OUT on 127.0.0.1:$PORT"
  .venv/bin/kvclip serve --caches "$OUT" --model "$MODEL" --port "$PORT" --log-level WARNING &
  SERVER=$!
  trap 'kill $SERVER 2>/dev/null || true' EXIT
  for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break
    kill -0 $SERVER 2>/dev/null || { echo "quickstart: the server exited" >&2; exit 1; }
    sleep 1
  done
  IMAGE=$(find "$TEST" -type f \( -iname '*.png' -o -iname '*.jpg' \) | sort | head -1)
  echo "POST /v1/classify  $IMAGE  (true label: $(basename "$(dirname "$IMAGE")"))"
  curl -sf -F "file=@$IMAGE" "http://127.0.0.1:$PORT/v1/classify?cache=$NAME&top_k=3" | .venv/bin/python -m json.tool
  kill $SERVER; wait $SERVER 2>/dev/null || true
  trap - EXIT
  echo "serve it yourself: .venv/bin/kvclip serve --caches $OUT --model $MODEL --port 8000"
fi
