// launch.h: the raw-pointer launchers of the noise and vote CUDA kernels
// (noise_kernel.cu, vote_kernel.cu), called by the torch glue
// (noise_glue.cpp, vote_glue.cpp). Only CUDA runtime types cross this line,
// so the kernel files compile with plain `nvcc -c` and no torch headers.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace certssb {
namespace cuda {

// Element types the kernels read and write; the glue maps torch dtypes here.
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

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

}  // namespace cuda
}  // namespace certssb
