#!/usr/bin/env bash
# Headless Chromium and its matching chromedriver from Debian's packages, for the web
# page's browser test (tests/e2e/test_web_page.py). Nothing is downloaded outside apt: the
# test drives /usr/bin/chromium through /usr/bin/chromedriver. Safe to run again.
set -euo pipefail

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "install_browser.sh: no apt-get; install chromium and chromedriver (same version)" \
       "at /usr/bin/chromium and /usr/bin/chromedriver" >&2
  exit 1
fi
if [ "$(id -u)" = 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  SUDO=(sudo -n)
else
  echo "install_browser.sh: run as root (or with passwordless sudo) to apt-get install" \
       "chromium chromium-driver" >&2
  exit 1
fi
apt_install() {
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-liberation
}
# Try the package lists already on disk first (fetch_test_data.sh may have just updated
# them); update and retry only when that fails. apt's output is shown only on failure.
if ! log=$(apt_install 2>&1); then
  "${SUDO[@]}" apt-get update -qq >/dev/null
  if ! log=$(apt_install 2>&1); then
    printf '%s\n' "$log" >&2
    echo "install_browser.sh: apt-get install chromium chromium-driver failed" >&2
    exit 1
  fi
fi
[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || {
  echo "install_browser.sh: installed, but /usr/bin/chromium or /usr/bin/chromedriver is missing" >&2
  exit 1
}
