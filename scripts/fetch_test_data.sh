#!/usr/bin/env bash
# Real labelled images for tests and the demo: Debian's dataset-fashion-mnist package.
set -euo pipefail
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "fetch_test_data.sh: install Debian's dataset-fashion-mnist package (as root)" >&2
    exit 1
  fi
fi
