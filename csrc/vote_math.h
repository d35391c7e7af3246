// vote_math.h: the per-row arithmetic of the vote op, shared by the CPU and
// CUDA kernels so that both accumulate exactly the same integers.
//
// For one model's logits l[0..C) of one input:
//   p_c   = exp(l_c - max l) / sum_j exp(l_j - max l)      (double)
//   units = round_half_even(p_c * 2^40)                     (int64)
//   vote  = argmax_c l_c, the lowest index among equal maxima.
// Soft scores are kept as these fixed-point units: integer sums are exact, so
// the accumulators do not depend on how the M models are chunked, ordered or
// sharded over processes. 2^40 keeps ~12 decimal digits of each probability
// and leaves room for 2^23 - 1 models in an int64 (kernels/vote.py MAX_MODELS:
// 2^23 unanimous models would overflow it).
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define CERTSSB_VOTE_HD __host__ __device__ __forceinline__
#else
#define CERTSSB_VOTE_HD inline
#endif

namespace certssb {
namespace vote {

constexpr double kUnitsPerOne = 1099511627776.0;  // 2^40

// Adds one model's vote for one input: `logit(c)` reads class c's logit as
// double; soft[c] += units of p_c, hard[argmax] += 1.
template <typename Read>
CERTSSB_VOTE_HD void accumulate_row(Read logit, int64_t C, int64_t* soft, int64_t* hard) {
  double mx = logit(0);
  int64_t arg = 0;
  for (int64_t c = 1; c < C; ++c) {
    const double v = logit(c);
    if (v > mx) {  // strict: ties keep the lower index
      mx = v;
      arg = c;
    }
  }
  // exp once per class when the row fits a small buffer (the common case), else twice.
  constexpr int64_t kBuffered = 16;
  double e[kBuffered];
  double total = 0.0;
  for (int64_t c = 0; c < C; ++c) {
    const double v = exp(logit(c) - mx);
    if (c < kBuffered) e[c] = v;
    total += v;
  }
  for (int64_t c = 0; c < C; ++c) {
    const double v = c < kBuffered ? e[c] : exp(logit(c) - mx);
    // (v / total) * 2^40 as the reference rounds it: softmax first, then the exact scaling.
    soft[c] += static_cast<int64_t>(nearbyint(v / total * kUnitsPerOne));
  }
  hard[arg] += 1;
}

// Top-2 of key[0..C) (ties to the lowest index); C >= 2.
CERTSSB_VOTE_HD void top2_row(const int64_t* key, int64_t C, int64_t* first, int64_t* second) {
  int64_t a = 0;
  for (int64_t c = 1; c < C; ++c) {
    if (key[c] > key[a]) a = c;
  }
  int64_t b = a == 0 ? 1 : 0;
  for (int64_t c = 0; c < C; ++c) {
    if (c != a && key[c] > key[b]) b = c;
  }
  *first = a;
  *second = b;
}

// Row b of vote_top2: the top-2 classes of row b of (by_count ? hard : soft),
// both [B, C] contiguous, and the soft units and hard counts at them; each
// output is [B, 2].
CERTSSB_VOTE_HD void top2_store(const int64_t* soft, const int64_t* hard, bool by_count, int64_t b,
                                int64_t C, int64_t* cls, int64_t* units, int64_t* counts) {
  int64_t first, second;
  top2_row((by_count ? hard : soft) + b * C, C, &first, &second);
  cls[2 * b] = first;
  cls[2 * b + 1] = second;
  units[2 * b] = soft[b * C + first];
  units[2 * b + 1] = soft[b * C + second];
  counts[2 * b] = hard[b * C + first];
  counts[2 * b + 1] = hard[b * C + second];
}

}  // namespace vote
}  // namespace certssb
