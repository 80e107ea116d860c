// The low-rank lowpass_blend pipeline, written once for every device: four GEMM
// stages (at::mm / at::bmm: BLAS on the CPU, cuBLAS on CUDA) around the device's
// fused elementwise stages (fold, unfold, blend; see fam/lowpass_math.h).
// Defined in csrc/cpu/lowpass_blend.cpp; the CUDA binding passes its own stages.
#pragma once

#include <ATen/ATen.h>

namespace fam {

struct LowpassStages {
  // folded (P*H, W) float32 <- z_ref - z, folded along W. z, z_ref: (B, C, H, W), any strides.
  void (*fold_diff_w)(const at::Tensor& z, const at::Tensor& z_ref, const at::Tensor& folded);
  // out <- x folded / unfolded along dim 1; x, out: (A, n, I) contiguous float32.
  void (*fold_h)(const at::Tensor& x, const at::Tensor& out);
  void (*unfold_h)(const at::Tensor& x, const at::Tensor& out);
  // out (B, C, H, W) contiguous, z's dtype <- z + gain * (folded (P*H, W) unfolded along W).
  void (*unfold_w_blend)(const at::Tensor& z, const at::Tensor& folded, double gain, const at::Tensor& out);
  // unfold_w_blend may read `folded` from the memory of a float32 `out` it writes.
  bool blend_in_place;
};

// z + gain * B_h B_h^T (z_ref - z) B_w B_w^T per plane, with the folded bases of
// fam_kernels/_lowpass_basis.py (cos_*: (n/2 + 1, n_cos), sin_*: ((n-1)/2, n_sin), float32).
at::Tensor lowpass_blend_lowrank_pipeline(const at::Tensor& z, const at::Tensor& z_ref, const at::Tensor& cos_h,
                                          const at::Tensor& sin_h, const at::Tensor& cos_w, const at::Tensor& sin_w,
                                          double gain, const LowpassStages& stages);

}  // namespace fam
