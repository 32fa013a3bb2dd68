#!/usr/bin/env bash
# Runs the test suite (sets up the machine first; safe to run again).
set -euo pipefail
cd "$(dirname "$0")"
scripts/bootstrap.sh
exec .venv/bin/python -m pytest -q "$@"
