#!/usr/bin/env bash
# Runs the test suite (sets up the machine first, including the QEMU kernel lab's host
# packages; the lab downloads and prepares its Debian kernel once, cached under
# ~/.cache/livesplice). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
scripts/bootstrap.sh
scripts/bootstrap-kernel.sh
exec .venv/bin/python -m pytest -q -rs "$@"
