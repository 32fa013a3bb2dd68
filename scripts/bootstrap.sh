#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian machine: system packages the tests and the demo need,
# and a virtual environment (.venv) with livesplice installed in editable mode.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

need=()
for pkg in gcc g++ make cmake autoconf automake libtool quilt dpkg-dev debhelper debian-keyring build-essential patch binutils \
           python3-venv chromium; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "bootstrap: installing ${need[*]}" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >&2
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv >&2
fi
if ! .venv/bin/python -c 'import livesplice, elftools, capstone, numpy, pytest' 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ]; then
  .venv/bin/python -m pip install -q --upgrade pip >&2
  .venv/bin/python -m pip install -q -e '.[dev]' >&2
  touch .venv/.installed
fi
