#!/usr/bin/env bash
# One command for the day a GPU is available:
#   1. the kernel test suite on CUDA (the tests' device fixture adds "cuda" and the
#      Triton / CUDA backends to every oracle test when a GPU is present);
#   2. op benchmarks at SDXL shapes in fp16/bf16 (CUDA events, TFLOP/s and fraction of
#      peak, SDPA as the floor) and a random-weight real-size SDXL UNet at 1024^2,
#      2048^2, 4096^2, direct and FAM (ms per step, max_memory_allocated):
#      benchmarks/gpu_check.py, writing <out>/gpu-<name>.{csv,md}.
# Without CUDA, step 1 is skipped with a message and step 2 runs its CPU-runnable
# parts at tiny shapes (what CI runs: tests/kernels/test_gpu_check.py).
#
#   bash tools/gpu_check.sh [--out DIR] [--quick]     (default DIR: benchmarks/results)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT="benchmarks/results"
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: CUDA: $("$PY" -c "import torch; print(torch.cuda.get_device_name())")"
  "$PY" -m pytest -q tests/kernels/test_am_attention.py tests/kernels/test_lowpass_blend.py tests/kernels/test_dispatch.py \
    tests/kernels/test_am_triton.py tests/kernels/test_lowpass_triton.py tests/kernels/test_triton_aot_lowpass.py
  "$PY" -m benchmarks.gpu_check --out "$OUT" ${ARGS[@]+"${ARGS[@]}"}
else
  echo "gpu_check: no CUDA device: skipping the CUDA test run and the CUDA benchmarks"
  "$PY" -m benchmarks.gpu_check --out "$OUT" --cpu-smoke ${ARGS[@]+"${ARGS[@]}"}
fi
