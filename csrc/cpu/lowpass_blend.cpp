// lowpass_blend on the CPU: out = z + gain * LP(z_ref - z) per (B, C) plane.
//
// Two forms, chosen per call in fam_kernels/lowpass_blend.py (whichever costs less):
//  * lowpass_blend_lowrank: the difference is formed and folded in one pass, then
//    four BLAS GEMMs with the folded band basis (half the work of the plain basis),
//    then one pass that unfolds, scales, adds z and casts. The GEMM orchestration
//    is shared with CUDA (lowpass_blend_lowrank_pipeline).
//  * lowpass_blend_spectral: diff pass, rfft along W keeping the band's bins, FFT
//    along H masked to the band, inverse transforms, one blend pass.
// Elementwise passes run in parallel over rows (at::parallel_for, OpenMP here) and
// read z / z_ref through their strides, so non-contiguous inputs cost no copy.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "fam/lowpass_math.h"
#include "fam/lowpass_pipeline.h"

namespace fam {
namespace {

using lowpass::RowAddressing;

RowAddressing addressing(const at::Tensor& t) {
  return RowAddressing{t.size(1), t.size(2), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

int64_t rows_of(const at::Tensor& t) { return t.size(0) * t.size(1) * t.size(2); }

constexpr int64_t kRowGrain = 16;

// Runs body(std::integral_constant<bool, unit>) with unit == (all strides are 1), so
// the common contiguous case compiles to constant-stride loops.
template <class Body>
void with_unit_stride(bool unit, const Body& body) {
  if (unit) {
    body(std::true_type{});
  } else {
    body(std::false_type{});
  }
}

// Each row: the difference into a row buffer (a contiguous, vectorisable pass),
// then folded from there into its slots.
void fold_diff_w_cpu(const at::Tensor& z, const at::Tensor& z_ref, const at::Tensor& folded) {
  const int n = static_cast<int>(z.size(3));
  const RowAddressing za = addressing(z), ra = addressing(z_ref);
  float* out = folded.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "lowpass_fold_diff", [&] {
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* rp = z_ref.const_data_ptr<scalar_t>();
    with_unit_stride(za.stride_w == 1 && ra.stride_w == 1, [&](auto unit) {
      const int64_t zs = unit ? 1 : za.stride_w, rs = unit ? 1 : ra.stride_w;
      at::parallel_for(0, rows_of(z), kRowGrain, [&](int64_t begin, int64_t end) {
        std::vector<float> diff(n);
        float* d = diff.data();
        for (int64_t row = begin; row < end; ++row) {
          const scalar_t* zr = zp + za.offset(row);
          const scalar_t* rr = rp + ra.offset(row);
          for (int j = 0; j < n; ++j) d[j] = static_cast<float>(rr[j * rs]) - static_cast<float>(zr[j * zs]);
          float* o = out + row * n;
          const auto read = [d](int j) { return d[j]; };
          const auto put = [o](int slot, float v) { o[slot] = v; };
          lowpass::for_each_pair(
              n, [&](int j) { lowpass::fold_pair(n, j, read, put); },
              [&](int j) { lowpass::fold_mirrored(n, j, read, put); });
        }
      });
    });
  });
}

// Fold (or unfold) along dim 1 of an (A, n, I) float tensor, pair by pair, each
// pair applied across the contiguous inner dimension.
template <bool kFold>
void transform_h_cpu(const at::Tensor& x, const at::Tensor& out) {
  const int64_t outer = x.size(0), inner = x.size(2);
  const int n = static_cast<int>(x.size(1));
  const int pairs = lowpass::pair_count(n);
  const float* xp = x.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, outer * pairs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t a = task / pairs;
      const int j = static_cast<int>(task % pairs);
      const float* src = xp + a * n * inner;
      float* dst = op + a * n * inner;
      const bool single = lowpass::is_single(n, j);
      for (int64_t i = 0; i < inner; ++i) {
        const auto read = [&](int q) { return src[q * inner + i]; };
        const auto put = [&](int q, float v) { dst[q * inner + i] = v; };
        if (single) {
          put(j, read(j));
        } else if (kFold) {
          lowpass::fold_mirrored(n, j, read, put);
        } else {
          lowpass::unfold_mirrored(n, j, read, put);
        }
      }
    }
  });
}

// Each row: unfolded into a row buffer, then blended with z in a contiguous pass
// (so `folded` may share memory with a float32 `out`).
void unfold_w_blend_cpu(const at::Tensor& z, const at::Tensor& folded, double gain, const at::Tensor& out) {
  const int n = static_cast<int>(z.size(3));
  const RowAddressing za = addressing(z);
  const float g = static_cast<float>(gain);
  const float* fp = folded.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "lowpass_unfold_blend", [&] {
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    with_unit_stride(za.stride_w == 1, [&](auto unit) {
      const int64_t zs = unit ? 1 : za.stride_w;
      at::parallel_for(0, rows_of(z), kRowGrain, [&](int64_t begin, int64_t end) {
        std::vector<float> line(n);
        float* l = line.data();
        for (int64_t row = begin; row < end; ++row) {
          const float* f = fp + row * n;
          const auto read = [f](int slot) { return f[slot]; };
          const auto put = [l](int i, float v) { l[i] = v; };
          lowpass::for_each_pair(
              n, [&](int j) { lowpass::unfold_pair(n, j, read, put); },
              [&](int j) { lowpass::unfold_mirrored(n, j, read, put); });
          const scalar_t* zr = zp + za.offset(row);
          scalar_t* o = op + row * n;
          for (int i = 0; i < n; ++i) o[i] = static_cast<scalar_t>(lowpass::blend(static_cast<float>(zr[i * zs]), l[i], g));
        }
      });
    });
  });
}

// Spectral form's elementwise passes: diff in (float32, contiguous), blend out.
void diff_cpu(const at::Tensor& z, const at::Tensor& z_ref, const at::Tensor& diff) {
  const int64_t n = z.size(3);
  const RowAddressing za = addressing(z), ra = addressing(z_ref);
  float* dp = diff.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "lowpass_diff", [&] {
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* rp = z_ref.const_data_ptr<scalar_t>();
    with_unit_stride(za.stride_w == 1 && ra.stride_w == 1, [&](auto unit) {
      const int64_t zs = unit ? 1 : za.stride_w, rs = unit ? 1 : ra.stride_w;
      at::parallel_for(0, rows_of(z), kRowGrain, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const scalar_t* zr = zp + za.offset(row);
          const scalar_t* rr = rp + ra.offset(row);
          float* d = dp + row * n;
          for (int64_t j = 0; j < n; ++j) d[j] = static_cast<float>(rr[j * rs]) - static_cast<float>(zr[j * zs]);
        }
      });
    });
  });
}

void blend_cpu(const at::Tensor& z, const at::Tensor& lowpassed, double gain, const at::Tensor& out) {
  const int64_t n = z.size(3);
  const RowAddressing za = addressing(z);
  const float g = static_cast<float>(gain);
  const float* lp = lowpassed.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "lowpass_blend", [&] {
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    with_unit_stride(za.stride_w == 1, [&](auto unit) {
      const int64_t zs = unit ? 1 : za.stride_w;
      at::parallel_for(0, rows_of(z), kRowGrain, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const scalar_t* zr = zp + za.offset(row);
          const float* l = lp + row * n;
          scalar_t* o = op + row * n;
          for (int64_t i = 0; i < n; ++i) {
            o[i] = static_cast<scalar_t>(lowpass::blend(static_cast<float>(zr[i * zs]), l[i], g));
          }
        }
      });
    });
  });
}

void check_inputs(const at::Tensor& z, const at::Tensor& z_ref) {
  TORCH_CHECK(z.dim() == 4, "lowpass_blend: z must be (B, C, H, W), got ", z.sizes());
  TORCH_CHECK(z.sizes() == z_ref.sizes(), "lowpass_blend: z_ref shape ", z_ref.sizes(), " != z shape ", z.sizes());
  TORCH_CHECK(z.scalar_type() == z_ref.scalar_type(), "lowpass_blend: z and z_ref dtypes differ");
  TORCH_CHECK(z.device() == z_ref.device(), "lowpass_blend: z and z_ref devices differ");
  TORCH_CHECK(z.numel() > 0, "lowpass_blend: empty input");
}

void check_basis(const char* name, const at::Tensor& basis, int64_t rows) {
  TORCH_CHECK(basis.dim() == 2 && basis.size(0) == rows && basis.scalar_type() == at::kFloat && basis.is_contiguous(),
              "lowpass_blend: ", name, " must be a contiguous float32 matrix with ", rows, " rows, got ",
              basis.sizes(), " ", basis.scalar_type());
}

// out <- a @ b, skipping the GEMM (zeros) when the band has no such columns.
void mm_into(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (out.numel() == 0) return;
  if (a.size(-1) == 0) {
    out.zero_();
    return;
  }
  if (out.dim() == 2) {
    at::mm_out(const_cast<at::Tensor&>(out), a, b);
  } else {
    out.copy_(at::matmul(a, b));
  }
}

const LowpassStages kCpuStages{fold_diff_w_cpu, transform_h_cpu<true>, transform_h_cpu<false>, unfold_w_blend_cpu,
                               /*blend_in_place=*/true};

at::Tensor lowrank_cpu(const at::Tensor& z, const at::Tensor& z_ref, const at::Tensor& cos_h, const at::Tensor& sin_h,
                       const at::Tensor& cos_w, const at::Tensor& sin_w, double gain) {
  return lowpass_blend_lowrank_pipeline(z, z_ref, cos_h, sin_h, cos_w, sin_w, gain, kCpuStages);
}

at::Tensor spectral_cpu(const at::Tensor& z, const at::Tensor& z_ref, const at::Tensor& mask_h, int64_t kept_w,
                        double gain) {
  check_inputs(z, z_ref);
  const int64_t H = z.size(2), W = z.size(3);
  TORCH_CHECK(mask_h.dim() == 2 && mask_h.size(0) == H && mask_h.size(1) == 1, "lowpass_blend: mask_h must be (H, 1)");
  TORCH_CHECK(kept_w >= 1 && kept_w <= W / 2 + 1, "lowpass_blend: kept_w must be in [1, W/2 + 1], got ", kept_w);
  auto diff = at::empty(z.sizes(), z.options().dtype(at::kFloat));
  diff_cpu(z, z_ref, diff);
  auto band = at::fft_rfft(diff, W, -1).narrow(-1, 0, kept_w);
  band = at::fft_ifft(at::fft_fft(band, H, -2).mul_(mask_h), H, -2);
  auto lowpassed = at::fft_irfft(at::constant_pad_nd(band, {0, W / 2 + 1 - kept_w}), W, -1);
  auto out = at::empty(z.sizes(), z.options().memory_format(at::MemoryFormat::Contiguous));
  blend_cpu(z, lowpassed.contiguous(), gain, out);
  return out;
}

}  // namespace

at::Tensor lowpass_blend_lowrank_pipeline(const at::Tensor& z, const at::Tensor& z_ref, const at::Tensor& cos_h,
                                          const at::Tensor& sin_h, const at::Tensor& cos_w, const at::Tensor& sin_w,
                                          double gain, const LowpassStages& stages) {
  check_inputs(z, z_ref);
  const int64_t planes = z.size(0) * z.size(1), H = z.size(2), W = z.size(3);
  const int64_t even_h = lowpass::even_len(H), odd_h = lowpass::odd_len(H);
  const int64_t even_w = lowpass::even_len(W), odd_w = lowpass::odd_len(W);
  check_basis("cos_h", cos_h, even_h);
  check_basis("sin_h", sin_h, odd_h);
  check_basis("cos_w", cos_w, even_w);
  check_basis("sin_w", sin_w, odd_w);
  const int64_t cos_rank_w = cos_w.size(1), sin_rank_w = sin_w.size(1), rank_w = cos_rank_w + sin_rank_w;
  const auto f32 = z.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous);

  // One (P*H, W) float32 workspace holds the folded difference, then the folded
  // low-pass; for float32 on the CPU it is the output itself (fresh pages are costly).
  auto out = at::empty(z.sizes(), z.options().memory_format(at::MemoryFormat::Contiguous));
  const bool in_out = stages.blend_in_place && z.scalar_type() == at::kFloat;
  auto folded = in_out ? out.view({planes * H, W}) : at::empty({planes * H, W}, f32);

  // W analysis: coefficients (P*H, rank_w) = [E C_w | O S_w] of the folded difference.
  stages.fold_diff_w(z, z_ref, folded);
  auto coeffs = at::empty({planes * H, rank_w}, f32);
  mm_into(coeffs.narrow(1, 0, cos_rank_w), folded.narrow(1, 0, even_w), cos_w);
  mm_into(coeffs.narrow(1, cos_rank_w, sin_rank_w), folded.narrow(1, even_w, odd_w), sin_w);

  // H analysis and synthesis on the small (P, H, rank_w) coefficients.
  auto coeffs3 = coeffs.view({planes, H, rank_w});
  auto folded_h = at::empty_like(coeffs3);
  stages.fold_h(coeffs3, folded_h);
  auto band_cos = at::matmul(cos_h.t(), folded_h.narrow(1, 0, even_h));
  auto band_sin = at::matmul(sin_h.t(), folded_h.narrow(1, even_h, odd_h));
  auto synth_h = at::empty_like(coeffs3);
  mm_into(synth_h.narrow(1, 0, even_h), cos_h, band_cos);
  mm_into(synth_h.narrow(1, even_h, odd_h), sin_h, band_sin);
  auto lowpassed_coeffs = at::empty_like(coeffs3);
  stages.unfold_h(synth_h, lowpassed_coeffs);

  // W synthesis into the folded layout, then unfold + blend + cast in one pass.
  auto lp_coeffs = lowpassed_coeffs.view({planes * H, rank_w});
  mm_into(folded.narrow(1, 0, even_w), lp_coeffs.narrow(1, 0, cos_rank_w), cos_w.t());
  mm_into(folded.narrow(1, even_w, odd_w), lp_coeffs.narrow(1, cos_rank_w, sin_rank_w), sin_w.t());
  stages.unfold_w_blend(z, folded, gain, out);
  return out;
}

}  // namespace fam

TORCH_LIBRARY_FRAGMENT(fam_C, m) {
  m.def(
      "lowpass_blend_lowrank(Tensor z, Tensor z_ref, Tensor cos_h, Tensor sin_h, Tensor cos_w, Tensor sin_w, "
      "float gain) -> Tensor");
  m.def("lowpass_blend_spectral(Tensor z, Tensor z_ref, Tensor mask_h, int kept_w, float gain) -> Tensor");
}

TORCH_LIBRARY_IMPL(fam_C, CPU, m) {
  m.impl("lowpass_blend_lowrank", &fam::lowrank_cpu);
  m.impl("lowpass_blend_spectral", &fam::spectral_cpu);
}
