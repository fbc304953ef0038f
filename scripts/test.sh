#!/usr/bin/env bash
# Set up .venv/ if needed, then run the test suite (slow end-to-end checks included).
source "$(dirname "$0")/venv.sh"
exec python -m pytest "$@"
