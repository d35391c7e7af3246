// noise_kernel.cu: CUDA kernels of certssb::noise and certssb::noise_sigma_grad.
//
// Same definition and arithmetic as the CPU kernel (cpu/noise.cpp): Philox4x32-10
// and the polynomial Box-Muller of philox.h in double, eps cast to the output
// dtype, then x + sigma * eps in the arithmetic type. Raw pointers and
// cuda_runtime.h only, so `nvcc -c -I csrc` compiles it without torch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/launch.h"
#include "philox.h"

namespace certssb {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535LL * 8;  // cap; grid-stride loops cover the rest

// Element type <-> arithmetic type (float for half and bfloat16).
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T> __device__ __forceinline__ typename Acc<T>::type to_acc(T v) {
  return static_cast<typename Acc<T>::type>(v);
}
template <> __device__ __forceinline__ float to_acc<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <typename T> __device__ __forceinline__ T from_double(double v) {
  return static_cast<T>(v);
}
template <> __device__ __forceinline__ __half from_double<__half>(double v) {
  return __double2half(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_double<__nv_bfloat16>(double v) {
  return __double2bfloat16(v);
}
template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v) {
  return static_cast<T>(v);
}
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}

// Threads along x cover the Philox blocks of a row (2 consecutive elements
// each); grid rows along y cover the rows (k, b), striding when there are more
// than the grid has. (k, b) advance by carries, not division: 64-bit division
// costs dozens of instructions on the GPU, and this kernel runs near memory speed.
template <typename T>
__global__ void noise_kernel(const T* __restrict__ x, const typename Acc<T>::type* __restrict__ sigma,
                             const int64_t* __restrict__ ids, T* __restrict__ out, int64_t K,
                             int64_t B, int64_t D, uint64_t seed, uint32_t stream, uint32_t k0) {
  using acc = typename Acc<T>::type;
  const philox::Key key = philox::split_seed(seed);
  const int64_t nblk = (D + 1) / 2;
  const int64_t blk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (blk >= nblk) return;
  const int64_t e0 = blk * 2;
  const int64_t dk = gridDim.y / B, db = gridDim.y % B;  // the row stride as (models, inputs)
  int64_t k = blockIdx.y / B, b = blockIdx.y % B;
  for (int64_t row = blockIdx.y; row < K * B; row += gridDim.y, k += dk, b += db) {
    if (b >= B) {
      b -= B;
      k += 1;
    }
    const philox::Normal2 z = philox::box_muller2_poly(philox::philox4x32_10(
        philox::make_counter(stream, k0 + static_cast<uint32_t>(k),
                             static_cast<uint32_t>(ids[b]), static_cast<uint32_t>(blk)),
        key));
    const acc s = sigma[b];
    const T* xr = x + b * D + e0;
    T* outr = out + row * D + e0;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      if (e0 + j < D) {
        const acc eps = to_acc<T>(from_double<T>(z.z[j]));  // cast to dtype first
        outr[j] = from_acc<T>(to_acc<T>(xr[j]) + s * eps);
      }
    }
  }
}

// One block per input b: its threads stride over the K * nblk Philox blocks,
// then a fixed tree reduction in shared memory (deterministic).
template <typename T>
__global__ void noise_sigma_grad_kernel(const T* __restrict__ grad, const int64_t* __restrict__ ids,
                                        typename Acc<T>::type* __restrict__ out, int64_t K,
                                        int64_t B, int64_t D, uint64_t seed, uint32_t stream,
                                        uint32_t k0) {
  __shared__ double partial[kThreads];
  const philox::Key key = philox::split_seed(seed);
  const int64_t nblk = (D + 1) / 2;
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const uint32_t id = static_cast<uint32_t>(ids[b]);
    double total = 0.0;
    for (int64_t i = threadIdx.x; i < K * nblk; i += blockDim.x) {
      const int64_t k = i / nblk;
      const int64_t blk = i - k * nblk;
      const philox::Normal2 z = philox::box_muller2_poly(philox::philox4x32_10(
          philox::make_counter(stream, k0 + static_cast<uint32_t>(k), id,
                               static_cast<uint32_t>(blk)),
          key));
      const T* gr = grad + (k * B + b) * D + blk * 2;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        if (blk * 2 + j < D) {
          total += static_cast<double>(to_acc<T>(gr[j])) *
                   static_cast<double>(to_acc<T>(from_double<T>(z.z[j])));
        }
      }
    }
    partial[threadIdx.x] = total;
    __syncthreads();
    for (int width = kThreads / 2; width > 0; width /= 2) {
      if (threadIdx.x < width) partial[threadIdx.x] += partial[threadIdx.x + width];
      __syncthreads();
    }
    if (threadIdx.x == 0) out[b] = static_cast<typename Acc<T>::type>(partial[0]);
    __syncthreads();  // partial is reused by the next b of this block
  }
}


template <typename T>
cudaError_t noise_typed(const void* x, const void* sigma, const int64_t* ids, void* out, int64_t K,
                        int64_t B, int64_t D, uint64_t seed, uint32_t stream, uint32_t k0,
                        cudaStream_t s) {
  const int64_t nblk = (D + 1) / 2;
  const int64_t rows = K * B;
  if (rows == 0 || nblk == 0) return cudaSuccess;
  // Narrow rows (small D) get narrow thread blocks, so few threads idle at a row's end.
  const int threads = nblk >= 256 ? 256 : (nblk >= 128 ? 128 : 64);
  const int64_t gx = (nblk + threads - 1) / threads;
  if (gx > 0x7fffffffLL) return cudaErrorInvalidValue;
  const int64_t gy = rows < 65535 ? rows : 65535;
  noise_kernel<T><<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), threads, 0, s>>>(
      static_cast<const T*>(x), static_cast<const typename Acc<T>::type*>(sigma), ids,
      static_cast<T*>(out), K, B, D, seed, stream, k0);
  return cudaGetLastError();
}

template <typename T>
cudaError_t sigma_grad_typed(const void* grad, const int64_t* ids, void* out, int64_t K, int64_t B,
                             int64_t D, uint64_t seed, uint32_t stream, uint32_t k0,
                             cudaStream_t s) {
  if (B == 0) return cudaSuccess;
  const int64_t blocks = B < kMaxBlocks ? B : kMaxBlocks;
  noise_sigma_grad_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(
      static_cast<const T*>(grad), ids, static_cast<typename Acc<T>::type*>(out), K, B, D, seed,
      stream, k0);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_noise(DType dtype, const void* x, const void* sigma, const int64_t* ids,
                         void* out, int64_t K, int64_t B, int64_t D, uint64_t seed,
                         uint32_t stream, uint32_t k0, cudaStream_t s) {
  return dispatch_dtype(dtype, [&](auto tag) {
    return noise_typed<decltype(tag)>(x, sigma, ids, out, K, B, D, seed, stream, k0, s);
  });
}

cudaError_t launch_noise_sigma_grad(DType dtype, const void* grad, const int64_t* ids, void* out,
                                    int64_t K, int64_t B, int64_t D, uint64_t seed,
                                    uint32_t stream, uint32_t k0, cudaStream_t s) {
  return dispatch_dtype(dtype, [&](auto tag) {
    return sigma_grad_typed<decltype(tag)>(grad, ids, out, K, B, D, seed, stream, k0, s);
  });
}

}  // namespace cuda
}  // namespace certssb
