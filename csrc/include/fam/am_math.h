// Attention Modulation arithmetic shared by the CPU and CUDA kernels.
//
// AM (via the identity U(M^n) V = Up_q(M^n AvgPool(V)), see fam_kernels/am_attention.py) computes, for each
// high-res query i with native parent p(i),
//     out_i = (1 - lam) * softmax(s Q K^T)_i V  +  lam * softmax(s Q^n K^nT)_p(i) AvgPool(V)
// Both terms are flash-style attentions (online softmax in base 2: scores are
// pre-multiplied by s * log2(e)); the native term is computed once per native
// query and gathered by p(i). Everything here is templated on the value type so
// the CPU kernel can use it on SIMD vectors and the CUDA kernel on floats.
#pragma once

#include <math.h>

#include <cstdint>

#include "fam/common.h"

namespace fam {

constexpr float kLog2e = 1.4426950408889634f;

// Initial running max: finite, so 2^(m_old - m_new) is 0 rather than NaN on the
// first key block.
constexpr float kNoMax = -1e30f;

// Scalar operations for OnlineSoftmax on floats (host and device).
struct ScalarOps {
  static FAM_HD float max(float a, float b) { return a > b ? a : b; }
  static FAM_HD float exp2(float x) { return exp2f(x); }
};

// One row's (or one SIMD lane's) running softmax state over key blocks:
// m = running max of the base-2 scores, l = running sum of 2^(score - m).
template <class T, class Ops>
struct OnlineSoftmax {
  T m, l;

  // Enter a key block whose largest score is block_max. Returns alpha, the
  // factor by which the caller rescales its output accumulator; afterwards
  // weight(score) gives the block's unnormalised probabilities and the caller
  // adds them with add().
  FAM_HD T enter_block(T block_max) {
    T m_new = Ops::max(m, block_max);
    T alpha = Ops::exp2(m - m_new);
    m = m_new;
    l = l * alpha;
    return alpha;
  }
  FAM_HD T weight(T score) const { return Ops::exp2(score - m); }
  FAM_HD void add(T p) { l = l + p; }
};

// Grid geometry of one AM call: a row-major high-res (H, W) token grid over a
// native (h, w) grid, integer factors (sh, sw) = (H / h, W / w).
struct AmGrid {
  int64_t H, W, h, w, sh, sw;

  // Native token a high-res token falls in under nearest upsampling.
  FAM_HD int64_t native_token(int64_t i) const {
    int64_t row = i / W;
    int64_t col = i - row * W;
    return (row / sh) * w + col / sw;
  }
  // The t-th (0 <= t < sh*sw) high-res token averaged into native token j by AvgPool.
  FAM_HD int64_t pooled_child(int64_t j, int64_t t) const {
    int64_t jr = j / w, jc = j - (j / w) * w;
    int64_t a = t / sw, b = t - (t / sw) * sw;
    return (jr * sh + a) * W + jc * sw + b;
  }
  FAM_HD int64_t pool_size() const { return sh * sw; }
};

// The AM epilogue: blend the normalised high-res attention with the gathered
// native term.
template <class T>
FAM_HD T am_blend(T high_res, T native, float lam) {
  return high_res * (1.0f - lam) + native * lam;
}

// One attention pass of a CUDA launch (csrc/cuda/am_attention.cu, called by
// csrc/cuda/am_attention_binding.cpp): queries (pairs, n_q, d) against keys and
// values (pairs, n_k, d), pairs = batch * heads, unit stride along d everywhere.
// With blending, out = am_blend(attention, native[pair][native_token(i)], lam),
// native being (pairs, n_k / pool_size, d) fp32 contiguous.
enum class AmDtype { kFloat32, kFloat16, kBFloat16 };

struct AmPassArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  const float* native;
  int64_t q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, o_sb, o_sh, o_sn;
  int64_t heads, n_q, n_k;
  int d;
  float qk_scale_log2, lam;
  AmGrid grid;
};

}  // namespace fam
