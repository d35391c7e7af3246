// radius_launch.h: host launchers of the radius CUDA kernels
// (cuda/radius_kernel.cu), called by the torch glue (cuda/radius_glue.cpp).
//
// They take raw pointers, element strides and a stream, so the kernel file
// needs no torch header. Every launcher returns the launch status
// (cudaGetLastError) and launches nothing for an empty input. Inputs may be
// strided (a stride of 0 broadcasts one value); outputs are contiguous.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace certssb {
namespace radius_cuda {

// Storage type of mean_probs (and of grad_mean_probs).
enum class ProbType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

// Hoeffding certificate: pa = clamp(top_score - width, 0, 1), then pb_upper,
// radius, abstain as in radius_certify. Rows whose top_score is outside
// [-1e-6, 1 + 1e-6] or whose sigma is not in (0, 1e300] get NaN outputs and
// abstain = true (the Python wrapper rejects such inputs first).
cudaError_t launch_certify_hoeffding(const double* top_score, int64_t score_stride,
                                     const double* sigma, int64_t sigma_stride,
                                     int64_t n, double width, double* pa_lower,
                                     double* pb_upper, double* radius,
                                     bool* abstain, cudaStream_t stream);

// Clopper-Pearson certificate at `level` (= alpha / num_classes): pa = the
// level quantile of Beta(k, models - k + 1), 0 for k = 0. Rows with k outside
// [0, models] or an invalid sigma get NaN outputs and abstain = true.
cudaError_t launch_certify_clopper_pearson(const int64_t* top_count,
                                           int64_t count_stride,
                                           const double* sigma,
                                           int64_t sigma_stride, int64_t n,
                                           int64_t models, double level,
                                           double* pa_lower, double* pb_upper,
                                           double* radius, bool* abstain,
                                           cudaStream_t stream);

// Radius proxy out[b] = sigma[b] / 2 * (PhiInv(clamp(pA)) - PhiInv(clamp(pB))).
// mean_probs: [rows, cols] of `type` with the given strides. sigma and out are
// double when acc_double, else float (the compute type). NaN rows give NaN.
cudaError_t launch_proxy_forward(const void* mean_probs, ProbType type,
                                 int64_t rows, int64_t cols, int64_t row_stride,
                                 int64_t col_stride, const void* sigma,
                                 int64_t sigma_stride, bool acc_double,
                                 double lo, double hi, void* out,
                                 cudaStream_t stream);

// Its gradient. grad and sigma are of the compute type (strided);
// grad_mean_probs is [rows, cols] contiguous of `type`, grad_sigma [rows] of
// the compute type.
cudaError_t launch_proxy_backward(const void* grad, int64_t grad_stride,
                                  const void* mean_probs, ProbType type,
                                  int64_t rows, int64_t cols, int64_t row_stride,
                                  int64_t col_stride, const void* sigma,
                                  int64_t sigma_stride, bool acc_double,
                                  double lo, double hi, void* grad_mean_probs,
                                  void* grad_sigma, cudaStream_t stream);

}  // namespace radius_cuda
}  // namespace certssb
