// glue_util.h: small helpers shared by the CUDA glue files (*_glue.cpp):
// torch dtype -> launcher dtype, and the launch check.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

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
inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace cuda
}  // namespace certssb
