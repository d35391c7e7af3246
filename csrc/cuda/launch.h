// launch.h: the raw-pointer launchers of every CUDA kernel (noise_kernel.cu,
// vote_kernel.cu, radius_kernel.cu), called by the torch glue (*_glue.cpp,
// which maps torch dtypes to DType and checks the returned status with
// glue_util.h's check_launch). Only CUDA runtime types cross this line, so the
// kernel files compile with plain `nvcc -c` and no torch headers.
//
// Every launcher returns the launch status (cudaGetLastError) and launches
// nothing for an empty input.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace certssb {
namespace cuda {

// Element types the kernels read and write; the glue maps torch dtypes here.
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

#if defined(__CUDACC__)
// Kernel files: returns f(T{}) for the element type T named by `dtype`.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat64: return f(double{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}
#endif

// out[k, b, e] = x[b, e] + sigma[b] * eps(seed, stream, k0 + k, ids[b], e).
// x: [B, D] contiguous of `dtype`; sigma: [B] of the arithmetic type
// (double for kFloat64, float otherwise); out: [K, B, D] of `dtype`.
cudaError_t launch_noise(DType dtype, const void* x, const void* sigma, const int64_t* ids,
                         void* out, int64_t K, int64_t B, int64_t D, uint64_t seed,
                         uint32_t stream, uint32_t k0, cudaStream_t cuda_stream);

// out[b] = sum_k sum_e grad[k, b, e] * eps(seed, stream, k0 + k, ids[b], e), eps
// cast to `dtype` as in the forward; out: [B] of the arithmetic type.
cudaError_t launch_noise_sigma_grad(DType dtype, const void* grad, const int64_t* ids, void* out,
                                    int64_t K, int64_t B, int64_t D, uint64_t seed,
                                    uint32_t stream, uint32_t k0, cudaStream_t cuda_stream);

// soft[b, c] += units of softmax(logits[k, b, :])_c and hard[b, argmax] += 1 for
// k < M; logits read through strides (elements) sm, sb, sc.
cudaError_t launch_vote_accumulate(DType dtype, const void* logits, int64_t sm, int64_t sb,
                                   int64_t sc, int64_t* soft, int64_t* hard, int64_t M, int64_t B,
                                   int64_t C, cudaStream_t cuda_stream);

// Top-2 of each row of (by_count ? hard : soft), [B, C] contiguous; outputs [B, 2].
cudaError_t launch_vote_top2(const int64_t* soft, const int64_t* hard, bool by_count,
                             int64_t* cls, int64_t* units, int64_t* counts, int64_t B, int64_t C,
                             cudaStream_t cuda_stream);

// ---- radius ops. Inputs may be strided (a stride of 0 broadcasts one value);
// outputs are contiguous.

// A strided [n] input; the stride counts elements.
template <typename T>
struct Strided {
  const T* data;
  int64_t stride;
};

// The four [n] outputs of radius_certify.
struct CertOut {
  double* pa_lower;
  double* pb_upper;
  double* radius;
  bool* abstain;
};

// Hoeffding certificate: pa = clamp(top_score - width, 0, 1), then pb_upper,
// radius, abstain as in radius_certify. Rows whose top_score is outside
// [-1e-6, 1 + 1e-6] or whose sigma is not in (0, 1e300] get NaN outputs and
// abstain = true (the Python wrapper rejects such inputs first).
cudaError_t launch_certify_hoeffding(Strided<double> top_score, Strided<double> sigma, int64_t n,
                                     double width, CertOut out, cudaStream_t cuda_stream);

// Clopper-Pearson certificate at `level` (= alpha / num_classes): pa = the
// level quantile of Beta(k, models - k + 1), 0 for k = 0. Rows with k outside
// [0, models] or an invalid sigma get NaN outputs and abstain = true.
cudaError_t launch_certify_clopper_pearson(Strided<int64_t> top_count, Strided<double> sigma,
                                           int64_t n, int64_t models, double level, CertOut out,
                                           cudaStream_t cuda_stream);

// The inputs of the radius proxy: mean_probs [rows, cols] of `dtype` with the
// given strides; sigma (strided) of the compute type, double when acc_double,
// else float; the clamp [lo, hi].
struct ProxyIn {
  const void* mean_probs;
  DType dtype;
  int64_t rows, cols, row_stride, col_stride;
  const void* sigma;
  int64_t sigma_stride;
  bool acc_double;
  double lo, hi;
};

// Radius proxy out[b] = sigma[b] / 2 * (PhiInv(clamp(pA)) - PhiInv(clamp(pB))),
// out [rows] of the compute type. NaN rows give NaN.
cudaError_t launch_proxy_forward(const ProxyIn& in, void* out, cudaStream_t cuda_stream);

// Its gradient. grad (strided) is of the compute type; grad_mean_probs is
// [rows, cols] contiguous of in.dtype, grad_sigma [rows] of the compute type.
cudaError_t launch_proxy_backward(const ProxyIn& in, const void* grad, int64_t grad_stride,
                                  void* grad_mean_probs, void* grad_sigma,
                                  cudaStream_t cuda_stream);

}  // namespace cuda
}  // namespace certssb
