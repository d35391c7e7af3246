// vote.cpp: CPU kernels of certssb::vote_accumulate and certssb::vote_top2.
//
// vote_accumulate streams a chunk of logits [Mc, B, C] into the [B, C]
// accumulators soft_units (fixed-point softmax sums, see vote_math.h) and
// hard_count (argmax votes), fusing the softmax: no [Mc, B, C] tensor of
// probabilities is made. Inputs are split over threads by row b, and each
// row adds its Mc models in order, so the result is deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "vote_math.h"

namespace certssb {
namespace {

void check_accumulators(const at::Tensor& soft, const at::Tensor& hard, int64_t B, int64_t C,
                        const char* op) {
  TORCH_CHECK(soft.scalar_type() == at::kLong && hard.scalar_type() == at::kLong, op,
              ": soft_units and hard_count must be int64 accumulators, got ", soft.scalar_type(),
              " and ", hard.scalar_type(), "; create them with torch.zeros(B, C, dtype=torch.int64)");
  TORCH_CHECK(soft.dim() == 2 && hard.dim() == 2 && soft.size(0) == B && soft.size(1) == C &&
                  hard.size(0) == B && hard.size(1) == C,
              op, ": soft_units and hard_count must have shape [", B, ", ", C, "], got ",
              soft.sizes(), " and ", hard.sizes());
}

void vote_accumulate_cpu(const at::Tensor& logits, const at::Tensor& soft, const at::Tensor& hard) {
  TORCH_CHECK(logits.device().is_cpu() && soft.device().is_cpu() && hard.device().is_cpu(),
              "vote_accumulate: logits and both accumulators must be on the CPU, got ",
              logits.device(), ", ", soft.device(), ", ", hard.device());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()),
              "vote_accumulate: logits must be floating, got ", logits.scalar_type());
  TORCH_CHECK(logits.dim() == 3, "vote_accumulate: logits must have shape [Mc, B, C], got ",
              logits.sizes());
  const int64_t M = logits.size(0), B = logits.size(1), C = logits.size(2);
  TORCH_CHECK(C >= 1, "vote_accumulate: logits need at least one class");
  check_accumulators(soft, hard, B, C, "vote_accumulate");
  TORCH_CHECK(soft.is_contiguous() && hard.is_contiguous(),
              "vote_accumulate: the accumulators must be contiguous (they are updated in place)");
  if (M == 0 || B == 0) return;
  int64_t* soft_p = soft.data_ptr<int64_t>();
  int64_t* hard_p = hard.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "vote_accumulate_cpu", [&] {
    // Strided reads: any layout of logits works without a copy.
    const scalar_t* lp = logits.data_ptr<scalar_t>();
    const int64_t sm = logits.stride(0), sb = logits.stride(1), sc = logits.stride(2);
    // Threads own blocks of inputs; within a block the models run in the outer loop, so
    // each step reads a contiguous run of logits[k, begin:end] (walking k for a fixed b
    // would touch a new cache line per model) while the block's accumulators stay in
    // cache. Every b still adds its models in order k = 0, 1, ...: deterministic.
    at::parallel_for(0, B, 256, [&](int64_t begin, int64_t end) {
      for (int64_t k = 0; k < M; ++k) {
        for (int64_t b = begin; b < end; ++b) {
          const scalar_t* row = lp + k * sm + b * sb;
          vote::accumulate_row([&](int64_t c) { return static_cast<double>(row[c * sc]); }, C,
                               soft_p + b * C, hard_p + b * C);
        }
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> vote_top2_cpu(const at::Tensor& soft,
                                                             const at::Tensor& hard,
                                                             bool by_count) {
  TORCH_CHECK(soft.device().is_cpu() && hard.device().is_cpu(),
              "vote_top2: soft_units and hard_count must be on the CPU, got ", soft.device(),
              " and ", hard.device());
  TORCH_CHECK(soft.dim() == 2, "vote_top2: soft_units must have shape [B, C], got ", soft.sizes());
  const int64_t B = soft.size(0), C = soft.size(1);
  TORCH_CHECK(C >= 2, "vote_top2: needs at least 2 classes, got ", C);
  check_accumulators(soft, hard, B, C, "vote_top2");
  auto opts = soft.options().dtype(at::kLong);
  at::Tensor cls = at::empty({B, 2}, opts), units = at::empty({B, 2}, opts),
             counts = at::empty({B, 2}, opts);
  if (B == 0) return {cls, units, counts};
  const at::Tensor s = soft.contiguous(), h = hard.contiguous();
  const int64_t* sp = s.data_ptr<int64_t>();
  const int64_t* hp = h.data_ptr<int64_t>();
  int64_t *cp = cls.data_ptr<int64_t>(), *up = units.data_ptr<int64_t>(),
          *np = counts.data_ptr<int64_t>();
  at::parallel_for(0, B, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int64_t first, second;
      vote::top2_row((by_count ? hp : sp) + b * C, C, &first, &second);
      cp[2 * b] = first;
      cp[2 * b + 1] = second;
      up[2 * b] = sp[b * C + first];
      up[2 * b + 1] = sp[b * C + second];
      np[2 * b] = hp[b * C + first];
      np[2 * b + 1] = hp[b * C + second];
    }
  });
  return {cls, units, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(certssb, CPU, m) {
  m.impl("vote_accumulate", &vote_accumulate_cpu);
  m.impl("vote_top2", &vote_top2_cpu);
}

}  // namespace certssb
