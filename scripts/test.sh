#!/usr/bin/env bash
# Set up .venv/ if needed, then run the test suite (slow end-to-end checks included).
source "$(dirname "$0")/venv.sh"
# The spot-check UI test drives Debian's chromium through its chromedriver (no browser download).
if ! { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } && command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver; } \
        >/dev/null 2>&1 || echo "chromium could not be installed: the spot-check UI test will be skipped" >&2
fi
exec python -m pytest "$@"
