// glue_util.h: small helpers shared by the CUDA glue files (*_glue.cpp):
// torch dtype -> launcher dtype, the current stream, and the launch check
// (every launcher's status goes through check_launch).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/launch.h"

namespace certssb {
namespace cuda {

inline DType launcher_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t,
                         "; use float32, float64, float16 or bfloat16");
  }
}

// Fails with the CUDA error string when a launcher reported one.
inline void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// The current stream of the current device (the glue sets the device first).
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace cuda
}  // namespace certssb
