#!/usr/bin/env bash
# Set up .venv/ if needed, then run the demo distillation cycle (BANKING77, CPU, offline).
source "$(dirname "$0")/venv.sh"
exec distill demo "$@"
