// vote_kernel.cu: CUDA kernels of certssb::vote_accumulate and certssb::vote_top2.
//
// One thread per input row b adds the Mc models in order with the arithmetic
// of vote_math.h (the CPU kernel's), so the integer accumulators are
// deterministic. Raw pointers and cuda_runtime.h only (`nvcc -c -I csrc`).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/launch.h"
#include "vote_math.h"

namespace certssb {
namespace cuda {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kMaxBlocks = 65535LL * 8;

template <typename T> __device__ __forceinline__ double to_double(T v) {
  return static_cast<double>(v);
}
template <> __device__ __forceinline__ double to_double<__half>(__half v) {
  return static_cast<double>(__half2float(v));
}
template <> __device__ __forceinline__ double to_double<__nv_bfloat16>(__nv_bfloat16 v) {
  return static_cast<double>(__bfloat162float(v));
}

template <typename T>
__global__ void vote_accumulate_kernel(const T* __restrict__ logits, int64_t sm, int64_t sb,
                                       int64_t sc, int64_t* __restrict__ soft,
                                       int64_t* __restrict__ hard, int64_t M, int64_t B,
                                       int64_t C) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < B;
       b += step) {
    for (int64_t k = 0; k < M; ++k) {
      const T* row = logits + k * sm + b * sb;
      vote::accumulate_row([&](int64_t c) { return to_double<T>(row[c * sc]); }, C, soft + b * C,
                           hard + b * C);
    }
  }
}

__global__ void vote_top2_kernel(const int64_t* __restrict__ soft, const int64_t* __restrict__ hard,
                                 bool by_count, int64_t* __restrict__ cls,
                                 int64_t* __restrict__ units, int64_t* __restrict__ counts,
                                 int64_t B, int64_t C) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < B;
       b += step) {
    vote::top2_store(soft, hard, by_count, b, C, cls, units, counts);
  }
}

unsigned grid_for(int64_t rows) {
  int64_t blocks = (rows + kThreads - 1) / kThreads;
  blocks = blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks);
  return static_cast<unsigned>(blocks);
}

template <typename T>
cudaError_t accumulate_typed(const void* logits, int64_t sm, int64_t sb, int64_t sc, int64_t* soft,
                             int64_t* hard, int64_t M, int64_t B, int64_t C, cudaStream_t s) {
  if (M == 0 || B == 0) return cudaSuccess;
  vote_accumulate_kernel<T><<<grid_for(B), kThreads, 0, s>>>(static_cast<const T*>(logits), sm, sb,
                                                             sc, soft, hard, M, B, C);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_vote_accumulate(DType dtype, const void* logits, int64_t sm, int64_t sb,
                                   int64_t sc, int64_t* soft, int64_t* hard, int64_t M, int64_t B,
                                   int64_t C, cudaStream_t s) {
  return dispatch_dtype(dtype, [&](auto tag) {
    return accumulate_typed<decltype(tag)>(logits, sm, sb, sc, soft, hard, M, B, C, s);
  });
}

cudaError_t launch_vote_top2(const int64_t* soft, const int64_t* hard, bool by_count,
                             int64_t* cls, int64_t* units, int64_t* counts, int64_t B, int64_t C,
                             cudaStream_t s) {
  if (B == 0) return cudaSuccess;
  vote_top2_kernel<<<grid_for(B), kThreads, 0, s>>>(soft, hard, by_count, cls, units, counts, B, C);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace certssb
