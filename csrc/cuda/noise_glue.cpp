// noise_glue.cpp: registers the CUDA kernels of certssb::noise and
// certssb::noise_sigma_grad (noise_kernel.cu): argument checks, layout,
// current stream and device, launch check.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "cuda/glue_util.h"

namespace certssb {
namespace {

void check_words(int64_t stream, int64_t k0, int64_t models, const char* op) {
  TORCH_CHECK(stream >= 0 && stream <= 0xffffffffLL, op, ": stream must lie in [0, 2^32), got ",
              stream);
  TORCH_CHECK(models >= 0, op, ": models must be >= 0, got ", models);
  TORCH_CHECK(k0 >= 0 && k0 + std::max<int64_t>(models, 1) - 1 <= 0xffffffffLL, op,
              ": model indices k0 .. k0 + models - 1 must lie in [0, 2^32), got k0 = ", k0,
              " and models = ", models);
}

void check_ids(const at::Tensor& ids, int64_t B, const at::Device& dev, const char* op) {
  TORCH_CHECK(ids.device() == dev, op, ": ids must be on ", dev, " like the data, got ",
              ids.device());
  TORCH_CHECK(ids.scalar_type() == at::kLong, op, ": ids must be int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == B, op, ": ids must have shape [", B, "], got ",
              ids.sizes());
}

at::Tensor noise_cuda(const at::Tensor& x, const at::Tensor& sigma, const at::Tensor& ids,
                      int64_t seed, int64_t stream, int64_t k0, int64_t models) {
  TORCH_CHECK(x.is_cuda(), "noise: x must be a CUDA tensor for the CUDA kernel");
  TORCH_CHECK(sigma.device() == x.device(), "noise: sigma must be on ", x.device(),
              " like x, got ", sigma.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "noise: x must be floating, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "noise: x must have a batch dimension [B, ...], got a scalar");
  TORCH_CHECK(at::isFloatingType(sigma.scalar_type()), "noise: sigma must be floating, got ",
              sigma.scalar_type());
  const int64_t B = x.size(0);
  TORCH_CHECK(sigma.dim() == 1 && sigma.size(0) == B, "noise: sigma must have shape [", B,
              "], got ", sigma.sizes());
  check_ids(ids, B, x.device(), "noise");
  check_words(stream, k0, models, "noise");
  const c10::cuda::CUDAGuard guard(x.device());
  std::vector<int64_t> shape{models};
  shape.insert(shape.end(), x.sizes().begin(), x.sizes().end());
  at::Tensor out = at::empty(shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor x_c = x.contiguous();
  const at::Tensor ids_c = ids.contiguous();
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor sig = sigma.to(acc).contiguous();
  cuda::check_launch(
      cuda::launch_noise(cuda::launcher_dtype(x.scalar_type(), "noise"), x_c.data_ptr(),
                         sig.data_ptr(), ids_c.data_ptr<int64_t>(), out.data_ptr(), models, B,
                         x_c.numel() / B, static_cast<uint64_t>(seed),
                         static_cast<uint32_t>(stream), static_cast<uint32_t>(k0),
                         c10::cuda::getCurrentCUDAStream().stream()),
      "noise");
  return out;
}

at::Tensor noise_sigma_grad_cuda(const at::Tensor& grad, const at::Tensor& ids, int64_t seed,
                                 int64_t stream, int64_t k0) {
  TORCH_CHECK(grad.is_cuda(), "noise_sigma_grad: grad_out must be a CUDA tensor");
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()),
              "noise_sigma_grad: grad_out must be floating, got ", grad.scalar_type());
  TORCH_CHECK(grad.dim() >= 2, "noise_sigma_grad: grad_out must have shape [K, B, ...], got ",
              grad.sizes());
  const int64_t K = grad.size(0);
  const int64_t B = grad.size(1);
  check_ids(ids, B, grad.device(), "noise_sigma_grad");
  check_words(stream, k0, K, "noise_sigma_grad");
  const c10::cuda::CUDAGuard guard(grad.device());
  const auto acc = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::zeros({B}, grad.options().dtype(acc));
  if (B == 0 || K == 0 || grad.numel() == 0) return out;
  const at::Tensor g = grad.contiguous();
  const at::Tensor ids_c = ids.contiguous();
  cuda::check_launch(
      cuda::launch_noise_sigma_grad(cuda::launcher_dtype(g.scalar_type(), "noise_sigma_grad"),
                                    g.data_ptr(), ids_c.data_ptr<int64_t>(), out.data_ptr(), K, B,
                                    g.numel() / (K * B), static_cast<uint64_t>(seed),
                                    static_cast<uint32_t>(stream), static_cast<uint32_t>(k0),
                                    c10::cuda::getCurrentCUDAStream().stream()),
      "noise_sigma_grad");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(certssb, CUDA, m) {
  m.impl("noise", &noise_cuda);
  m.impl("noise_sigma_grad", &noise_sigma_grad_cuda);
}

}  // namespace certssb
