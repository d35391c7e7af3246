// checks.h: the argument checks of every certssb op, and the outputs they
// allocate, shared by the CPU kernels (cpu/*.cpp) and the CUDA glue
// (cuda/*_glue.cpp), so that both backends refuse the same inputs with the
// same messages. Torch headers only (no CUDA header): the CPU build includes it.
//
// Device rules: every tensor argument must be on the device of the op's first
// tensor (the dispatcher picks the backend from it). Value checks that read
// tensor data (ids in [0, 2^32)) copy to the host first when the data is on a
// GPU: one synchronisation of a [B] tensor per op call.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace certssb {
namespace checks {

constexpr int64_t kMaxWord = 0xffffffffLL;  // the largest 32-bit Philox word

inline void same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                        const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device(), "; move all inputs to one device");
}

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline bool is_int_type(at::ScalarType t) {
  return t == at::kByte || t == at::kChar || t == at::kShort || t == at::kInt || t == at::kLong;
}

// ---- noise, noise_sigma_grad ------------------------------------------------
// ids: [B] int64 on `ref`'s device, every value in [0, 2^32) (reads the values).
inline void noise_ids(const at::Tensor& ids, int64_t B, const at::Tensor& ref, const char* op) {
  same_device(ids, ref, op, "ids", "the data");
  TORCH_CHECK(ids.scalar_type() == at::kLong, op, ": ids must be int64, got ", ids.scalar_type(),
              "; pass torch.int64 sample indices");
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == B, op, ": ids must have shape [", B,
              "] (one index per input), got ", ids.sizes());
  const at::Tensor host = ids.is_cpu() ? ids.contiguous() : ids.to(at::kCPU);
  const int64_t* p = host.data_ptr<int64_t>();
  for (int64_t i = 0; i < host.numel(); ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] <= kMaxWord, op, ": ids must lie in [0, 2^32), got ", p[i],
                " at position ", i);
  }
}

// stream and the model indices k0 .. k0 + models - 1 are 32-bit counter words.
inline void noise_words(int64_t stream, int64_t k0, int64_t models, const char* op) {
  TORCH_CHECK(stream >= 0 && stream <= kMaxWord, op, ": stream must lie in [0, 2^32), got ",
              stream);
  TORCH_CHECK(models >= 0, op, ": models must be >= 0, got ", models);
  TORCH_CHECK(k0 >= 0 && k0 + std::max<int64_t>(models, 1) - 1 <= kMaxWord, op,
              ": model indices k0 .. k0 + models - 1 must lie in [0, 2^32), got k0 = ", k0,
              " and models = ", models);
}

// Checks noise(x, sigma, ids, seed, stream, k0, models); returns the empty
// output [models, B, ...] (contiguous, x's dtype and device).
inline at::Tensor noise_args(const at::Tensor& x, const at::Tensor& sigma, const at::Tensor& ids,
                             int64_t stream, int64_t k0, int64_t models) {
  constexpr const char* op = "noise";
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be a floating tensor, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have a batch dimension [B, ...], got a scalar");
  same_device(sigma, x, op, "sigma", "x");
  TORCH_CHECK(at::isFloatingType(sigma.scalar_type()), op, ": sigma must be floating, got ",
              sigma.scalar_type());
  const int64_t B = x.size(0);
  TORCH_CHECK(sigma.dim() == 1 && sigma.size(0) == B, op, ": sigma must have shape [", B,
              "] (one noise level per input), got ", sigma.sizes());
  noise_words(stream, k0, models, op);
  noise_ids(ids, B, x, op);
  std::vector<int64_t> shape{models};
  shape.insert(shape.end(), x.sizes().begin(), x.sizes().end());
  return at::empty(shape, x.options().memory_format(at::MemoryFormat::Contiguous));
}

// noise_sigma_grad's zeroed output [B] of the arithmetic type (float64 for
// float64 grad_out, else float32) and the sizes of grad_out viewed as [K, B, D].
struct SigmaGradArgs {
  at::Tensor out;
  int64_t K, B, D;
  bool empty() const { return K * B * D == 0; }
};

// Checks noise_sigma_grad(grad_out, ids, seed, stream, k0).
inline SigmaGradArgs noise_sigma_grad_args(const at::Tensor& grad, const at::Tensor& ids,
                                           int64_t stream, int64_t k0) {
  constexpr const char* op = "noise_sigma_grad";
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()), op, ": grad_out must be floating, got ",
              grad.scalar_type());
  TORCH_CHECK(grad.dim() >= 2, op, ": grad_out must have shape [K, B, ...], got ", grad.sizes());
  const int64_t B = grad.size(1);
  noise_words(stream, k0, grad.size(0), op);
  noise_ids(ids, B, grad, op);
  const int64_t K = grad.size(0);
  const int64_t D = K * B == 0 ? 0 : grad.numel() / (K * B);
  return {at::zeros({B}, grad.options().dtype(at::toOpMathType(grad.scalar_type()))), K, B, D};
}

// ---- vote_accumulate, vote_top2 ---------------------------------------------
inline void vote_accumulators(const at::Tensor& soft, const at::Tensor& hard, int64_t B, int64_t C,
                              const at::Tensor& ref, const char* op) {
  same_device(soft, ref, op, "soft_units", "the logits");
  same_device(hard, ref, op, "hard_count", "the logits");
  TORCH_CHECK(soft.scalar_type() == at::kLong && hard.scalar_type() == at::kLong, op,
              ": soft_units and hard_count must be int64 accumulators, got ", soft.scalar_type(),
              " and ", hard.scalar_type(), "; create them with torch.zeros(B, C, dtype=torch.int64)");
  TORCH_CHECK(soft.dim() == 2 && hard.dim() == 2 && soft.size(0) == B && soft.size(1) == C &&
                  hard.size(0) == B && hard.size(1) == C,
              op, ": soft_units and hard_count must have shape [", B, ", ", C, "], got ",
              soft.sizes(), " and ", hard.sizes());
}

// Checks vote_accumulate(logits, soft_units, hard_count); returns the sizes of
// logits [M, B, C].
struct VoteSizes {
  int64_t M, B, C;
};

inline VoteSizes vote_accumulate_args(const at::Tensor& logits, const at::Tensor& soft,
                                 const at::Tensor& hard) {
  constexpr const char* op = "vote_accumulate";
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), op, ": logits must be floating, got ",
              logits.scalar_type());
  TORCH_CHECK(logits.dim() == 3, op, ": logits must have shape [Mc, B, C], got ", logits.sizes());
  TORCH_CHECK(logits.size(2) >= 1, op, ": logits need at least one class");
  vote_accumulators(soft, hard, logits.size(1), logits.size(2), logits, op);
  TORCH_CHECK(soft.is_contiguous() && hard.is_contiguous(), op,
              ": the accumulators must be contiguous (they are updated in place)");
  return {logits.size(0), logits.size(1), logits.size(2)};
}

// Checks vote_top2(soft_units, hard_count, by_count); returns its three empty
// [B, 2] int64 outputs (classes, units, counts).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> vote_top2_args(const at::Tensor& soft,
                                                                     const at::Tensor& hard) {
  constexpr const char* op = "vote_top2";
  TORCH_CHECK(soft.dim() == 2, op, ": soft_units must have shape [B, C], got ", soft.sizes());
  const int64_t B = soft.size(0), C = soft.size(1);
  TORCH_CHECK(C >= 2, op, ": needs at least 2 classes, got ", C);
  vote_accumulators(soft, hard, B, C, soft, op);
  const auto opts = soft.options().dtype(at::kLong);
  return {at::empty({B, 2}, opts), at::empty({B, 2}, opts), at::empty({B, 2}, opts)};
}

// ---- radius_certify, radius_proxy, radius_proxy_backward --------------------
// Which lower bound radius_certify computes.
enum class Bound { kHoeffding, kClopperPearson };

inline void radius_vector(const at::Tensor& t, const char* op, const char* name, const char* what) {
  TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be a 1-D tensor [B] (", what, "), got shape ",
              t.sizes(), "; pass one value per sample");
}

// Checks every argument of radius_certify but the tensor values (those are
// checked by the CPU kernel itself, and by the Python wrapper on any device).
inline Bound certify_args(const at::Tensor& top_score, const at::Tensor& top_count,
                          const at::Tensor& sigma, int64_t models, double alpha,
                          int64_t num_classes, const std::string& bound) {
  constexpr const char* op = "certssb::radius_certify";
  Bound kind = Bound::kHoeffding;
  if (bound == "clopper-pearson") {
    kind = Bound::kClopperPearson;
  } else {
    TORCH_CHECK(bound == "hoeffding", op, ": unknown bound '", bound,
                "'; choose 'hoeffding' or 'clopper-pearson'");
  }
  TORCH_CHECK(models >= 1, op, ": models (the number of votes) must be >= 1, got ", models,
              "; pass the real ensemble size");
  TORCH_CHECK(0.0 < alpha && alpha < 1.0, op, ": alpha must lie in (0, 1), got ", alpha,
              "; pass the failure probability of the certificate, e.g. 0.001");
  TORCH_CHECK(num_classes >= 2, op, ": num_classes must be >= 2, got ", num_classes);
  radius_vector(top_score, op, "top_score", "mean softmax probability of the top class");
  radius_vector(top_count, op, "top_count", "vote count of the top class");
  radius_vector(sigma, op, "sigma", "noise level");
  TORCH_CHECK(top_score.size(0) == sigma.size(0) && top_count.size(0) == sigma.size(0), op,
              ": top_score, top_count and sigma must have the same length B, got ",
              top_score.size(0), ", ", top_count.size(0), " and ", sigma.size(0));
  same_device(top_score, sigma, op, "top_score", "sigma");
  same_device(top_count, sigma, op, "top_count", "sigma");
  TORCH_CHECK(is_float_type(top_score.scalar_type()), op,
              ": top_score must be a floating-point tensor (float16/bfloat16/float32/float64), got ",
              top_score.scalar_type());
  TORCH_CHECK(is_int_type(top_count.scalar_type()), op,
              ": top_count must be an integer tensor (uint8/int8/int16/int32/int64) of vote counts, got ",
              top_count.scalar_type(), "; convert integer-valued counts with .long()");
  TORCH_CHECK(is_float_type(sigma.scalar_type()), op,
              ": sigma must be a floating-point tensor (float16/bfloat16/float32/float64), got ",
              sigma.scalar_type());
  return kind;
}

// The four empty float64/bool [B] outputs of radius_certify, on sigma's device.
struct CertifyOut {
  at::Tensor pa, pb, radius, abstain;
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tuple() const {
    return {pa, pb, radius, abstain};
  }
};

inline CertifyOut certify_outputs(const at::Tensor& sigma) {
  const int64_t n = sigma.size(0);
  const auto opts = sigma.options().dtype(at::kDouble);
  return {at::empty({n}, opts), at::empty({n}, opts), at::empty({n}, opts),
          at::empty({n}, opts.dtype(at::kBool))};
}

// The arguments of radius_proxy and radius_proxy_backward after the checks:
// acc is the compute type (double when the output is float64, else float),
// sigma_acc is sigma in it.
struct ProxyArgs {
  at::ScalarType acc;
  at::ScalarType out_type;  // promote(mean_probs, sigma): the forward's output dtype
  int64_t rows, cols;
  at::Tensor sigma_acc;
};

// Checks the arguments of radius_proxy (and the shared ones of its backward).
inline ProxyArgs proxy_args(const at::Tensor& mean_probs, const at::Tensor& sigma, double lo,
                            double hi, const char* op) {
  TORCH_CHECK(mean_probs.dim() == 2 && mean_probs.size(1) >= 2, op,
              ": mean_probs must be a [B, C] tensor with C >= 2 classes, got shape ",
              mean_probs.sizes());
  TORCH_CHECK(is_float_type(mean_probs.scalar_type()), op,
              ": mean_probs must be float16/bfloat16/float32/float64, got ",
              mean_probs.scalar_type());
  radius_vector(sigma, op, "sigma", "noise level");
  TORCH_CHECK(sigma.size(0) == mean_probs.size(0), op, ": sigma has ", sigma.size(0),
              " entries but mean_probs has ", mean_probs.size(0), " rows; pass one sigma per row");
  TORCH_CHECK(is_float_type(sigma.scalar_type()), op,
              ": sigma must be float16/bfloat16/float32/float64, got ", sigma.scalar_type());
  same_device(sigma, mean_probs, op, "sigma", "mean_probs");
  TORCH_CHECK(std::isfinite(lo) && std::isfinite(hi) && 0.0 < lo && lo < hi && hi < 1.0, op,
              ": the probability clamp must satisfy 0 < lo < hi < 1, got lo = ", lo, ", hi = ", hi,
              "; the default is (0.02, 0.98)");
  const at::ScalarType out = at::promote_types(mean_probs.scalar_type(), sigma.scalar_type());
  const at::ScalarType acc = out == at::kDouble ? at::kDouble : at::kFloat;
  return {acc, out, mean_probs.size(0), mean_probs.size(1), sigma.to(acc)};
}

// `out` itself when it already has dtype `acc`, else a new [rows] tensor of
// dtype acc to compute into and copy back (`finish_acc`).
inline at::Tensor in_acc(const at::Tensor& out, at::ScalarType acc) {
  return out.scalar_type() == acc ? out : at::empty({out.size(0)}, out.options().dtype(acc));
}

inline void finish_acc(const at::Tensor& out, const at::Tensor& acc_out) {
  if (!acc_out.is_same(out)) out.copy_(acc_out);
}

// Checks the arguments of radius_proxy_backward; allocates its outputs
// (grad_probs [B, C] like mean_probs, grad_sigma [B] like sigma); grad_acc is
// grad in the compute type, grad_sigma_acc grad_sigma's buffer in it (see in_acc).
struct ProxyBackwardArgs : ProxyArgs {
  at::Tensor grad_acc, grad_probs, grad_sigma, grad_sigma_acc;
  // The op's result once the kernel has filled grad_probs and grad_sigma_acc.
  std::tuple<at::Tensor, at::Tensor> result() const {
    finish_acc(grad_sigma, grad_sigma_acc);
    return {grad_probs, grad_sigma};
  }
};

inline ProxyBackwardArgs proxy_backward_args(const at::Tensor& grad, const at::Tensor& mean_probs,
                                             const at::Tensor& sigma, double lo, double hi) {
  constexpr const char* op = "certssb::radius_proxy_backward";
  ProxyBackwardArgs a{proxy_args(mean_probs, sigma, lo, hi, op)};
  radius_vector(grad, op, "grad", "gradient of the radius proxy");
  TORCH_CHECK(grad.size(0) == mean_probs.size(0), op, ": grad has ", grad.size(0),
              " entries but mean_probs has ", mean_probs.size(0), " rows");
  TORCH_CHECK(is_float_type(grad.scalar_type()), op, ": grad must be floating point, got ",
              grad.scalar_type());
  same_device(grad, mean_probs, op, "grad", "mean_probs");
  a.grad_acc = grad.to(a.acc);
  a.grad_probs = at::empty({a.rows, a.cols}, mean_probs.options());
  a.grad_sigma = at::empty({a.rows}, sigma.options());
  a.grad_sigma_acc = in_acc(a.grad_sigma, a.acc);
  return a;
}

}  // namespace checks
}  // namespace certssb
