// build_check.cu: a raw-pointer CUDA kernel that fills standard normals from
// the Philox stream of csrc/philox.h. It includes only cuda_runtime.h and
// philox.h, so CPU-only CI compile-checks it with plain `nvcc -c -I csrc`;
// the noise kernels of a later issue follow the same pattern.
#include <cuda_runtime.h>

#include "philox.h"

namespace certssb {
namespace {

// out[e] = normal(seed, stream, a, b, e) for e in [0, n), as float.
// One thread per block of four elements (one Philox call); grid-stride loop
// so any capped grid covers any n.
__global__ void fill_normal_kernel(float* __restrict__ out, int64_t n,
                                   uint64_t seed, uint32_t stream, uint32_t a,
                                   uint32_t b) {
  const philox::Key key = philox::split_seed(seed);
  const int64_t blocks = (n + 3) / 4;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t blk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       blk < blocks; blk += step) {
    const philox::Normal4 z = philox::normal4(
        philox::make_counter(stream, a, b, static_cast<uint32_t>(blk)), key);
    const int64_t base = blk * 4;
    for (int j = 0; j < 4 && base + j < n; ++j) {
      out[base + j] = static_cast<float>(z.z[j]);  // cast to dtype last
    }
  }
}

}  // namespace

// Host launcher (raw pointers, explicit stream): the pattern the torch glue
// of later kernels calls. Returns the launch status.
cudaError_t launch_fill_normal(float* out, int64_t n, uint64_t seed,
                               uint32_t stream_id, uint32_t a, uint32_t b,
                               cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;  // empty output: nothing to launch
  constexpr int kThreads = 256;
  constexpr int64_t kMaxBlocks = 4096;  // capped grid, grid-stride loop
  const int64_t blocks_needed = ((n + 3) / 4 + kThreads - 1) / kThreads;
  const int grid = static_cast<int>(blocks_needed < kMaxBlocks ? blocks_needed
                                                               : kMaxBlocks);
  fill_normal_kernel<<<grid, kThreads, 0, stream>>>(out, n, seed, stream_id, a,
                                                    b);
  return cudaGetLastError();
}

}  // namespace certssb
