// radius.cpp: the CPU kernels of the radius ops (certificate arithmetic and
// the differentiable radius proxy) and their registration under the CPU dispatch key. The argument checks are shared with
// the CUDA glue (cuda/radius_glue.cpp): checks.h.
//
//   radius_certify(top_score, top_count, sigma, models, alpha, num_classes,
//                  bound) -> (pa_lower, pb_upper, radius, abstain)
//   radius_proxy(mean_probs, sigma, lo, hi) -> r
//   radius_proxy_backward(grad, mean_probs, sigma, lo, hi)
//       -> (grad_mean_probs, grad_sigma)
//
// Formulas: csrc/certssb.cpp (schemas), csrc/stats.h, certssb/bounds.py (the
// references, which these kernels reproduce: PhiInv is ATen's calc_ndtri,
// the very function behind torch.special.ndtri on the CPU).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>  // ::calc_ndtri (global namespace)
#include <c10/util/MathConstants.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"
#include "stats.h"

namespace certssb {
namespace radius {

using checks::Bound;

// Soft scores are means of float32 softmax outputs: this much rounding above 1
// or below 0 is accepted (bounds._SCORE_TOL).
constexpr double kScoreTol = 1e-6;

namespace {

// ---------------------------------------------------------------- certify
// pb_upper, radius and abstain from pA_lower, as bounds.certified_radius:
// radius = sigma / 2 * (PhiInv(pa_c) - PhiInv(1 - pa_c)), pa_c = pA_lower
// clamped to [1/2, PA_MAX]. calc_ndtri is odd-symmetric bit for bit
// (1 - pa_c is exact and both take the same branch), so that is sigma * z.
struct Finish {
  double pb;
  double radius;
  bool abstain;
};

inline double radius_z(double pa) {
  const double pa_c = pa < 0.5 ? 0.5 : (pa > stats::kPaMax ? stats::kPaMax : pa);
  return ::calc_ndtri(pa_c);
}

inline Finish finish(double pa, double z, double sigma) {
  const bool abstain = pa <= 0.5;
  return Finish{1.0 - pa, abstain ? 0.0 : sigma * z, abstain};
}

// Reports input `name`[index] = value as invalid (throws).
void bad_value(const char* name, int64_t index, double value, const char* what) {
  TORCH_CHECK(false, "certssb::radius_certify: ", name, "[", index, "] = ",
              value, " ", what);
}

void check_sigma_values(const double* sigma, int64_t stride, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const double s = sigma[i * stride];
    if (!(s > 0.0 && s <= stats::kSigmaMax)) {  // false on NaN
      bad_value("sigma", i, s,
                "must be finite and > 0, at most 1e300 (so that the radius is "
                "finite); pass each sample's noise level (check "
                "the sigma file / settings)");
    }
  }
}

template <typename score_t>
void certify_hoeffding(const score_t* score, int64_t score_stride,
                       const double* sigma, int64_t sigma_stride, int64_t n,
                       int64_t models, double alpha, double* pa_out,
                       double* pb_out, double* radius_out, bool* abstain_out) {
  for (int64_t i = 0; i < n; ++i) {
    const double p = static_cast<double>(score[i * score_stride]);
    if (!(p >= -kScoreTol && p <= 1.0 + kScoreTol)) {
      bad_value("top_score", i, p,
                "is not a mean probability in [0, 1]; pass the mean softmax "
                "probability of the top class over the models, not a logit or a count");
    }
  }
  check_sigma_values(sigma, sigma_stride, n);
  const double width = stats::hoeffding_width(models, alpha);
  at::parallel_for(0, n, 512, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      double pa = static_cast<double>(score[i * score_stride]) - width;
      pa = pa < 0.0 ? 0.0 : (pa > 1.0 ? 1.0 : pa);  // clamp(0, 1)
      const Finish f = finish(pa, radius_z(pa), sigma[i * sigma_stride]);
      pa_out[i] = pa;
      pb_out[i] = f.pb;
      radius_out[i] = f.radius;
      abstain_out[i] = f.abstain;
    }
  });
}

// Clopper-Pearson: pA_lower = the level quantile of Beta(k, models - k + 1).
// Counts repeat (k lies in [0, models], and many samples agree), so when the
// table of all k is not much larger than the batch, every distinct k is solved
// once and the rows gather from the table.
template <typename count_t>
void certify_clopper_pearson(const count_t* count, int64_t count_stride,
                             const double* sigma, int64_t sigma_stride,
                             int64_t n, int64_t models, double level,
                             double* pa_out, double* pb_out,
                             double* radius_out, bool* abstain_out) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = static_cast<int64_t>(count[i * count_stride]);
    if (k < 0 || k > models) {
      TORCH_CHECK(false, "certssb::radius_certify: top_count[", i, "] = ", k,
                  " is outside [0, models = ", models,
                  "]; pass the hard vote count of the top class out of `models` votes");
    }
  }
  check_sigma_values(sigma, sigma_stride, n);
  const bool use_table = models < (int64_t{1} << 24) && models + 1 <= 8 * n + 1024;
  if (!use_table) {
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t k = static_cast<int64_t>(count[i * count_stride]);
        const double pa = stats::clopper_pearson_lower(k, models, level);
        const Finish f = finish(pa, radius_z(pa), sigma[i * sigma_stride]);
        pa_out[i] = pa;
        pb_out[i] = f.pb;
        radius_out[i] = f.radius;
        abstain_out[i] = f.abstain;
      }
    });
    return;
  }
  std::vector<uint8_t> seen(static_cast<size_t>(models) + 1, 0);
  std::vector<int64_t> distinct;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = static_cast<int64_t>(count[i * count_stride]);
    if (!seen[k]) {
      seen[k] = 1;
      distinct.push_back(k);
    }
  }
  std::vector<double> pa_of(static_cast<size_t>(models) + 1);
  std::vector<double> z_of(static_cast<size_t>(models) + 1);
  const int64_t nd = static_cast<int64_t>(distinct.size());
  at::parallel_for(0, nd, 16, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t k = distinct[j];
      const double pa = stats::clopper_pearson_lower(k, models, level);
      pa_of[k] = pa;
      z_of[k] = radius_z(pa);
    }
  });
  at::parallel_for(0, n, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t k = static_cast<int64_t>(count[i * count_stride]);
      const double pa = pa_of[k];
      const Finish f = finish(pa, z_of[k], sigma[i * sigma_stride]);
      pa_out[i] = pa;
      pb_out[i] = f.pb;
      radius_out[i] = f.radius;
      abstain_out[i] = f.abstain;
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> radius_certify_cpu(
    const at::Tensor& top_score, const at::Tensor& top_count,
    const at::Tensor& sigma, int64_t models, double alpha, int64_t num_classes,
    c10::string_view bound) {
  const Bound kind = checks::certify_args(top_score, top_count, sigma, models, alpha,
                                          num_classes, std::string(bound));
  const checks::CertifyOut out = checks::certify_outputs(sigma);
  const int64_t n = sigma.size(0);
  if (n == 0) return out.tuple();
  const at::Tensor sigma64 = sigma.to(at::kDouble);
  const double* sig = sigma64.const_data_ptr<double>();
  const int64_t sig_stride = sigma64.stride(0);
  double* pa_p = out.pa.mutable_data_ptr<double>();
  double* pb_p = out.pb.mutable_data_ptr<double>();
  double* r_p = out.radius.mutable_data_ptr<double>();
  bool* ab_p = out.abstain.mutable_data_ptr<bool>();
  if (kind == Bound::kHoeffding) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, top_score.scalar_type(), "radius_certify_cpu", [&] {
          certify_hoeffding<scalar_t>(top_score.const_data_ptr<scalar_t>(),
                                      top_score.stride(0), sig, sig_stride, n,
                                      models, alpha, pa_p, pb_p, r_p, ab_p);
        });
  } else {
    // Bonferroni over the classes (bounds.pa_lower): level alpha / C.
    const double level = alpha / static_cast<double>(num_classes);
    AT_DISPATCH_INTEGRAL_TYPES(top_count.scalar_type(), "radius_certify_cpu", [&] {
      certify_clopper_pearson<scalar_t>(top_count.const_data_ptr<scalar_t>(),
                                        top_count.stride(0), sig, sig_stride, n,
                                        models, level, pa_p, pb_p, r_p, ab_p);
    });
  }
  return out.tuple();
}

// ---------------------------------------------------------------- proxy
// Top-2 entries of one row, ties to the lowest index (bounds.top2): a strict
// ">" keeps the earlier index of equal values; the runner-up is the best of
// the others. `nan` flags a row holding NaN (its outputs become NaN).
template <typename scalar_t, typename acc_t>
struct Top2 {
  int64_t i1;
  int64_t i2;
  acc_t v1;
  acc_t v2;
  bool nan;
};

template <typename scalar_t, typename acc_t>
inline Top2<scalar_t, acc_t> row_top2(const scalar_t* row, int64_t cols,
                                      int64_t col_stride) {
  Top2<scalar_t, acc_t> t{0, -1, static_cast<acc_t>(row[0]), acc_t(0), false};
  t.nan = std::isnan(t.v1);
  for (int64_t c = 1; c < cols; ++c) {
    const acc_t v = static_cast<acc_t>(row[c * col_stride]);
    if (v > t.v1) {
      t.i2 = t.i1;
      t.v2 = t.v1;
      t.i1 = c;
      t.v1 = v;
    } else if (t.i2 < 0 || v > t.v2) {
      t.i2 = c;
      t.v2 = v;
    }
    t.nan |= std::isnan(v);
  }
  return t;
}

template <typename acc_t>
inline acc_t clamp_to(acc_t v, acc_t lo, acc_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// r[b] = sigma[b] / 2 * (PhiInv(clamp(pA)) - PhiInv(clamp(pB))), computed in
// acc_t in the reference's order.
template <typename scalar_t, typename acc_t>
void proxy_forward(const scalar_t* probs, int64_t rows, int64_t cols,
                   int64_t row_stride, int64_t col_stride, const acc_t* sigma,
                   int64_t sigma_stride, double lo_d, double hi_d, acc_t* out) {
  const acc_t lo = static_cast<acc_t>(lo_d);
  const acc_t hi = static_cast<acc_t>(hi_d);
  const int64_t grain = std::max<int64_t>(1, 32768 / cols);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const auto t = row_top2<scalar_t, acc_t>(probs + b * row_stride, cols, col_stride);
      if (t.nan) {
        out[b] = std::numeric_limits<acc_t>::quiet_NaN();
        continue;
      }
      const acc_t za = ::calc_ndtri(clamp_to(t.v1, lo, hi));
      const acc_t zb = ::calc_ndtri(clamp_to(t.v2, lo, hi));
      out[b] = sigma[b * sigma_stride] / acc_t(2) * (za - zb);
    }
  });
}

// Gradient of the proxy, as autograd differentiates the reference:
// d r / d pA = grad sigma / 2 * sqrt(2 pi) exp(zA^2 / 2) where lo <= pA <= hi
// (clamp passes the gradient at its edges), minus the same for pB;
// d r / d sigma = grad (zA - zB) / 2. Every other entry of the row is 0.
template <typename scalar_t, typename acc_t>
void proxy_backward(const acc_t* grad, int64_t grad_stride,
                    const scalar_t* probs, int64_t rows, int64_t cols,
                    int64_t row_stride, int64_t col_stride, const acc_t* sigma,
                    int64_t sigma_stride, double lo_d, double hi_d,
                    scalar_t* grad_probs, acc_t* grad_sigma) {
  const acc_t lo = static_cast<acc_t>(lo_d);
  const acc_t hi = static_cast<acc_t>(hi_d);
  const acc_t sqrt_2pi = static_cast<acc_t>(std::sqrt(2.0 * c10::pi<double>));
  const int64_t grain = std::max<int64_t>(1, 32768 / cols);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const auto t = row_top2<scalar_t, acc_t>(probs + b * row_stride, cols, col_stride);
      scalar_t* out_row = grad_probs + b * cols;
      const acc_t g = grad[b * grad_stride];
      if (t.nan) {
        const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
        for (int64_t c = 0; c < cols; ++c) out_row[c] = static_cast<scalar_t>(nan);
        grad_sigma[b] = nan;
        continue;
      }
      const acc_t za = ::calc_ndtri(clamp_to(t.v1, lo, hi));
      const acc_t zb = ::calc_ndtri(clamp_to(t.v2, lo, hi));
      const acc_t g_diff = g * (sigma[b * sigma_stride] / acc_t(2));
      const acc_t ga = (t.v1 >= lo && t.v1 <= hi)
                           ? g_diff * sqrt_2pi * std::exp(za * za / acc_t(2))
                           : acc_t(0);
      const acc_t gb = (t.v2 >= lo && t.v2 <= hi)
                           ? -g_diff * sqrt_2pi * std::exp(zb * zb / acc_t(2))
                           : acc_t(0);
      for (int64_t c = 0; c < cols; ++c) out_row[c] = scalar_t(0);
      out_row[t.i1] = static_cast<scalar_t>(ga);
      out_row[t.i2] = static_cast<scalar_t>(gb);
      grad_sigma[b] = g * (za - zb) / acc_t(2);
    }
  });
}

at::Tensor radius_proxy_cpu(const at::Tensor& mean_probs, const at::Tensor& sigma,
                            double lo, double hi) {
  const checks::ProxyArgs a = checks::proxy_args(mean_probs, sigma, lo, hi, "certssb::radius_proxy");
  at::Tensor out = at::empty({a.rows}, mean_probs.options().dtype(a.out_type));
  if (a.rows == 0) return out;
  at::Tensor out_acc = checks::in_acc(out, a.acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, mean_probs.scalar_type(), "radius_proxy_cpu", [&] {
        const scalar_t* probs = mean_probs.const_data_ptr<scalar_t>();
        if (a.acc == at::kDouble) {
          proxy_forward<scalar_t, double>(
              probs, a.rows, a.cols, mean_probs.stride(0), mean_probs.stride(1),
              a.sigma_acc.const_data_ptr<double>(), a.sigma_acc.stride(0), lo, hi,
              out_acc.mutable_data_ptr<double>());
        } else {
          proxy_forward<scalar_t, float>(
              probs, a.rows, a.cols, mean_probs.stride(0), mean_probs.stride(1),
              a.sigma_acc.const_data_ptr<float>(), a.sigma_acc.stride(0), lo, hi,
              out_acc.mutable_data_ptr<float>());
        }
      });
  checks::finish_acc(out, out_acc);
  return out;
}

std::tuple<at::Tensor, at::Tensor> radius_proxy_backward_cpu(
    const at::Tensor& grad, const at::Tensor& mean_probs, const at::Tensor& sigma,
    double lo, double hi) {
  const checks::ProxyBackwardArgs a = checks::proxy_backward_args(grad, mean_probs, sigma, lo, hi);
  if (a.rows == 0) return a.result();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, mean_probs.scalar_type(), "radius_proxy_backward_cpu", [&] {
        const scalar_t* probs = mean_probs.const_data_ptr<scalar_t>();
        scalar_t* gp = a.grad_probs.mutable_data_ptr<scalar_t>();
        if (a.acc == at::kDouble) {
          proxy_backward<scalar_t, double>(
              a.grad_acc.const_data_ptr<double>(), a.grad_acc.stride(0), probs, a.rows, a.cols,
              mean_probs.stride(0), mean_probs.stride(1), a.sigma_acc.const_data_ptr<double>(),
              a.sigma_acc.stride(0), lo, hi, gp, a.grad_sigma_acc.mutable_data_ptr<double>());
        } else {
          proxy_backward<scalar_t, float>(
              a.grad_acc.const_data_ptr<float>(), a.grad_acc.stride(0), probs, a.rows, a.cols,
              mean_probs.stride(0), mean_probs.stride(1), a.sigma_acc.const_data_ptr<float>(),
              a.sigma_acc.stride(0), lo, hi, gp, a.grad_sigma_acc.mutable_data_ptr<float>());
        }
      });
  return a.result();
}

}  // namespace

TORCH_LIBRARY_IMPL(certssb, CPU, m) { m.impl("radius_certify", &radius_certify_cpu)
    .impl("radius_proxy", &radius_proxy_cpu).impl("radius_proxy_backward", &radius_proxy_backward_cpu); }

}  // namespace radius
}  // namespace certssb
