// noise_glue.cpp: registers the CUDA kernels of certssb::noise and
// certssb::noise_sigma_grad (noise_kernel.cu): argument checks (checks.h,
// shared with the CPU kernels), layout, current stream and device, launch check.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/glue_util.h"

namespace certssb {
namespace {

at::Tensor noise_cuda(const at::Tensor& x, const at::Tensor& sigma, const at::Tensor& ids,
                      int64_t seed, int64_t stream, int64_t k0, int64_t models) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = checks::noise_args(x, sigma, ids, stream, k0, models);
  if (out.numel() == 0) return out;
  const at::Tensor x_c = x.contiguous();
  const at::Tensor ids_c = ids.contiguous();
  const int64_t B = x.size(0);
  const at::Tensor sig = sigma.to(at::toOpMathType(x.scalar_type())).contiguous();
  cuda::check_launch("noise",
      cuda::launch_noise(cuda::launcher_dtype(x.scalar_type(), "noise"), x_c.data_ptr(),
                         sig.data_ptr(), ids_c.data_ptr<int64_t>(), out.data_ptr(), models, B,
                         x_c.numel() / B, static_cast<uint64_t>(seed),
                         static_cast<uint32_t>(stream), static_cast<uint32_t>(k0),
                         cuda::current_stream()));
  return out;
}

at::Tensor noise_sigma_grad_cuda(const at::Tensor& grad, const at::Tensor& ids, int64_t seed,
                                 int64_t stream, int64_t k0) {
  const c10::cuda::CUDAGuard guard(grad.device());
  const checks::SigmaGradArgs a = checks::noise_sigma_grad_args(grad, ids, stream, k0);
  if (a.empty()) return a.out;
  const at::Tensor g = grad.contiguous();
  const at::Tensor ids_c = ids.contiguous();
  cuda::check_launch("noise_sigma_grad",
      cuda::launch_noise_sigma_grad(cuda::launcher_dtype(g.scalar_type(), "noise_sigma_grad"),
                                    g.data_ptr(), ids_c.data_ptr<int64_t>(), a.out.data_ptr(), a.K,
                                    a.B, a.D, static_cast<uint64_t>(seed),
                                    static_cast<uint32_t>(stream), static_cast<uint32_t>(k0),
                                    cuda::current_stream()));
  return a.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(certssb, CUDA, m) { m.impl("noise", &noise_cuda).impl("noise_sigma_grad", &noise_sigma_grad_cuda); }

}  // namespace certssb
