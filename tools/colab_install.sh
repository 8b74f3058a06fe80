#!/bin/sh
# Install the course into Colab's Python, beside Colab's own torch: the first cell of every lesson runs this (the
# cell is written by tools/colab.py). $1: the notebook kernel's Python (sys.executable).
# torch is pinned to the version installed, so that pip keeps Colab's CUDA build instead of replacing it.
set -e
PYTHON=${1:-python3}
COURSE=$(cd "$(dirname "$0")/.." && pwd)
TORCH=$("$PYTHON" -c "from importlib.metadata import version; print(version('torch'))")
"$PYTHON" -m pip install -q "$COURSE" bitsandbytes==0.50.2 "torch==$TORCH"
