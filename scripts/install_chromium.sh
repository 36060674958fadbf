#!/bin/sh
# Install Debian's chromium for the report's browser test (tests/lab/test_report.py),
# which opens report.html in headless Chromium and checks that every image loaded.
# Idempotent: does nothing when `chromium` is already on PATH.
set -eu

if command -v chromium >/dev/null 2>&1; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "install_chromium: installing Debian's chromium (apt-get)..." >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y chromium
    command -v chromium >/dev/null 2>&1
    exit 0
fi

cat >&2 <<'MSG'
install_chromium: `chromium` is not installed and this script cannot install it
(it installs with apt-get, as root, on Debian or Ubuntu). Install it yourself:

    sudo apt-get update && sudo apt-get install -y chromium

then rerun. Without it the browser test of report.html is skipped.
MSG
exit 1
