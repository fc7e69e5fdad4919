#!/usr/bin/env sh
# Installs hfrepair and what its demo and tests need into the current Python environment.
# Keeps a torch that is already installed (e.g. your CUDA build); otherwise installs the
# CPU build 2.13.0 first, so that pip does not pull a multi-GB CUDA wheel.
set -e
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
"$PYTHON" -m pip install --quiet -e ".[demo,test]"
