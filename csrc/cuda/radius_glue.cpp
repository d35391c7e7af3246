// radius_glue.cpp: the torch side of the radius CUDA kernels: argument checks
// (shared with the CPU kernels, which define them in cpu/radius.cpp), dtype
// conversions, output allocation, device guard and current stream, and the
// registration under the CUDA dispatch key. The kernels themselves are in
// radius_kernel.cu (raw pointers, no torch).
//
// Compiled only when CUDA is built (setup.py adds csrc/cuda/*.cpp then).
// Value checks (scores in [0, 1], counts in [0, models], sigma > 0) would need
// a device-to-host sync here; the kernels turn such rows into NaN with
// abstain = true instead, and the Python wrapper rejects them beforehand.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <tuple>

#include "radius_launch.h"
#include "stats.h"

namespace certssb {
namespace radius {

// Defined in cpu/radius.cpp (always compiled into the same extension).
enum class Bound { kHoeffding, kClopperPearson };
Bound check_certify_args(const at::Tensor& top_score, const at::Tensor& top_count,
                         const at::Tensor& sigma, int64_t models, double alpha,
                         int64_t num_classes, const std::string& bound);
at::ScalarType check_proxy_args(const at::Tensor& mean_probs, const at::Tensor& sigma,
                                double lo, double hi, const char* op);
void check_proxy_grad(const at::Tensor& grad, const at::Tensor& mean_probs);

namespace {

radius_cuda::ProbType prob_type(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return radius_cuda::ProbType::kFloat16;
    case at::kBFloat16: return radius_cuda::ProbType::kBFloat16;
    case at::kFloat: return radius_cuda::ProbType::kFloat32;
    case at::kDouble: return radius_cuda::ProbType::kFloat64;
    default:
      break;
  }
  TORCH_CHECK(false, "certssb radius (CUDA): unsupported mean_probs dtype ", t);
  return radius_cuda::ProbType::kFloat32;  // not reached
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> radius_certify_cuda(
    const at::Tensor& top_score, const at::Tensor& top_count,
    const at::Tensor& sigma, int64_t models, double alpha, int64_t num_classes,
    c10::string_view bound) {
  const Bound kind = check_certify_args(top_score, top_count, sigma, models,
                                        alpha, num_classes, std::string(bound));
  const c10::cuda::CUDAGuard guard(sigma.device());
  const int64_t n = sigma.size(0);
  const auto opts = sigma.options().dtype(at::kDouble);
  at::Tensor pa = at::empty({n}, opts);
  at::Tensor pb = at::empty({n}, opts);
  at::Tensor radius = at::empty({n}, opts);
  at::Tensor abstain = at::empty({n}, opts.dtype(at::kBool));
  if (n == 0) return {pa, pb, radius, abstain};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(sigma.device().index());
  const at::Tensor sigma64 = sigma.to(at::kDouble);
  if (kind == Bound::kHoeffding) {
    const at::Tensor score64 = top_score.to(at::kDouble);
    C10_CUDA_CHECK(radius_cuda::launch_certify_hoeffding(
        score64.const_data_ptr<double>(), score64.stride(0),
        sigma64.const_data_ptr<double>(), sigma64.stride(0), n,
        stats::hoeffding_width(models, alpha), pa.mutable_data_ptr<double>(),
        pb.mutable_data_ptr<double>(), radius.mutable_data_ptr<double>(),
        abstain.mutable_data_ptr<bool>(), stream));
  } else {
    const at::Tensor count64 = top_count.to(at::kLong);
    C10_CUDA_CHECK(radius_cuda::launch_certify_clopper_pearson(
        count64.const_data_ptr<int64_t>(), count64.stride(0),
        sigma64.const_data_ptr<double>(), sigma64.stride(0), n, models,
        alpha / static_cast<double>(num_classes), pa.mutable_data_ptr<double>(),
        pb.mutable_data_ptr<double>(), radius.mutable_data_ptr<double>(),
        abstain.mutable_data_ptr<bool>(), stream));
  }
  return {pa, pb, radius, abstain};
}

at::Tensor radius_proxy_cuda(const at::Tensor& mean_probs, const at::Tensor& sigma,
                             double lo, double hi) {
  const at::ScalarType acc =
      check_proxy_args(mean_probs, sigma, lo, hi, "certssb::radius_proxy");
  const c10::cuda::CUDAGuard guard(mean_probs.device());
  const at::ScalarType out_type =
      at::promote_types(mean_probs.scalar_type(), sigma.scalar_type());
  const int64_t rows = mean_probs.size(0);
  at::Tensor out = at::empty({rows}, mean_probs.options().dtype(out_type));
  if (rows == 0) return out;
  const at::Tensor sigma_acc = sigma.to(acc);
  at::Tensor out_acc =
      out_type == acc ? out : at::empty({rows}, out.options().dtype(acc));
  C10_CUDA_CHECK(radius_cuda::launch_proxy_forward(
      mean_probs.const_data_ptr(), prob_type(mean_probs.scalar_type()), rows,
      mean_probs.size(1), mean_probs.stride(0), mean_probs.stride(1),
      sigma_acc.const_data_ptr(), sigma_acc.stride(0), acc == at::kDouble, lo, hi,
      out_acc.mutable_data_ptr(),
      c10::cuda::getCurrentCUDAStream(mean_probs.device().index())));
  if (!out_acc.is_same(out)) out.copy_(out_acc);
  return out;
}

std::tuple<at::Tensor, at::Tensor> radius_proxy_backward_cuda(
    const at::Tensor& grad, const at::Tensor& mean_probs, const at::Tensor& sigma,
    double lo, double hi) {
  const at::ScalarType acc = check_proxy_args(mean_probs, sigma, lo, hi,
                                              "certssb::radius_proxy_backward");
  check_proxy_grad(grad, mean_probs);
  const c10::cuda::CUDAGuard guard(mean_probs.device());
  const int64_t rows = mean_probs.size(0);
  const int64_t cols = mean_probs.size(1);
  at::Tensor grad_probs = at::empty({rows, cols}, mean_probs.options());
  at::Tensor grad_sigma = at::empty({rows}, sigma.options());
  if (rows == 0) return {grad_probs, grad_sigma};
  const at::Tensor sigma_acc = sigma.to(acc);
  const at::Tensor grad_acc = grad.to(acc);
  at::Tensor gsig_acc = sigma.scalar_type() == acc
                            ? grad_sigma
                            : at::empty({rows}, grad_sigma.options().dtype(acc));
  C10_CUDA_CHECK(radius_cuda::launch_proxy_backward(
      grad_acc.const_data_ptr(), grad_acc.stride(0), mean_probs.const_data_ptr(),
      prob_type(mean_probs.scalar_type()), rows, cols, mean_probs.stride(0),
      mean_probs.stride(1), sigma_acc.const_data_ptr(), sigma_acc.stride(0),
      acc == at::kDouble, lo, hi, grad_probs.mutable_data_ptr(),
      gsig_acc.mutable_data_ptr(),
      c10::cuda::getCurrentCUDAStream(mean_probs.device().index())));
  if (!gsig_acc.is_same(grad_sigma)) grad_sigma.copy_(gsig_acc);
  return {grad_probs, grad_sigma};
}

}  // namespace
}  // namespace radius
}  // namespace certssb

TORCH_LIBRARY_IMPL(certssb, CUDA, m) {
  m.impl("radius_certify", &certssb::radius::radius_certify_cuda);
  m.impl("radius_proxy", &certssb::radius::radius_proxy_cuda);
  m.impl("radius_proxy_backward", &certssb::radius::radius_proxy_backward_cuda);
}
