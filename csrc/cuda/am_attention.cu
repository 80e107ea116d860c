// Attention Modulation on CUDA (SIMT, no tensor cores): one flash-style kernel
// launched twice -- the native pass (fp32 output, once per native query) and the
// high-res pass, whose epilogue gathers each query's native row and blends
// (math: csrc/include/fam/am_math.h).
//
// A block of 4 warps owns 16 queries (4 per warp) and streams keys in tiles of 32
// through shared memory. For the scores a lane owns one key of the tile (dot
// product over d against the warp's query rows, broadcast from shared memory);
// for P.V a lane owns features lane, lane+32, ... and receives each key's weight
// by warp shuffle. The running max is warp-uniform; each lane keeps a partial
// row sum, reduced once in the epilogue.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "fam/am_math.h"
#include "fam/cuda_dtype.cuh"

namespace fam_cuda_am {

using fam::from_float;
using fam::to_float;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kQueriesPerWarp = 4;
constexpr int kBlockQ = kWarps * kQueriesPerWarp;
constexpr int kKeyTile = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// kChunks: head dim padded to 32 * kChunks (d <= 128).
template <class T, class TOut, int kChunks, bool kBlend>
__global__ void __launch_bounds__(kThreads) am_attention_fwd(const fam::AmPassArgs a) {
  constexpr int kD = 32 * kChunks;
  __shared__ float q_s[kBlockQ][kD];
  __shared__ float k_s[kKeyTile][kD + 1];  // +1: lanes read different rows, no bank conflicts
  __shared__ float v_s[kKeyTile][kD];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t pair = blockIdx.y, b = pair / a.heads, hd = pair % a.heads;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kBlockQ;
  const T* Q = static_cast<const T*>(a.q) + b * a.q_sb + hd * a.q_sh;
  const T* K = static_cast<const T*>(a.k) + b * a.k_sb + hd * a.k_sh;
  const T* V = static_cast<const T*>(a.v) + b * a.v_sb + hd * a.v_sh;

  for (int idx = threadIdx.x; idx < kBlockQ * kD; idx += kThreads) {
    const int r = idx / kD, c = idx % kD;
    const int64_t i = q0 + r;
    q_s[r][c] = (i < a.n_q && c < a.d) ? to_float(Q[i * a.q_sn + c]) * a.qk_scale_log2 : 0.0f;
  }

  fam::OnlineSoftmax<float, fam::ScalarOps> state[kQueriesPerWarp];
  float acc[kQueriesPerWarp][kChunks];
#pragma unroll
  for (int qi = 0; qi < kQueriesPerWarp; ++qi) {
    state[qi].m = fam::kNoMax;
    state[qi].l = 0.0f;
#pragma unroll
    for (int ch = 0; ch < kChunks; ++ch) acc[qi][ch] = 0.0f;
  }

  for (int64_t j0 = 0; j0 < a.n_k; j0 += kKeyTile) {
    __syncthreads();  // the previous tile is consumed (and q_s written, first time)
    for (int idx = threadIdx.x; idx < kKeyTile * kD; idx += kThreads) {
      const int r = idx / kD, c = idx % kD;
      const int64_t j = j0 + r;
      const bool inside = j < a.n_k && c < a.d;
      k_s[r][c] = inside ? to_float(K[j * a.k_sn + c]) : 0.0f;
      v_s[r][c] = inside ? to_float(V[j * a.v_sn + c]) : 0.0f;
    }
    __syncthreads();

    const bool key_inside = j0 + lane < a.n_k;
#pragma unroll
    for (int qi = 0; qi < kQueriesPerWarp; ++qi) {
      const float* q_row = q_s[warp * kQueriesPerWarp + qi];
      float s = 0.0f;
#pragma unroll 8
      for (int c = 0; c < kD; ++c) s += q_row[c] * k_s[lane][c];
      s = key_inside ? s : -INFINITY;
      float block_max = s;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) block_max = fmaxf(block_max, __shfl_xor_sync(kFullMask, block_max, off));
      const float alpha = state[qi].enter_block(block_max);
      const float p = key_inside ? state[qi].weight(s) : 0.0f;
      state[qi].add(p);
#pragma unroll
      for (int ch = 0; ch < kChunks; ++ch) acc[qi][ch] *= alpha;
#pragma unroll 4
      for (int jj = 0; jj < kKeyTile; ++jj) {
        const float pj = __shfl_sync(kFullMask, p, jj);
#pragma unroll
        for (int ch = 0; ch < kChunks; ++ch) acc[qi][ch] += pj * v_s[jj][lane + 32 * ch];
      }
    }
  }

  TOut* out = static_cast<TOut*>(a.out) + b * a.o_sb + hd * a.o_sh;
  const int64_t n_native = a.n_k / a.grid.pool_size();
#pragma unroll
  for (int qi = 0; qi < kQueriesPerWarp; ++qi) {
    float l = state[qi].l;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) l += __shfl_xor_sync(kFullMask, l, off);
    const int64_t i = q0 + warp * kQueriesPerWarp + qi;
    if (i >= a.n_q) continue;
    const float inv = 1.0f / l;
#pragma unroll
    for (int ch = 0; ch < kChunks; ++ch) {
      const int c = lane + 32 * ch;
      if (c >= a.d) continue;
      float value = acc[qi][ch] * inv;
      if (kBlend) value = fam::am_blend(value, a.native[(pair * n_native + a.grid.native_token(i)) * a.d + c], a.lam);
      out[i * a.o_sn + c] = from_float<TOut>(value);
    }
  }
}

template <class T, class TOut, bool kBlend>
cudaError_t launch_typed(const fam::AmPassArgs& a, int64_t pairs, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((a.n_q + kBlockQ - 1) / kBlockQ), static_cast<unsigned>(pairs));
  if (a.d <= 32) {
    am_attention_fwd<T, TOut, 1, kBlend><<<grid, kThreads, 0, stream>>>(a);
  } else if (a.d <= 64) {
    am_attention_fwd<T, TOut, 2, kBlend><<<grid, kThreads, 0, stream>>>(a);
  } else if (a.d <= 96) {
    am_attention_fwd<T, TOut, 3, kBlend><<<grid, kThreads, 0, stream>>>(a);
  } else if (a.d <= 128) {
    am_attention_fwd<T, TOut, 4, kBlend><<<grid, kThreads, 0, stream>>>(a);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_pass(const fam::AmPassArgs& a, int64_t pairs, bool blend, cudaStream_t stream) {
  return blend ? launch_typed<T, T, true>(a, pairs, stream) : launch_typed<T, float, false>(a, pairs, stream);
}

// Native pass (blend = false, out fp32) or high-res pass (blend = true, out in the input dtype).
cudaError_t launch_am_attention_pass(const fam::AmPassArgs& a, fam::AmDtype dtype, int64_t pairs, bool blend,
                                     cudaStream_t stream) {
  switch (dtype) {
    case fam::AmDtype::kFloat32:
      return launch_pass<float>(a, pairs, blend, stream);
    case fam::AmDtype::kFloat16:
      return launch_pass<__half>(a, pairs, blend, stream);
    case fam::AmDtype::kBFloat16:
      return launch_pass<__nv_bfloat16>(a, pairs, blend, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fam_cuda_am
