// radius_glue.cpp: the torch side of the radius CUDA kernels: argument checks
// (checks.h, shared with the CPU kernels), dtype
// conversions, output allocation, device guard and current stream, and the
// registration under the CUDA dispatch key. The kernels themselves are in
// radius_kernel.cu (raw pointers, no torch).
//
// Compiled only when CUDA is built (setup.py adds csrc/cuda/*.cpp then).
// Value checks (scores in [0, 1], counts in [0, models], sigma > 0) would need
// a device-to-host sync here; the kernels turn such rows into NaN with
// abstain = true instead, and the Python wrapper rejects them beforehand.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <tuple>

#include "checks.h"
#include "cuda/glue_util.h"
#include "stats.h"

namespace certssb {
namespace radius {
namespace {

using checks::Bound;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> radius_certify_cuda(
    const at::Tensor& top_score, const at::Tensor& top_count,
    const at::Tensor& sigma, int64_t models, double alpha, int64_t num_classes,
    c10::string_view bound) {
  const Bound kind = checks::certify_args(top_score, top_count, sigma, models, alpha,
                                          num_classes, std::string(bound));
  const c10::cuda::CUDAGuard guard(sigma.device());
  const checks::CertifyOut out = checks::certify_outputs(sigma);
  const int64_t n = sigma.size(0);
  if (n == 0) return out.tuple();
  const cudaStream_t stream = cuda::current_stream();
  const at::Tensor sigma64 = sigma.to(at::kDouble);
  const cuda::Strided<double> sig{sigma64.const_data_ptr<double>(), sigma64.stride(0)};
  const cuda::CertOut dst{out.pa.mutable_data_ptr<double>(), out.pb.mutable_data_ptr<double>(),
                          out.radius.mutable_data_ptr<double>(),
                          out.abstain.mutable_data_ptr<bool>()};
  if (kind == Bound::kHoeffding) {
    const at::Tensor score64 = top_score.to(at::kDouble);
    cuda::check_launch("certssb::radius_certify",
        cuda::launch_certify_hoeffding({score64.const_data_ptr<double>(), score64.stride(0)}, sig,
                                       n, stats::hoeffding_width(models, alpha), dst, stream));
  } else {
    const at::Tensor count64 = top_count.to(at::kLong);
    cuda::check_launch("certssb::radius_certify",
        cuda::launch_certify_clopper_pearson(
            {count64.const_data_ptr<int64_t>(), count64.stride(0)}, sig, n, models,
            alpha / static_cast<double>(num_classes), dst, stream));
  }
  return out.tuple();
}

// The launcher view of checked proxy arguments.
cuda::ProxyIn proxy_in(const checks::ProxyArgs& a, const at::Tensor& mean_probs, double lo,
                       double hi) {
  return cuda::ProxyIn{mean_probs.const_data_ptr(),
                       cuda::launcher_dtype(mean_probs.scalar_type(), "certssb::radius_proxy"),
                       a.rows, a.cols, mean_probs.stride(0), mean_probs.stride(1),
                       a.sigma_acc.const_data_ptr(), a.sigma_acc.stride(0),
                       a.acc == at::kDouble, lo, hi};
}

at::Tensor radius_proxy_cuda(const at::Tensor& mean_probs, const at::Tensor& sigma,
                             double lo, double hi) {
  const c10::cuda::CUDAGuard guard(mean_probs.device());
  const checks::ProxyArgs a = checks::proxy_args(mean_probs, sigma, lo, hi, "certssb::radius_proxy");
  at::Tensor out = at::empty({a.rows}, mean_probs.options().dtype(a.out_type));
  if (a.rows == 0) return out;
  at::Tensor out_acc = checks::in_acc(out, a.acc);
  cuda::check_launch("certssb::radius_proxy",
                     cuda::launch_proxy_forward(proxy_in(a, mean_probs, lo, hi),
                                                out_acc.mutable_data_ptr(), cuda::current_stream()));
  checks::finish_acc(out, out_acc);
  return out;
}

std::tuple<at::Tensor, at::Tensor> radius_proxy_backward_cuda(
    const at::Tensor& grad, const at::Tensor& mean_probs, const at::Tensor& sigma,
    double lo, double hi) {
  const c10::cuda::CUDAGuard guard(mean_probs.device());
  const checks::ProxyBackwardArgs a = checks::proxy_backward_args(grad, mean_probs, sigma, lo, hi);
  if (a.rows == 0) return a.result();
  cuda::check_launch("certssb::radius_proxy_backward",
      cuda::launch_proxy_backward(proxy_in(a, mean_probs, lo, hi), a.grad_acc.const_data_ptr(),
                                  a.grad_acc.stride(0), a.grad_probs.mutable_data_ptr(),
                                  a.grad_sigma_acc.mutable_data_ptr(), cuda::current_stream()));
  return a.result();
}

}  // namespace

TORCH_LIBRARY_IMPL(certssb, CUDA, m) { m.impl("radius_certify", &radius_certify_cuda)
    .impl("radius_proxy", &radius_proxy_cuda).impl("radius_proxy_backward", &radius_proxy_backward_cuda); }

}  // namespace radius
}  // namespace certssb
