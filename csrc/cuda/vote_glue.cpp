// vote_glue.cpp: registers the CUDA kernels of certssb::vote_accumulate and
// certssb::vote_top2 (vote_kernel.cu); argument checks in checks.h, shared
// with the CPU kernels.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/glue_util.h"

namespace certssb {
namespace {

void vote_accumulate_cuda(const at::Tensor& logits, const at::Tensor& soft, const at::Tensor& hard) {
  const auto [M, B, C] = checks::vote_accumulate_args(logits, soft, hard);
  if (M == 0 || B == 0) return;
  const c10::cuda::CUDAGuard guard(logits.device());
  cuda::check_launch("vote_accumulate",
      cuda::launch_vote_accumulate(cuda::launcher_dtype(logits.scalar_type(), "vote_accumulate"),
                                   logits.data_ptr(), logits.stride(0), logits.stride(1),
                                   logits.stride(2), soft.data_ptr<int64_t>(),
                                   hard.data_ptr<int64_t>(), M, B, C,
                                   cuda::current_stream()));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> vote_top2_cuda(const at::Tensor& soft,
                                                              const at::Tensor& hard,
                                                              bool by_count) {
  const c10::cuda::CUDAGuard guard(soft.device());
  auto outs = checks::vote_top2_args(soft, hard);
  const int64_t B = soft.size(0), C = soft.size(1);
  if (B == 0) return outs;
  const at::Tensor s = soft.contiguous(), h = hard.contiguous();
  cuda::check_launch("vote_top2",
      cuda::launch_vote_top2(s.data_ptr<int64_t>(), h.data_ptr<int64_t>(), by_count,
                             std::get<0>(outs).data_ptr<int64_t>(),
                             std::get<1>(outs).data_ptr<int64_t>(),
                             std::get<2>(outs).data_ptr<int64_t>(), B, C,
                             cuda::current_stream()));
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(certssb, CUDA, m) { m.impl("vote_accumulate", &vote_accumulate_cuda).impl("vote_top2", &vote_top2_cuda); }

}  // namespace certssb
