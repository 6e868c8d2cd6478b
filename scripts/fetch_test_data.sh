#!/usr/bin/env bash
# Real labelled images for tests and the demo:
#  - the foolbox wheel from PyPI, whose foolbox/data/ holds 20 labelled images per subset
#    (cifar10, cifar100, imagenet, mnist, fashionMNIST); kept as a zip in .cache/test-data/,
#    never installed (kvclip.cache_builder.datasets reads the images straight from it);
#  - Debian's dataset-fashion-mnist package.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEEL_DIR=.cache/test-data
# Each wheel is kept as a zip and read by tests, never installed: foolbox for its images,
# docker-compose 1.29 for the compose file JSON schema it ships (tests/deploy/test_deploy_files.py).
for SPEC in "foolbox==3.3.4" "docker-compose==1.29.2"; do
  prefix=$(printf '%s' "${SPEC%%==*}" | tr - _)
  if ! compgen -G "$WHEEL_DIR/$prefix-*.whl" >/dev/null; then
    # .ci/run calls this before install.sh makes the venv, so fall back to the system pip.
    if [ -x .venv/bin/python ] && .venv/bin/python -m pip --version >/dev/null 2>&1; then
      PIP=(.venv/bin/python -m pip)
    elif command -v python3 >/dev/null && python3 -m pip --version >/dev/null 2>&1; then
      PIP=(python3 -m pip)
    elif command -v pip3 >/dev/null; then
      PIP=(pip3)
    else
      echo "fetch_test_data.sh: no pip found (tried .venv, python3 -m pip, pip3);" \
           "install pip, or put the $SPEC wheel in $WHEEL_DIR by hand" >&2
      exit 1
    fi
    mkdir -p "$WHEEL_DIR"
    # --no-deps --only-binary: just the wheel (a zip of data), none of its dependencies.
    # pip's output is shown only on failure (it warns about unusable local index locations).
    if ! log=$(PIP_DISABLE_PIP_VERSION_CHECK=1 "${PIP[@]}" download -q --no-deps \
                 --only-binary=:all: -d "$WHEEL_DIR" "$SPEC" 2>&1); then
      printf '%s\n' "$log" >&2
      echo "fetch_test_data.sh: could not download $SPEC into $WHEEL_DIR" >&2
      exit 1
    fi
  fi
done

if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "fetch_test_data.sh: install Debian's dataset-fashion-mnist package (as root)" >&2
    exit 1
  fi
fi
