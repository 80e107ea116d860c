// Torch binding of the CUDA Attention Modulation kernel (csrc/cuda/am_attention.cu):
// AvgPool(V) by an ATen reduction, then the native and the high-res passes.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "fam/am_math.h"

namespace fam_cuda_am {

cudaError_t launch_am_attention_pass(const fam::AmPassArgs& a, fam::AmDtype dtype, int64_t pairs, bool blend,
                                     cudaStream_t stream);

namespace {

fam::AmDtype dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return fam::AmDtype::kFloat32;
    case at::kHalf:
      return fam::AmDtype::kFloat16;
    case at::kBFloat16:
      return fam::AmDtype::kBFloat16;
    default:
      TORCH_CHECK(false, "am_attention (cuda): dtype must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// The current torch stream of the current device (set by the guard in am_attention_cuda).
// Device-generic API: the c10/cuda headers are not usable without a CUDA build of torch.
cudaStream_t current_stream() {
  const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl.getStream(impl.getDevice()).native_handle());
}

at::Tensor unit_feature_stride(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

void run_pass(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, const float* native,
              const fam::AmGrid& grid, double lam, double scale, bool blend) {
  fam::AmPassArgs a{};
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.out = out.data_ptr();
  a.native = native;
  a.q_sb = q.stride(0), a.q_sh = q.stride(1), a.q_sn = q.stride(2);
  a.k_sb = k.stride(0), a.k_sh = k.stride(1), a.k_sn = k.stride(2);
  a.v_sb = v.stride(0), a.v_sh = v.stride(1), a.v_sn = v.stride(2);
  a.o_sb = out.stride(0), a.o_sh = out.stride(1), a.o_sn = out.stride(2);
  a.heads = q.size(1);
  a.n_q = q.size(2);
  a.n_k = k.size(2);
  a.d = static_cast<int>(q.size(3));
  a.qk_scale_log2 = static_cast<float>(scale) * fam::kLog2e;
  a.lam = static_cast<float>(lam);
  a.grid = grid;
  const cudaError_t err = launch_am_attention_pass(a, dtype_of(q), q.size(0) * q.size(1), blend,
                                                   current_stream());
  TORCH_CHECK(err == cudaSuccess, "am_attention (cuda): launch failed: ", cudaGetErrorString(err));
}

}  // namespace

at::Tensor am_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                             const at::Tensor& q_lr_in, const at::Tensor& k_lr_in, double lam, int64_t H, int64_t W,
                             int64_t h, int64_t w, double scale) {
  TORCH_CHECK(q_in.dim() == 4 && k_in.sizes() == q_in.sizes() && v_in.sizes() == q_in.sizes(),
              "am_attention: q, k, v must share one (B, heads, N, d) shape");
  TORCH_CHECK(q_lr_in.dim() == 4 && k_lr_in.sizes() == q_lr_in.sizes(), "am_attention: q_lr, k_lr must share one shape");
  TORCH_CHECK(h > 0 && w > 0 && H % h == 0 && W % w == 0 && q_in.size(2) == H * W && q_lr_in.size(2) == h * w,
              "am_attention: token counts must match hr_size and lr_size, integer factors");
  TORCH_CHECK(q_in.size(3) <= 128, "am_attention (cuda): head_dim must be <= 128, got ", q_in.size(3));
  TORCH_CHECK(q_in.size(0) * q_in.size(1) <= 65535, "am_attention (cuda): batch * heads must be <= 65535");
  const c10::DeviceGuard guard(q_in.device());
  const at::Tensor q = unit_feature_stride(q_in), k = unit_feature_stride(k_in), v = unit_feature_stride(v_in);
  const at::Tensor q_lr = unit_feature_stride(q_lr_in), k_lr = unit_feature_stride(k_lr_in);
  const fam::AmGrid grid{H, W, h, w, H / h, W / w};

  const at::Tensor v_pool =
      v.unflatten(2, {h, H / h, w, W / w}).mean({3, 5}, false, at::kFloat).to(v.scalar_type()).flatten(2, 3);
  at::Tensor native = at::empty({q.size(0), q.size(1), h * w, q.size(3)}, q.options().dtype(at::kFloat));
  run_pass(q_lr, k_lr, v_pool, native, nullptr, grid, lam, scale, /*blend=*/false);
  at::Tensor out = at::empty_like(q);
  run_pass(q, k, v, out, native.data_ptr<float>(), grid, lam, scale, /*blend=*/true);
  return out;
}

}  // namespace fam_cuda_am

TORCH_LIBRARY_IMPL(fam_C, CUDA, m) { m.impl("am_attention", &fam_cuda_am::am_attention_cuda); }
