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

#include "checks.h"
#include "vote_math.h"

namespace certssb {
namespace {

void vote_accumulate_cpu(const at::Tensor& logits, const at::Tensor& soft, const at::Tensor& hard) {
  const auto [M, B, C] = checks::vote_accumulate_args(logits, soft, hard);
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
  auto outs = checks::vote_top2_args(soft, hard);
  const int64_t B = soft.size(0), C = soft.size(1);
  if (B == 0) return outs;
  const at::Tensor s = soft.contiguous(), h = hard.contiguous();
  const int64_t* sp = s.data_ptr<int64_t>();
  const int64_t* hp = h.data_ptr<int64_t>();
  int64_t* cp = std::get<0>(outs).data_ptr<int64_t>();
  int64_t* up = std::get<1>(outs).data_ptr<int64_t>();
  int64_t* np = std::get<2>(outs).data_ptr<int64_t>();
  at::parallel_for(0, B, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) vote::top2_store(sp, hp, by_count, b, C, cp, up, np);
  });
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(certssb, CPU, m) { m.impl("vote_accumulate", &vote_accumulate_cpu).impl("vote_top2", &vote_top2_cpu); }

}  // namespace certssb
