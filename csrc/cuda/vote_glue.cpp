// vote_glue.cpp: registers the CUDA kernels of certssb::vote_accumulate and
// certssb::vote_top2 (vote_kernel.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/glue_util.h"

namespace certssb {
namespace {

void check_accumulators(const at::Tensor& soft, const at::Tensor& hard, int64_t B, int64_t C,
                        const at::Device& dev, const char* op) {
  TORCH_CHECK(soft.device() == dev && hard.device() == dev, op,
              ": soft_units and hard_count must be on ", dev, ", got ", soft.device(), " and ",
              hard.device());
  TORCH_CHECK(soft.scalar_type() == at::kLong && hard.scalar_type() == at::kLong, op,
              ": soft_units and hard_count must be int64 accumulators, got ", soft.scalar_type(),
              " and ", hard.scalar_type());
  TORCH_CHECK(soft.dim() == 2 && hard.dim() == 2 && soft.size(0) == B && soft.size(1) == C &&
                  hard.size(0) == B && hard.size(1) == C,
              op, ": soft_units and hard_count must have shape [", B, ", ", C, "], got ",
              soft.sizes(), " and ", hard.sizes());
}

void vote_accumulate_cuda(const at::Tensor& logits, const at::Tensor& soft, const at::Tensor& hard) {
  TORCH_CHECK(logits.is_cuda(), "vote_accumulate: logits must be a CUDA tensor");
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()),
              "vote_accumulate: logits must be floating, got ", logits.scalar_type());
  TORCH_CHECK(logits.dim() == 3, "vote_accumulate: logits must have shape [Mc, B, C], got ",
              logits.sizes());
  const int64_t M = logits.size(0), B = logits.size(1), C = logits.size(2);
  TORCH_CHECK(C >= 1, "vote_accumulate: logits need at least one class");
  check_accumulators(soft, hard, B, C, logits.device(), "vote_accumulate");
  TORCH_CHECK(soft.is_contiguous() && hard.is_contiguous(),
              "vote_accumulate: the accumulators must be contiguous (they are updated in place)");
  if (M == 0 || B == 0) return;
  const c10::cuda::CUDAGuard guard(logits.device());
  cuda::check_launch(
      cuda::launch_vote_accumulate(cuda::launcher_dtype(logits.scalar_type(), "vote_accumulate"),
                                   logits.data_ptr(), logits.stride(0), logits.stride(1),
                                   logits.stride(2), soft.data_ptr<int64_t>(),
                                   hard.data_ptr<int64_t>(), M, B, C,
                                   c10::cuda::getCurrentCUDAStream().stream()),
      "vote_accumulate");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> vote_top2_cuda(const at::Tensor& soft,
                                                              const at::Tensor& hard,
                                                              bool by_count) {
  TORCH_CHECK(soft.is_cuda(), "vote_top2: soft_units must be a CUDA tensor");
  TORCH_CHECK(soft.dim() == 2, "vote_top2: soft_units must have shape [B, C], got ", soft.sizes());
  const int64_t B = soft.size(0), C = soft.size(1);
  TORCH_CHECK(C >= 2, "vote_top2: needs at least 2 classes, got ", C);
  check_accumulators(soft, hard, B, C, soft.device(), "vote_top2");
  const c10::cuda::CUDAGuard guard(soft.device());
  auto opts = soft.options().dtype(at::kLong);
  at::Tensor cls = at::empty({B, 2}, opts), units = at::empty({B, 2}, opts),
             counts = at::empty({B, 2}, opts);
  if (B == 0) return {cls, units, counts};
  const at::Tensor s = soft.contiguous(), h = hard.contiguous();
  cuda::check_launch(cuda::launch_vote_top2(s.data_ptr<int64_t>(), h.data_ptr<int64_t>(), by_count,
                                            cls.data_ptr<int64_t>(), units.data_ptr<int64_t>(),
                                            counts.data_ptr<int64_t>(), B, C,
                                            c10::cuda::getCurrentCUDAStream().stream()),
                     "vote_top2");
  return {cls, units, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(certssb, CUDA, m) {
  m.impl("vote_accumulate", &vote_accumulate_cuda);
  m.impl("vote_top2", &vote_top2_cuda);
}

}  // namespace certssb
