#!/usr/bin/env bash
# The project's test command: set up (idempotent), run the test suite (includes the
# Triton interpreter tests and the Triton ahead-of-time sm_80/sm_90 compile checks),
# then compile every CUDA source with nvcc.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
VENV="${FAM_VENV:-.venv}"
"$VENV/bin/ruff" check .
"$VENV/bin/python" -m pytest -q "$@"
PYTHON="$VENV/bin/python" bash tools/check_cuda.sh
