// CUDA implementation of fam_C::lowpass_blend_lowrank: the shared GEMM pipeline
// (csrc/cpu/lowpass_blend.cpp, cuBLAS through at::mm here) around the elementwise
// kernels of lowpass_blend.cu. The schema is defined with the CPU kernels.
// Only device-generic c10 headers (c10/cuda needs a CUDA build of torch to even
// parse, and tools/check_cuda.sh checks this file against the CPU one).
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "fam/lowpass_math.h"
#include "fam/lowpass_pipeline.h"

namespace fam {
namespace lowpass {

// Defined in lowpass_blend.cu.
cudaError_t launch_fold_diff_w(FloatKind kind, const void* z, RowAddressing za, const void* z_ref, RowAddressing ra,
                               int64_t rows, int n, float* folded, cudaStream_t stream);
cudaError_t launch_transform_h(bool fold, const float* x, int64_t outer, int n, int64_t inner, float* out,
                               cudaStream_t stream);
cudaError_t launch_unfold_w_blend(FloatKind kind, const void* z, RowAddressing za, const float* folded, int64_t rows,
                                  int n, float gain, void* out, cudaStream_t stream);

}  // namespace lowpass

namespace {

using lowpass::FloatKind;
using lowpass::RowAddressing;

FloatKind kind_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return FloatKind::kFloat32;
    case at::kHalf:
      return FloatKind::kFloat16;
    case at::kBFloat16:
      return FloatKind::kBFloat16;
    default:
      TORCH_CHECK(false, "lowpass_blend: z must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

RowAddressing addressing(const at::Tensor& t) {
  return RowAddressing{t.size(1), t.size(2), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

int64_t rows_of(const at::Tensor& t) { return t.size(0) * t.size(1) * t.size(2); }

// The current torch stream of the current device (the guard in lowrank_cuda sets it).
cudaStream_t stream() {
  const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl.getStream(impl.getDevice()).native_handle());
}

void check(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "lowpass_blend CUDA kernel: ", cudaGetErrorString(err)); }

void fold_diff_w_cuda(const at::Tensor& z, const at::Tensor& z_ref, const at::Tensor& folded) {
  check(lowpass::launch_fold_diff_w(kind_of(z), z.const_data_ptr(), addressing(z), z_ref.const_data_ptr(),
                                             addressing(z_ref), rows_of(z), static_cast<int>(z.size(3)),
                                             folded.data_ptr<float>(), stream()));
}

void transform_h_cuda(bool fold, const at::Tensor& x, const at::Tensor& out) {
  check(lowpass::launch_transform_h(fold, x.const_data_ptr<float>(), x.size(0), static_cast<int>(x.size(1)),
                                             x.size(2), out.data_ptr<float>(), stream()));
}

void fold_h_cuda(const at::Tensor& x, const at::Tensor& out) { transform_h_cuda(true, x, out); }
void unfold_h_cuda(const at::Tensor& x, const at::Tensor& out) { transform_h_cuda(false, x, out); }

void unfold_w_blend_cuda(const at::Tensor& z, const at::Tensor& folded, double gain, const at::Tensor& out) {
  check(lowpass::launch_unfold_w_blend(kind_of(z), z.const_data_ptr(), addressing(z),
                                                folded.const_data_ptr<float>(), rows_of(z),
                                                static_cast<int>(z.size(3)), static_cast<float>(gain),
                                                out.data_ptr(), stream()));
}

// One thread per mirror pair: a pair's writes would race other pairs' reads, so never in place.
const LowpassStages kCudaStages{fold_diff_w_cuda, fold_h_cuda, unfold_h_cuda, unfold_w_blend_cuda,
                                /*blend_in_place=*/false};

at::Tensor lowrank_cuda(const at::Tensor& z, const at::Tensor& z_ref, const at::Tensor& cos_h, const at::Tensor& sin_h,
                        const at::Tensor& cos_w, const at::Tensor& sin_w, double gain) {
  const c10::DeviceGuard guard(z.device());
  return lowpass_blend_lowrank_pipeline(z, z_ref, cos_h, sin_h, cos_w, sin_w, gain, kCudaStages);
}

}  // namespace
}  // namespace fam

TORCH_LIBRARY_IMPL(fam_C, CUDA, m) { m.impl("lowpass_blend_lowrank", &fam::lowrank_cuda); }
