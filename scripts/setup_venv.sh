#!/usr/bin/env bash
# Creates .venv (once) and installs plait into it.
# A Python that already has torch >= 2.11 (GPU machines) keeps it: the venv sees the system packages.
# Otherwise torch is pinned to the CPU wheel this kind of machine carries (an unpinned torch pulls CUDA).
set -euo pipefail
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c 'import sys, torch; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(0 if v >= (2, 11) else 1)' 2>/dev/null; then
    echo "setup: using the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.13.0
  fi
fi
"$VENV/bin/pip" install -q -e '.[dev,hf]'
touch "$VENV/.plait-installed"
