#!/usr/bin/env bash
# The speed check for one accelerator (docstring of bench/gpu.py): train step + MFU, generation latency at
# 20 steps + CFG and at 1 and 2 mean-flow steps, speech-processing latency. `--small`: tiny sizes, any device.
#   bash bench/gpu.sh [--small] [--set KEY=VALUE ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PYTHON" bench/gpu.py "$@"
