// Attention Modulation on the CPU: flash-style, O(N) memory.
//
//   out_i = (1 - lam) * attention(Q, K, V)_i + lam * attention(Q^n, K^n, AvgPool(V))_p(i)
//
// Work is split over (batch*head, query block of 64). A query block keeps its 64
// queries in the 16 lanes of 4 SIMD vectors ("queries in lanes"): scores, the
// running max/sum and the output accumulator are all stored transposed
// (key/feature, query), so the online softmax needs no horizontal reduction and
// K and V rows are read in place through scalar broadcasts. Keys are visited in
// blocks of 64; the score tile and the P.V update are register-tiled.
//
// Pairs (batch, head) are processed in groups of one per thread: first the
// native term of the group (AvgPool(V) and its attention, fp32, n x d per pair),
// then the high-res query blocks, whose epilogue normalises, gathers the native
// row of each query and blends. Extra memory: O(threads * (n + N) * d).
//
// The SIMD code uses GCC/Clang vector extensions; on x86-64 the hot function is
// compiled twice (AVX-512 and baseline) and chosen at load time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "fam/am_math.h"

// a*b + c on vectors must become one FMA instruction (-std=c++17 disables contraction).
#pragma GCC optimize("fp-contract=fast")

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define FAM_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "default")))
#else
#define FAM_CPU_CLONES
#endif
#define FAM_ALWAYS_INLINE inline __attribute__((always_inline))

namespace fam_cpu_am {

constexpr int kLanes = 16;
constexpr int kQueryVecs = 4;
constexpr int kBlockQ = kLanes * kQueryVecs;  // queries per block
constexpr int kBlockK = 64;                   // keys per online-softmax step
constexpr int kKeyTile = 6;                   // keys per score register tile
constexpr int kFeatTile = 6;                  // features per P.V register tile

typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int vi __attribute__((vector_size(kLanes * sizeof(int))));

FAM_ALWAYS_INLINE vf splat(float s) { return vf{} + s; }
FAM_ALWAYS_INLINE vf load(const float* p) { return *reinterpret_cast<const vf*>(p); }
FAM_ALWAYS_INLINE void store(float* p, vf x) { *reinterpret_cast<vf*>(p) = x; }

// 2^x for x <= 0: round-to-nearest split x = n + f, |f| <= 1/2, degree-6
// polynomial for 2^f (relative error 1e-7), n added to the exponent bits.
// Inputs below -126 give 2^-126 (the weights they multiply are then negligible).
FAM_ALWAYS_INLINE vf exp2_nonpositive(vf x) {
  const vf lo = splat(-126.0f);
  x = x < lo ? lo : x;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vf t = x + magic;
  vi n = reinterpret_cast<vi>(t) - reinterpret_cast<vi>(magic);
  vf f = x - (t - magic);
  vf p = splat(1.533757750e-04f);
  p = p * f + 1.339985989e-03f;
  p = p * f + 9.618519805e-03f;
  p = p * f + 5.550329015e-02f;
  p = p * f + 2.402264625e-01f;
  p = p * f + 6.931471825e-01f;
  p = p * f + 1.0f;
  return reinterpret_cast<vf>(reinterpret_cast<vi>(p) + (n << 23));
}

struct VecOps {
  static FAM_ALWAYS_INLINE vf max(vf a, vf b) { return a > b ? a : b; }
  static FAM_ALWAYS_INLINE vf exp2(vf x) { return exp2_nonpositive(x); }
};
using LaneSoftmax = fam::OnlineSoftmax<vf, VecOps>;

// Rows of an fp32 (tokens, d) matrix with unit stride along d.
struct Rows {
  const float* data;
  int64_t stride;
  FAM_ALWAYS_INLINE const float* row(int64_t j) const { return data + j * stride; }
};

// scores_t[j][q] = sum_c k[j][c] * q_t[c][q] for keys j0 .. j0+KT-1 of the block.
template <int KT>
FAM_ALWAYS_INLINE void score_tile(const float* q_t, int d, Rows keys, int64_t j0, float* scores_t) {
  vf acc[KT][kQueryVecs];
  for (int t = 0; t < KT; ++t)
    for (int u = 0; u < kQueryVecs; ++u) acc[t][u] = vf{};
  const float* krow[KT];
  for (int t = 0; t < KT; ++t) krow[t] = keys.row(j0 + t);
  for (int c = 0; c < d; ++c) {
    vf qc[kQueryVecs];
    for (int u = 0; u < kQueryVecs; ++u) qc[u] = load(q_t + c * kBlockQ + u * kLanes);
    for (int t = 0; t < KT; ++t) {
      vf kc = splat(krow[t][c]);
      for (int u = 0; u < kQueryVecs; ++u) acc[t][u] = kc * qc[u] + acc[t][u];
    }
  }
  for (int t = 0; t < KT; ++t)
    for (int u = 0; u < kQueryVecs; ++u) store(scores_t + t * kBlockQ + u * kLanes, acc[t][u]);
}

// acc_t[c][q] = alpha[q] * acc_t[c][q] + sum_j v[j][c] * p_t[j][q] for features c0 .. c0+FT-1.
template <int FT>
FAM_ALWAYS_INLINE void pv_tile(const float* p_t, int nk, Rows values, int64_t j0, int c0, const vf* alpha,
                               float* acc_t) {
  vf acc[FT][kQueryVecs];
  for (int t = 0; t < FT; ++t)
    for (int u = 0; u < kQueryVecs; ++u) acc[t][u] = load(acc_t + (c0 + t) * kBlockQ + u * kLanes) * alpha[u];
  for (int j = 0; j < nk; ++j) {
    vf pj[kQueryVecs];
    for (int u = 0; u < kQueryVecs; ++u) pj[u] = load(p_t + j * kBlockQ + u * kLanes);
    const float* vrow = values.row(j0 + j) + c0;
    for (int t = 0; t < FT; ++t) {
      vf vc = splat(vrow[t]);
      for (int u = 0; u < kQueryVecs; ++u) acc[t][u] = vc * pj[u] + acc[t][u];
    }
  }
  for (int t = 0; t < FT; ++t)
    for (int u = 0; u < kQueryVecs; ++u) store(acc_t + (c0 + t) * kBlockQ + u * kLanes, acc[t][u]);
}

// Unnormalised attention of one query block over all keys: on return
// acc_t[c][q] / row_sum[q] is the output. q_t holds the queries transposed
// (d, kBlockQ), pre-multiplied by scale * log2(e), zero in unused lanes.
// Scratch p_t: (kBlockK, kBlockQ).
FAM_CPU_CLONES
void attend_query_block(const float* q_t, int d, Rows keys, Rows values, int64_t n_keys, float* acc_t,
                        float* row_sum, float* p_t) {
  LaneSoftmax state[kQueryVecs];
  for (int u = 0; u < kQueryVecs; ++u) state[u] = {splat(fam::kNoMax), vf{}};
  std::memset(acc_t, 0, sizeof(float) * d * kBlockQ);
  for (int64_t j0 = 0; j0 < n_keys; j0 += kBlockK) {
    const int nk = static_cast<int>(std::min<int64_t>(kBlockK, n_keys - j0));
    int j = 0;
    for (; j + kKeyTile <= nk; j += kKeyTile) score_tile<kKeyTile>(q_t, d, keys, j0 + j, p_t + j * kBlockQ);
    for (; j < nk; ++j) score_tile<1>(q_t, d, keys, j0 + j, p_t + j * kBlockQ);

    vf alpha[kQueryVecs];
    for (int u = 0; u < kQueryVecs; ++u) {
      vf block_max = splat(fam::kNoMax);
      for (int jj = 0; jj < nk; ++jj) block_max = VecOps::max(block_max, load(p_t + jj * kBlockQ + u * kLanes));
      alpha[u] = state[u].enter_block(block_max);
      vf sum = vf{};
      for (int jj = 0; jj < nk; ++jj) {
        vf p = state[u].weight(load(p_t + jj * kBlockQ + u * kLanes));
        store(p_t + jj * kBlockQ + u * kLanes, p);
        sum += p;
      }
      state[u].add(sum);
    }

    int c = 0;
    for (; c + kFeatTile <= d; c += kFeatTile) pv_tile<kFeatTile>(p_t, nk, values, j0, c, alpha, acc_t);
    for (; c < d; ++c) pv_tile<1>(p_t, nk, values, j0, c, alpha, acc_t);
  }
  for (int u = 0; u < kQueryVecs; ++u) store(row_sum + u * kLanes, state[u].l);
}

// ---------------------------------------------------------------- host side

struct FloatBuffer {
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> ptr;
  explicit FloatBuffer(int64_t n)
      : ptr(static_cast<float*>(std::aligned_alloc(64, std::max<int64_t>(64, (n * 4 + 63) / 64 * 64)))) {
    TORCH_CHECK(ptr, "am_attention (cpu): out of memory allocating ", n * 4, " bytes");
  }
  float* get() const { return ptr.get(); }
};

// A (tokens, d) slice of a 4-D (B, heads, tokens, d) tensor, any dtype and strides.
template <class scalar_t>
struct Slice {
  const scalar_t* data;
  int64_t stride_n, stride_d;
  FAM_ALWAYS_INLINE float at(int64_t i, int64_t c) const {
    return static_cast<float>(data[i * stride_n + c * stride_d]);
  }
};

template <class scalar_t>
Slice<scalar_t> slice(const at::Tensor& t, int64_t b, int64_t hd) {
  return {t.data_ptr<scalar_t>() + b * t.stride(0) + hd * t.stride(1), t.stride(2), t.stride(3)};
}

// Rows of the slice as fp32 with unit feature stride: in place when it already
// is, else converted into `scratch` (tokens * d floats).
template <class scalar_t>
Rows as_float_rows(Slice<scalar_t> s, int64_t tokens, int d, float* scratch) {
  if (std::is_same<scalar_t, float>::value && s.stride_d == 1)
    return {reinterpret_cast<const float*>(s.data), s.stride_n};
  for (int64_t i = 0; i < tokens; ++i)
    for (int c = 0; c < d; ++c) scratch[i * d + c] = s.at(i, c);
  return {scratch, d};
}

template <class scalar_t>
bool needs_conversion(const at::Tensor& t) {
  return !(std::is_same<scalar_t, float>::value && t.stride(3) == 1);
}

// q_t[c][q] = scale_log2 * Q[i0 + q][c], zero for q >= nq.
template <class scalar_t>
void pack_queries(Slice<scalar_t> q, int64_t i0, int nq, int d, float scale_log2, float* q_t) {
  for (int c = 0; c < d; ++c) {
    float* dst = q_t + c * kBlockQ;
    for (int r = 0; r < nq; ++r) dst[r] = scale_log2 * q.at(i0 + r, c);
    for (int r = nq; r < kBlockQ; ++r) dst[r] = 0.0f;
  }
}

struct Scratch {
  FloatBuffer q_t, acc_t, p_t, row_sum;
  explicit Scratch(int d) : q_t(d * kBlockQ), acc_t(d * kBlockQ), p_t(kBlockK * kBlockQ), row_sum(kBlockQ) {}
};

template <class scalar_t>
void am_attention_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_lr,
                         const at::Tensor& k_lr, float lam, fam::AmGrid grid, float scale, at::Tensor& out) {
  const int64_t B = q.size(0), heads = q.size(1), N = q.size(2), n = q_lr.size(2);
  const int d = static_cast<int>(q.size(3));
  const float scale_log2 = scale * fam::kLog2e;
  const int64_t pairs = B * heads;
  const int64_t group = std::min<int64_t>(pairs, std::max(1, at::get_num_threads()));
  const int64_t hr_blocks = (N + kBlockQ - 1) / kBlockQ, lr_blocks = (n + kBlockQ - 1) / kBlockQ;
  const bool convert_k = needs_conversion<scalar_t>(k), convert_v = needs_conversion<scalar_t>(v);
  const bool convert_k_lr = needs_conversion<scalar_t>(k_lr);

  // Per-pair fp32 data of the current group.
  FloatBuffer v_pool(group * n * d), native(group * n * d);
  FloatBuffer k32(convert_k ? group * N * d : 1), v32(convert_v ? group * N * d : 1);
  FloatBuffer k_lr32(convert_k_lr ? group * n * d : 1);
  std::vector<Rows> keys(group), values(group), keys_lr(group);
  const float inv_pool = 1.0f / static_cast<float>(grid.pool_size());

  for (int64_t p0 = 0; p0 < pairs; p0 += group) {
    const int64_t members = std::min(group, pairs - p0);
    auto pair_of = [&](int64_t g) { return std::make_pair((p0 + g) / heads, (p0 + g) % heads); };

    at::parallel_for(0, members, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        auto [b, hd] = pair_of(g);
        auto vs = slice<scalar_t>(v, b, hd);
        keys[g] = as_float_rows(slice<scalar_t>(k, b, hd), N, d, k32.get() + g * N * d);
        values[g] = as_float_rows(vs, N, d, v32.get() + g * N * d);
        keys_lr[g] = as_float_rows(slice<scalar_t>(k_lr, b, hd), n, d, k_lr32.get() + g * n * d);
        float* pooled = v_pool.get() + g * n * d;
        for (int64_t j = 0; j < n; ++j) {
          float* dst = pooled + j * d;
          std::fill(dst, dst + d, 0.0f);
          for (int64_t t = 0; t < grid.pool_size(); ++t) {
            const float* src = values[g].row(grid.pooled_child(j, t));
            for (int c = 0; c < d; ++c) dst[c] += src[c];
          }
          for (int c = 0; c < d; ++c) dst[c] *= inv_pool;
        }
      }
    });

    // Native term: attention(Q^n, K^n, AvgPool(V)), normalised, fp32.
    at::parallel_for(0, members * lr_blocks, 1, [&](int64_t begin, int64_t end) {
      Scratch s(d);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t g = task / lr_blocks, i0 = (task % lr_blocks) * kBlockQ;
        const int nq = static_cast<int>(std::min<int64_t>(kBlockQ, n - i0));
        auto [b, hd] = pair_of(g);
        pack_queries(slice<scalar_t>(q_lr, b, hd), i0, nq, d, scale_log2, s.q_t.get());
        attend_query_block(s.q_t.get(), d, keys_lr[g], Rows{v_pool.get() + g * n * d, d}, n, s.acc_t.get(),
                           s.row_sum.get(), s.p_t.get());
        float* dst = native.get() + (g * n + i0) * d;
        for (int r = 0; r < nq; ++r) {
          const float inv = 1.0f / s.row_sum.get()[r];
          for (int c = 0; c < d; ++c) dst[r * d + c] = s.acc_t.get()[c * kBlockQ + r] * inv;
        }
      }
    });

    // High-res term, blended with the gathered native row in the epilogue.
    at::parallel_for(0, members * hr_blocks, 1, [&](int64_t begin, int64_t end) {
      Scratch s(d);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t g = task / hr_blocks, i0 = (task % hr_blocks) * kBlockQ;
        const int nq = static_cast<int>(std::min<int64_t>(kBlockQ, N - i0));
        auto [b, hd] = pair_of(g);
        pack_queries(slice<scalar_t>(q, b, hd), i0, nq, d, scale_log2, s.q_t.get());
        attend_query_block(s.q_t.get(), d, keys[g], values[g], N, s.acc_t.get(), s.row_sum.get(), s.p_t.get());
        scalar_t* dst = out.data_ptr<scalar_t>() + b * out.stride(0) + hd * out.stride(1);
        const float* native_rows = native.get() + g * n * d;
        for (int r = 0; r < nq; ++r) {
          const float inv = 1.0f / s.row_sum.get()[r];
          const float* nat = native_rows + grid.native_token(i0 + r) * d;
          scalar_t* o = dst + (i0 + r) * out.stride(2);
          for (int c = 0; c < d; ++c)
            o[c * out.stride(3)] =
                static_cast<scalar_t>(fam::am_blend(s.acc_t.get()[c * kBlockQ + r] * inv, nat[c], lam));
        }
      }
    });
  }
}

at::Tensor am_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_lr,
                            const at::Tensor& k_lr, double lam, int64_t H, int64_t W, int64_t h, int64_t w,
                            double scale) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "am_attention: q, k, v must share one (B, heads, N, d) shape");
  TORCH_CHECK(q_lr.dim() == 4 && k_lr.sizes() == q_lr.sizes(), "am_attention: q_lr, k_lr must share one shape");
  TORCH_CHECK(h > 0 && w > 0 && H % h == 0 && W % w == 0 && q.size(2) == H * W && q_lr.size(2) == h * w,
              "am_attention: token counts must match hr_size and lr_size, integer factors");
  at::Tensor out = at::empty_like(q);
  fam::AmGrid grid{H, W, h, w, H / h, W / w};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "am_attention_cpu", [&] {
    am_attention_kernel<scalar_t>(q, k, v, q_lr, k_lr, static_cast<float>(lam), grid, static_cast<float>(scale),
                                  out);
  });
  return out;
}

}  // namespace fam_cpu_am

TORCH_LIBRARY_FRAGMENT(fam_C, m) {
  m.def(
      "am_attention(Tensor q, Tensor k, Tensor v, Tensor q_lr, Tensor k_lr, float lam, int H, int W, int h, int w, "
      "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fam_C, CPU, m) { m.impl("am_attention", &fam_cpu_am::am_attention_cpu); }
