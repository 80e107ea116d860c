// CUDA elementwise stages of lowpass_blend (plain CUDA: raw pointers and a stream,
// no torch headers). The GEMMs between them run on cuBLAS through at::mm in
// lowpass_blend_binding.cpp, which also holds the shared pipeline's CUDA stages.
// One thread per mirror pair of a line; the arithmetic is fam/lowpass_math.h,
// exercised on the CPU by the CPU kernels' tests.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "fam/cuda_dtype.cuh"
#include "fam/lowpass_math.h"

namespace fam {
namespace lowpass {

namespace {

constexpr int kThreads = 256;

unsigned int blocks_for(int64_t tasks) { return static_cast<unsigned int>((tasks + kThreads - 1) / kThreads); }

template <class T>
__global__ void fold_diff_w_kernel(const T* __restrict__ z, RowAddressing za, const T* __restrict__ z_ref,
                                   RowAddressing ra, int64_t rows, int n, float* __restrict__ folded) {
  const int pairs = pair_count(n);
  const int64_t task = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (task >= rows * pairs) return;
  const int64_t row = task / pairs;
  const int j = static_cast<int>(task % pairs);
  const T* zr = z + za.offset(row);
  const T* rr = z_ref + ra.offset(row);
  float* out = folded + row * n;
  const auto diff = [&](int i) { return to_float(rr[i * ra.stride_w]) - to_float(zr[i * za.stride_w]); };
  const auto put = [&](int slot, float v) { out[slot] = v; };
  fold_pair(n, j, diff, put);
}

template <bool kFold>
__global__ void transform_h_kernel(const float* __restrict__ x, int64_t outer, int n, int64_t inner,
                                   float* __restrict__ out) {
  const int pairs = pair_count(n);
  const int64_t task = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (task >= outer * pairs * inner) return;
  const int64_t i = task % inner;
  const int j = static_cast<int>((task / inner) % pairs);
  const int64_t a = task / (inner * pairs);
  const float* src = x + a * n * inner + i;
  float* dst = out + a * n * inner + i;
  const auto read = [&](int q) { return src[q * inner]; };
  const auto put = [&](int q, float v) { dst[q * inner] = v; };
  if (kFold) {
    fold_pair(n, j, read, put);
  } else {
    unfold_pair(n, j, read, put);
  }
}

template <class T>
__global__ void unfold_w_blend_kernel(const T* __restrict__ z, RowAddressing za, const float* __restrict__ folded,
                                      int64_t rows, int n, float gain, T* __restrict__ out) {
  const int pairs = pair_count(n);
  const int64_t task = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (task >= rows * pairs) return;
  const int64_t row = task / pairs;
  const int j = static_cast<int>(task % pairs);
  const T* zr = z + za.offset(row);
  const float* f = folded + row * n;
  T* o = out + row * n;
  const auto read = [&](int slot) { return f[slot]; };
  const auto put = [&](int i, float lp) { o[i] = from_float<T>(blend(to_float(zr[i * za.stride_w]), lp, gain)); };
  unfold_pair(n, j, read, put);
}

template <class T>
cudaError_t fold_diff_w_typed(const void* z, RowAddressing za, const void* z_ref, RowAddressing ra, int64_t rows,
                              int n, float* folded, cudaStream_t stream) {
  fold_diff_w_kernel<T><<<blocks_for(rows * pair_count(n)), kThreads, 0, stream>>>(
      static_cast<const T*>(z), za, static_cast<const T*>(z_ref), ra, rows, n, folded);
  return cudaGetLastError();
}

template <class T>
cudaError_t unfold_w_blend_typed(const void* z, RowAddressing za, const float* folded, int64_t rows, int n,
                                 float gain, void* out, cudaStream_t stream) {
  unfold_w_blend_kernel<T><<<blocks_for(rows * pair_count(n)), kThreads, 0, stream>>>(
      static_cast<const T*>(z), za, folded, rows, n, gain, static_cast<T*>(out));
  return cudaGetLastError();
}

}  // namespace

// folded (rows, n) float32 <- z_ref - z folded along the row (W).
cudaError_t launch_fold_diff_w(FloatKind kind, const void* z, RowAddressing za, const void* z_ref, RowAddressing ra,
                               int64_t rows, int n, float* folded, cudaStream_t stream) {
  switch (kind) {
    case FloatKind::kFloat16:
      return fold_diff_w_typed<__half>(z, za, z_ref, ra, rows, n, folded, stream);
    case FloatKind::kBFloat16:
      return fold_diff_w_typed<__nv_bfloat16>(z, za, z_ref, ra, rows, n, folded, stream);
    default:
      return fold_diff_w_typed<float>(z, za, z_ref, ra, rows, n, folded, stream);
  }
}

// out <- x folded (fold = true) or unfolded along dim 1 of a contiguous (outer, n, inner) float32 tensor.
cudaError_t launch_transform_h(bool fold, const float* x, int64_t outer, int n, int64_t inner, float* out,
                               cudaStream_t stream) {
  const unsigned int blocks = blocks_for(outer * pair_count(n) * inner);
  if (fold) {
    transform_h_kernel<true><<<blocks, kThreads, 0, stream>>>(x, outer, n, inner, out);
  } else {
    transform_h_kernel<false><<<blocks, kThreads, 0, stream>>>(x, outer, n, inner, out);
  }
  return cudaGetLastError();
}

// out (rows, n) contiguous, z's type <- z + gain * (folded unfolded along the row).
cudaError_t launch_unfold_w_blend(FloatKind kind, const void* z, RowAddressing za, const float* folded, int64_t rows,
                                  int n, float gain, void* out, cudaStream_t stream) {
  switch (kind) {
    case FloatKind::kFloat16:
      return unfold_w_blend_typed<__half>(z, za, folded, rows, n, gain, out, stream);
    case FloatKind::kBFloat16:
      return unfold_w_blend_typed<__nv_bfloat16>(z, za, folded, rows, n, gain, out, stream);
    default:
      return unfold_w_blend_typed<float>(z, za, folded, rows, n, gain, out, stream);
  }
}

}  // namespace lowpass
}  // namespace fam
