#!/usr/bin/env bash
# Whole set-up on a fresh machine: a virtual environment with the pinned CPU torch,
# the test/sampler dependencies and this package with its compiled extension.
# Idempotent. FAM_VENV chooses the environment folder (default: .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FAM_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# Pinned: 2.13.0 is the CPU wheel on this machine's disk; an unpinned torch pulls a
# multi-GB CUDA build. On a GPU machine install the CUDA torch you want instead.
"$PY" -c "import torch" >/dev/null 2>&1 || "$PY" -m pip install -q "torch==${FAM_TORCH_VERSION:-2.13.0}"
"$PY" -m pip install -q -r requirements-dev.txt
# --no-build-isolation: build the extension against the torch installed above.
"$PY" -m pip install -q -e . --no-build-isolation
"$PY" -c "import fam_kernels as f; print('fam_kernels', f.__version__, '| extension:', f.extension_unavailable_reason() or 'loaded')"
