#!/usr/bin/env bash
# Compile every CUDA source for sm_80 and sm_90 with nvcc. The kernels cannot run on
# a machine without a GPU; this catches compile errors. The .cu files are plain CUDA
# (raw pointers, no torch headers); csrc/cuda/*.cpp (the torch bindings) is checked
# with g++ -fsyntax-only against torch's and the toolkit's headers.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$NVCC" ]; then
  echo "check_cuda: nvcc not found (set NVCC or install a CUDA toolkit)" >&2
  exit 1
fi
CUDA_ROOT="$(cd "$(dirname "$(readlink -f "$NVCC")")/.." && pwd)"
[ -f "$CUDA_ROOT/include/cuda_runtime.h" ] || CUDA_ROOT="${CUDA_HOME:-/usr/local/cuda}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
n=0
for cu in csrc/cuda/*.cu; do
  [ -e "$cu" ] || continue
  for arch in 80 90; do
    "$NVCC" -std=c++20 -O3 -Icsrc/include -gencode "arch=compute_${arch},code=sm_${arch}" \
      -Xptxas -v -c "$cu" -o "$OUT/$(basename "$cu").sm${arch}.o" 2> "$OUT/log" || { cat "$OUT/log" >&2; exit 1; }
    spills=$(grep -Eo "[1-9][0-9]* bytes spill (stores|loads)" "$OUT/log" || true)
    echo "nvcc OK  $cu sm_${arch}${spills:+  (spills: $spills)}"
    n=$((n + 1))
  done
done
PY="${PYTHON:-python}"
TORCH_INC=$("$PY" -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I'+p for p in include_paths()))")
PY_INC=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
for cpp in csrc/cuda/*.cpp; do
  [ -e "$cpp" ] || continue
  g++ -std=c++20 -fsyntax-only -DFAM_WITH_CUDA=1 -Icsrc/include $TORCH_INC -I"$PY_INC" -I"$CUDA_ROOT/include" "$cpp"
  echo "g++ syntax OK  $cpp"
  n=$((n + 1))
done
if [ "$n" -eq 0 ]; then
  echo "check_cuda: no CUDA sources found under csrc/cuda" >&2
  exit 1
fi
