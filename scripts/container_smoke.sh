#!/usr/bin/env bash
# Build the CPU image from ./Dockerfile with podman and smoke-test it end to end:
#   1. a cache is built on the host (.venv/bin/kvclip build, tiny-random model, Fashion-MNIST)
#      into a folder that is mounted as the container's /caches volume;
#   2. the image is built and run by the shared recipe container-smoke.sh (podman + runc, a
#      debootstrap'ed Debian base tagged python:3.11-slim; no registry, no Docker engine);
#   3. with the server up: /healthz, /readyz, HEALTHCHECK, a real image classified over HTTP,
#      kvclip_http_requests_total in /metrics, and a build job run as `IMAGE build ...` against
#      the same volume, which the server then picks up (KVCLIP_RELOAD_INTERVAL_S=1).
#
#   bash scripts/container_smoke.sh          (as root; minutes and several GB the first time)
#
# Env: CONTAINER_RECIPE  path of container-smoke.sh (default: ../shared/tools/ beside the repo)
#      WHEELHOUSE_SPEC   torch wheels put in .wheels/ for the build (default: the releases this
#                        machine has on disk, "torch==2.14.1 torchvision==0.29.1"); the image
#                        build itself reaches only PyPI and Debian, not download.pytorch.org
#      KEEP_IMAGE=1      keep localhost/kvclip:smoke afterwards; HOST_PORT (18080)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

if [ "${1:-}" = --check ]; then
  # Run by the recipe as CHECK_CMD once /healthz answered; URL, TAG, SMOKE_* come from the env.
  say() { printf '[smoke %4ss] %s\n' "$SECONDS" "$*"; }
  for _ in $(seq 60); do curl -fsS -m 2 "$URL/readyz" >/dev/null && break; sleep 1; done
  say "/readyz: $(curl -fsS -m 5 "$URL/readyz")"
  say "POST /v1/classify $SMOKE_IMAGE (true label: $(basename "$(dirname "$SMOKE_IMAGE")"))"
  answer=$(curl -fsS -m 30 -F "file=@$SMOKE_IMAGE" "$URL/v1/classify?cache=fashion&top_k=3")
  echo "$answer" | python3 -m json.tool
  echo "$answer" | python3 -c 'import json,sys; r=json.load(sys.stdin)["results"][0]; assert r["error"] is None and len(r["labels"]) == 3, r'
  curl -fsS -m 5 "$URL/metrics" | grep -m 3 '^kvclip_http_requests_total' \
    || { echo "FAIL: /metrics has no kvclip_http_requests_total" >&2; exit 1; }
  say "build job in the container: $TAG build /data --out /caches/fashion-ctr --model tiny-random"
  t0=$SECONDS
  # shellcheck disable=SC2086
  podman run --rm --runtime=runc --ulimit "nofile=$SMOKE_NOFILE:$SMOKE_NOFILE" --ulimit nproc=32768:32768 \
    -v "$SMOKE_VOL:/caches" -v "$REPO/$SMOKE_DATA:/data:ro" "$TAG" \
    build /data --out /caches/fashion-ctr --model tiny-random --shots 4 --views 2 \
    --captioner none --quiet 2> >(grep -v 'systemd connection' >&2) | tail -15
  say "build job took $((SECONDS - t0)) s; volume now: $(ls "$SMOKE_VOL" | tr '\n' ' ')"
  test -s "$SMOKE_VOL/fashion-ctr/CURRENT" || { echo "FAIL: the build job wrote no CURRENT" >&2; exit 1; }
  for _ in $(seq 30); do
    curl -fsS -m 5 "$URL/v1/caches" | grep -q '"fashion-ctr"' && break; sleep 1
  done
  curl -fsS -m 5 "$URL/v1/caches" | grep -q '"fashion-ctr"' \
    || { echo "FAIL: the server did not pick up the cache built by the job" >&2; exit 1; }
  say "the server serves the job's cache: $(curl -fsS -m 30 -F "file=@$SMOKE_IMAGE" \
        "$URL/v1/classify?cache=fashion-ctr&top_k=1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["results"][0]["labels"][0])')"
  say "image $TAG: $(podman image inspect "$TAG" --format '{{.Size}}' | awk '{printf "%.2f GB", $1/1e9}')"
  exit 0
fi

[ "$(id -u)" = 0 ] || { echo "container_smoke.sh: run as root (podman, apt-get, debootstrap)" >&2; exit 1; }
RECIPE=${CONTAINER_RECIPE:-}
if [ -z "$RECIPE" ]; then
  for c in "$REPO/../shared/tools/container-smoke.sh" /work/shared/tools/container-smoke.sh; do
    [ -f "$c" ] && { RECIPE=$(cd "$(dirname "$c")" && pwd)/$(basename "$c"); break; }
  done
fi
[ -n "$RECIPE" ] && [ -f "$RECIPE" ] || {
  echo "container_smoke.sh: the recipe container-smoke.sh was not found (looked in" \
       "$REPO/../shared/tools/ and /work/shared/tools/); set CONTAINER_RECIPE=/path/to/container-smoke.sh" >&2
  exit 1; }
[ -x .venv/bin/kvclip ] || bash scripts/install.sh

# Data: Fashion-MNIST exported as image folders (Debian's dataset-fashion-mnist).
DATA=demo-data/fashion-mnist/train; TEST=demo-data/fashion-mnist/test
if [ ! -d "$DATA" ] || [ ! -d "$TEST" ]; then
  bash scripts/fetch_test_data.sh
  [ -d "$DATA" ] || .venv/bin/kvclip export-dataset fashion-mnist --out "$DATA" --per-class 16
  [ -d "$TEST" ] || .venv/bin/kvclip export-dataset fashion-mnist --out "$TEST" --split test --limit 1000
fi
IMAGE=$(find "$TEST" -type f \( -iname '*.png' -o -iname '*.jpg' \) | sort | sed -n 1p)  # sed reads to the end: no SIGPIPE under pipefail

# Torch wheels for the build (see WHEELHOUSE_SPEC above). Never committed (.gitignore).
if ! compgen -G ".wheels/torch-*.whl" >/dev/null || ! compgen -G ".wheels/torchvision-*.whl" >/dev/null; then
  # shellcheck disable=SC2086
  .venv/bin/pip download -q -d .wheels --only-binary=:all: \
    ${WHEELHOUSE_SPEC:-torch==2.14.1 torchvision==0.29.1} 2>&1 | grep -v '^WARNING: Location' || true
  compgen -G ".wheels/torch-*.whl" >/dev/null || { echo "container_smoke.sh: no torch wheel in .wheels/" >&2; exit 1; }
fi

# The caches volume: a host folder owned by the image's non-root user (uid 10001).
VOL=$(mktemp -d /tmp/kvclip-caches.XXXXXX)
trap 'rm -rf "$VOL"' EXIT
echo "== host: kvclip build $DATA --out $VOL/fashion --model tiny-random"
.venv/bin/kvclip build "$DATA" --out "$VOL/fashion" --model tiny-random --shots 4 --views 2 \
  --captioner none --quiet | tail -5
chown -R 10001:10001 "$VOL"

NOFILE=$(ulimit -Hn); [ "$NOFILE" = unlimited ] && NOFILE=1048576
export TAG=${TAG:-localhost/kvclip:smoke} SMOKE_VOL=$VOL SMOKE_DATA=$DATA SMOKE_IMAGE=$IMAGE SMOKE_NOFILE=$NOFILE
export BUILD_ARGS="--build-arg FLAVOR=cpu --build-arg WHEELHOUSE=.wheels ${BUILD_ARGS:-}"
export RUN_ARGS="-e KVCLIP_MODEL=tiny-random -e KVCLIP_RELOAD_INTERVAL_S=1 -v $VOL:/caches"
export HEALTH_PATH=/healthz APP_PORT=8000 HOST_PORT=${HOST_PORT:-18080}
export CHECK_CMD="bash '$REPO/scripts/container_smoke.sh' --check"
echo "== recipe: $RECIPE  (BUILD_ARGS=$BUILD_ARGS)"
start=$SECONDS
bash "$RECIPE" "$REPO"
echo "== container smoke passed in $((SECONDS - start)) s"
