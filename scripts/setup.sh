#!/usr/bin/env bash
# Set up a development/run environment in .venv on a fresh Debian-like machine.
# Order matters: torch==2.13.0 (the local CPU wheel) is installed before anything that
# depends on torch, so no other torch build (and no CUDA) is pulled in.
set -euo pipefail
cd "$(dirname "$0")/.."

# Mooncake Transfer Engine links libibverbs even for its TCP transport.
if ! ldconfig -p 2>/dev/null | grep -q 'libibverbs.so.1'; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq libibverbs1 >/dev/null
  elif command -v sudo >/dev/null 2>&1; then
    sudo apt-get update -qq && sudo apt-get install -y -qq libibverbs1 >/dev/null
  else
    echo "setup: libibverbs1 is missing and cannot be installed without root;" \
         "the mooncake backend will not load (set EPD_TRANSFER_BACKEND=shm)" >&2
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -e ".[dev,bench,cpu]"  # cpu: Mooncake's CPU build
echo "setup: done (.venv)"
