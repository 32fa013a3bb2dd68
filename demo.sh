#!/usr/bin/env bash
# The live-patching demo on the bundled example (sets up the machine first).
set -euo pipefail
cd "$(dirname "$0")"
scripts/bootstrap.sh
exec .venv/bin/python -m livesplice.demo "$@"
