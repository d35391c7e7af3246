// stats.h: the double-precision statistics behind a certificate, usable
// unchanged from host C++ and from CUDA device code: the standard normal
// quantile PhiInv, the regularized incomplete beta function I_x(a, b) and its
// inverse in x (the Clopper-Pearson bound), and the Hoeffding width.
//
// Definitions (docs/THEORY.md section 3; certssb/certify/bounds/ is the reference):
//
//   PhiInv(p)          = sqrt(2) * erfinv(2p - 1)
//   B(a, b)            = Gamma(a) Gamma(b) / Gamma(a + b)
//   I_x(a, b)          = int_0^x t^(a-1) (1-t)^(b-1) dt / B(a, b)
//   incbeta_inv(a,b,p) = the x in [0, 1] with I_x(a, b) = p
//   clopper_pearson_lower(k, m, p) = incbeta_inv(k, m - k + 1, p), 0 if k = 0
//   hoeffding_width(m, alpha)      = sqrt(ln(1 / alpha) / (2 m))
//
// How I_x(a, b) is evaluated (Abramowitz & Stegun 26.5.8):
//   I_x(a, b) = x^a (1-x)^b / (a B(a, b)) * 1 / (1 + d1 / (1 + d2 / (1 + ...)))
//   d_{2j+1} = -(a + j)(a + b + j) x / ((a + 2j)(a + 2j + 1))
//   d_{2j}   =  j (b - j) x / ((a + 2j - 1)(a + 2j))
// The fraction converges fast for x < (a + 1) / (a + b + 2); above that the
// symmetry I_x(a, b) = 1 - I_{1-x}(b, a) is used. The prefactor
// x^a (1-x)^b / B(a, b) is formed in logs; for a, b >= 10 it is written as
//   a log1pmx(d / x0) + b log1pmx(-d / y0) + ln(ab / (a + b)) / 2
//   - ln(2 pi) / 2 - delta(a) - delta(b) + delta(a + b),
// x0 = a / (a + b), y0 = 1 - x0, d = x - x0, log1pmx(t) = ln(1 + t) - t
// with delta(z) = lnGamma(z) - ((z - 1/2) ln z - z + ln(2 pi) / 2) the
// Stirling remainder (its asymptotic series), so that no two large lnGamma
// values (~ 8e4 at 1e4) are subtracted: lgamma's absolute error there would
// be 1e-11, far too much for a bound checked to 1e-12. Small arguments use
// ln(Gamma(z)) through tgamma, which (unlike lgamma) is thread-safe.
//
// The inverse runs Halley steps (f = I_x - p, f' = the Beta density,
// f'' / f' = (a - 1) / x - (b - 1) / (1 - x)) from the Abramowitz & Stegun
// 26.5.22 starting point, inside a bisection bracket that every evaluation
// shrinks, until a step is below a few ulps or a Halley step below 1e-7
// (cubic convergence leaves far less than an ulp after it): full double
// precision, in about two evaluations.
// b = 1 and a = 1 have closed forms.
//
// This header includes only <math.h> and <stdint.h>, so a raw .cu file can use
// it beside cuda_runtime.h without any torch header.
#pragma once

#include <math.h>
#include <stdint.h>

#if !defined(CERTSSB_HOST_DEVICE)
#if defined(__CUDACC__)
#define CERTSSB_HOST_DEVICE __host__ __device__
#else
#define CERTSSB_HOST_DEVICE
#endif
#endif

namespace certssb {
namespace stats {

// pA_lower is clamped to at most this before PhiInv (bounds.PA_MAX): a
// unanimous vote then gives the finite radius PhiInv(1 - 1e-12) * sigma.
constexpr double kPaMax = 1.0 - 1e-12;
// Largest accepted sigma (bounds.SIGMA_MAX): the radius, at most ~7.03 sigma,
// stays finite (sigma = 1.7e308 gave an infinite radius).
constexpr double kSigmaMax = 1e300;
constexpr double kSqrt2Pi = 2.50662827463100050242;       // sqrt(2 pi)
constexpr double kHalfLog2Pi = 0.91893853320467274178;    // ln(2 pi) / 2
constexpr double kSqrtHalf = 0.70710678118654752440;      // 1 / sqrt(2)
constexpr double kDoubleEps = 2.220446049250313e-16;      // 2^-52
// Arguments from which the Stirling series of lnGamma is used (its truncation
// error there is below 3e-17).
constexpr double kStirlingMin = 10.0;
// A Halley step of the Beta quantile below this (relative) ends the search.
constexpr double kHalleyAccept = 1e-7;

// ----------------------------------------------------------------- Hoeffding
// Half-width of the one-sided Hoeffding interval of a mean of m variables in
// [0, 1] at level alpha. Written as in bounds.py (ln(1 / alpha), not
// -ln(alpha)) so that host and reference round identically.
CERTSSB_HOST_DEVICE inline double hoeffding_width(int64_t m, double alpha) {
  return sqrt(log(1.0 / alpha) / (2.0 * static_cast<double>(m)));
}

// ----------------------------------------------------------------- PhiInv
// Host PhiInv: Acklam's rational approximation (relative error < 1.2e-9),
// then one Halley step on Phi(x) - p, which takes it to full double
// precision. Works on the lower tail q = min(p, 1 - p) (1 - p is exact for
// p >= 1/2) and, near the centre, on Phi(x) - 1/2 = erf(x / sqrt 2) / 2 so
// that values near 0 keep their relative precision.
CERTSSB_HOST_DEVICE inline double phi_inv_host(double p) {
  if (!(p > 0.0 && p < 1.0)) {
    if (p == 0.0) return -INFINITY;
    if (p == 1.0) return INFINITY;
    return NAN;
  }
  const bool upper = p > 0.5;
  const double q = upper ? 1.0 - p : p;  // in (0, 1/2]
  double x;
  if (q < 0.02425) {  // lower tail
    const double t = sqrt(-2.0 * log(q));
    x = (((((-7.784894002430293e-03 * t - 3.223964580411365e-01) * t -
            2.400758277161838e+00) * t - 2.549732539343734e+00) * t +
          4.374664141464968e+00) * t + 2.938163982698783e+00) /
        ((((7.784695709041462e-03 * t + 3.224671290700398e-01) * t +
           2.445134137142996e+00) * t + 3.754408661907416e+00) * t + 1.0);
  } else {  // central region
    const double r = q - 0.5;
    const double s = r * r;
    x = (((((-3.969683028665376e+01 * s + 2.209460984245205e+02) * s -
            2.759285104469687e+02) * s + 1.383577518672690e+02) * s -
          3.066479806614716e+01) * s + 2.506628277459239e+00) * r /
        (((((-5.447609879822406e+01 * s + 1.615858368580409e+02) * s -
            1.556989798598866e+02) * s + 6.680131188771972e+01) * s -
          1.328068155288572e+01) * s + 1.0);
  }
  // One Halley step. Phi(x) - q without cancellation: erf near the centre
  // (q - 1/2 is exact for q >= 1/4), erfc in the tail.
  const double e = q >= 0.25 ? 0.5 * erf(x * kSqrtHalf) - (q - 0.5)
                             : 0.5 * erfc(-x * kSqrtHalf) - q;
  if (e != 0.0) {
    // u = e / phi(x); in logs, since exp(x^2 / 2) overflows for q < 1e-300.
    const double u = copysign(exp(log(fabs(e)) + 0.5 * x * x), e) * kSqrt2Pi;
    x = x - u / (1.0 + 0.5 * x * u);
  }
  return upper ? -x : x;
}

// PhiInv(p) in double: CUDA's normcdfinv on the device (a few ulps), the host
// version above elsewhere. PhiInv(0) = -inf, PhiInv(1) = inf, NaN outside.
CERTSSB_HOST_DEVICE inline double phi_inv(double p) {
#if defined(__CUDA_ARCH__)
  return normcdfinv(p);
#else
  return phi_inv_host(p);
#endif
}

// PhiInv(p) in float (the radius proxy's float32 path).
CERTSSB_HOST_DEVICE inline float phi_inv(float p) {
#if defined(__CUDA_ARCH__)
  return normcdfinvf(p);
#else
  return static_cast<float>(phi_inv_host(static_cast<double>(p)));
#endif
}

// ----------------------------------------------------------------- lnGamma
// Stirling remainder delta(z) = lnGamma(z) - ((z - 1/2) ln z - z + ln(2pi)/2)
// for z >= kStirlingMin, from its asymptotic series
// sum_n B_2n / (2n (2n - 1) z^(2n - 1)), n = 1..7 (B_2n: Bernoulli numbers).
CERTSSB_HOST_DEVICE inline double stirling_delta(double z) {
  const double r = 1.0 / z;
  const double r2 = r * r;
  return r * (1.0 / 12.0 +
              r2 * (-1.0 / 360.0 +
                    r2 * (1.0 / 1260.0 +
                          r2 * (-1.0 / 1680.0 +
                                r2 * (1.0 / 1188.0 +
                                      r2 * (-691.0 / 360360.0 +
                                            r2 * (1.0 / 156.0)))))));
}

// lnGamma(l) - lnGamma(l + s) for l >= kStirlingMin, s > 0, written so that
// the two large lnGamma values never meet:
// -(l - 1/2) ln(1 + s / l) - s ln(l + s) + s + delta(l) - delta(l + s).
CERTSSB_HOST_DEVICE inline double lgamma_ratio(double l, double s) {
  return -(l - 0.5) * log1p(s / l) - s * log(l + s) + s + stirling_delta(l) -
         stirling_delta(l + s);
}

// ln B(a, b) for a, b > 0 with min(a, b) < kStirlingMin (both large is
// handled inside log_beta_prefactor).
CERTSSB_HOST_DEVICE inline double log_beta_small(double a, double b) {
  const double s = a < b ? a : b;
  const double l = a < b ? b : a;
  if (l < kStirlingMin) {
    // Gamma(s) Gamma(l) / Gamma(s + l): every factor below Gamma(20) ~ 1.2e17.
    return log(tgamma(s) * (tgamma(l) / tgamma(s + l)));
  }
  return log(tgamma(s)) + lgamma_ratio(l, s);
}

// log1p(t) - t without cancellation, for t > -1. With u = t / (2 + t):
// log1p(t) = 2 atanh(u) = 2 (u + u^3/3 + u^5/5 + ...) and t = 2u / (1 - u), so
// log1p(t) - t = -u t + 2 u^3 (1/3 + u^2/5 + u^4/7 + ...), summed while
// |u| <= 1/3 (t in [-1/2, 1], at most ~16 terms); directly elsewhere.
CERTSSB_HOST_DEVICE inline double log1pmx(double t) {
  if (!(t >= -0.5 && t <= 1.0)) return log1p(t) - t;
  const double u = t / (2.0 + t);
  const double u2 = u * u;
  double sum = 0.0;
  double power = 1.0;  // u^(2j)
  for (int j = 0; j < 40; ++j) {
    const double term = power / (2.0 * j + 3.0);
    sum += term;
    if (term <= 1e-17 * sum) break;
    power *= u2;
  }
  return -u * t + 2.0 * u * u2 * sum;
}

// The parts of ln(x^a y^b / B(a, b)) that do not depend on x, computed once
// per (a, b) so that the inverse's evaluations pay only for two logarithms.
struct BetaNorm {
  double a;
  double b;
  bool stirling;  // both a, b >= kStirlingMin: the centred form below
  double x0;      // a / (a + b)   (stirling only)
  double y0;      // b / (a + b)   (stirling only)
  double c;       // the constant term
};

CERTSSB_HOST_DEVICE inline BetaNorm make_beta_norm(double a, double b) {
  BetaNorm n{a, b, false, 0.0, 0.0, 0.0};
  if (a < kStirlingMin || b < kStirlingMin) {
    n.c = -log_beta_small(a, b);
    return n;
  }
  const double ab = a + b;
  n.stirling = true;
  n.x0 = a / ab;
  n.y0 = b / ab;
  n.c = 0.5 * log(n.x0 * b) - kHalfLog2Pi - stirling_delta(a) -
        stirling_delta(b) + stirling_delta(ab);
  return n;
}

// ln(x^a y^b / B(a, b)) for x, y = 1 - x in (0, 1). The caller passes both x
// and y; whichever is <= 1/2 is taken as exact and the other's logarithm comes
// from it through log1p, so that b ln(y) keeps full precision for small x
// (y = 1 - x rounded would cost b * 1e-16 in the exponent).
// For a, b large the exponent is centred at the mode-like point x0 = a/(a+b):
// with d = x - x0,
//   a ln(x / x0) + b ln(y / y0) = a log1pmx(d / x0) + b log1pmx(-d / y0),
// because the first-order terms a d / x0 - b d / y0 cancel exactly. The terms
// left are O(a d^2), so the exponent keeps an absolute precision near 1e-16
// instead of max(a, b) * 1e-16 (which would show in the quantile as 1e-15).
// Far below x0 (x < x0 / 2, where the first-order terms no longer nearly
// cancel) 1 + d / x0 = x / x0 would keep only the absolute precision 1e-16 of
// d / x0, which for x / x0 = 1e-10 is a relative error 1e-6 in the logarithm
// (the tail quantiles of tiny levels): there ln(x / x0) - d / x0 is used,
// from the exact x; likewise for y.
CERTSSB_HOST_DEVICE inline double log_beta_prefactor(const BetaNorm& n,
                                                     double x, double y) {
  if (n.stirling) {
    const double d = x <= 0.5 ? x - n.x0 : n.y0 - y;
    const double ta = d / n.x0;   // < -1/2 only where x < x0 / 2 <= 1/2: x exact
    const double tb = -d / n.y0;  // < -1/2 only where y < y0 / 2 <= 1/2: y exact
    const double la = ta < -0.5 ? log(x / n.x0) - ta : log1pmx(ta);
    const double lb = tb < -0.5 ? log(y / n.y0) - tb : log1pmx(tb);
    return n.a * la + n.b * lb + n.c;
  }
  const double lx = x <= 0.5 ? log(x) : log1p(-y);
  const double ly = y <= 0.5 ? log(y) : log1p(-x);
  return n.a * lx + n.b * ly + n.c;
}

// The continued fraction of A&S 26.5.8, so that
// I_x(a, b) = prefactor / a * incbeta_cf(a, b, x, 1 - x) for
// x < (a+1)/(a+b+2):  1 / (1 + d1 / (1 + d2 / (1 + ...))).
// Evaluated by the forward (Wallis) recurrence of its convergents
// A_n / B_n:  A_n = A_{n-1} + d_n A_{n-2}, B_n likewise, rescaled now and then.
// Unlike Lentz's method it has no division on its critical path (the
// recurrence only multiplies and adds); each pair of steps costs one division
// for the convergence test.
CERTSSB_HOST_DEVICE inline double incbeta_cf(double a, double b, double x,
                                             double y) {
  constexpr int kMaxIter = 100000;  // ~sqrt(max(a, b)) pairs are needed
  constexpr double kBig = 1e150;    // rescale the recurrence beyond this
  // d1 = -(a + b) x / (a + 1); 1 + d1 near x = 1 from the exact y instead,
  // where the subtraction would lose max(a, b) ulps.
  const double one_d1 = x <= 0.5 ? 1.0 - (a + b) * x / (a + 1.0)
                                 : ((1.0 - b) + (a + b) * y) / (a + 1.0);
  // Convergents: A_0 / B_0 = 1 / 1 (n = 1 of the fraction), then n = 2.
  double a_prev = 1.0, b_prev = 1.0;
  double a_cur = 1.0, b_cur = one_d1;
  double value = a_cur / b_cur;
  for (int j = 1; j <= kMaxIter; ++j) {
    const double jj = static_cast<double>(j);
    const double a2j = a + 2.0 * jj;
    // even step d_{2j} = j (b - j) x / ((a + 2j - 1)(a + 2j))
    const double de = jj * (b - jj) * x / ((a2j - 1.0) * a2j);
    // odd step d_{2j+1} = -(a + j)(a + b + j) x / ((a + 2j)(a + 2j + 1))
    const double dod = -(a + jj) * (a + b + jj) * x / (a2j * (a2j + 1.0));
    double a_n = a_cur + de * a_prev;
    double b_n = b_cur + de * b_prev;
    a_prev = a_cur;
    b_prev = b_cur;
    a_cur = a_n;
    b_cur = b_n;
    a_n = a_cur + dod * a_prev;
    b_n = b_cur + dod * b_prev;
    a_prev = a_cur;
    b_prev = b_cur;
    a_cur = a_n;
    b_cur = b_n;
    const double scale = fabs(b_cur);
    if (scale > kBig || (scale < 1.0 / kBig && scale > 0.0)) {
      const double r = 1.0 / scale;
      a_prev *= r;
      b_prev *= r;
      a_cur *= r;
      b_cur *= r;
    }
    const double next = a_cur / b_cur;
    if (fabs(next - value) <= 0.5 * kDoubleEps * fabs(next)) return next;
    value = next;
  }
  return value;
}

// I_x(a, b) and the Beta(a, b) density at x, from one prefactor.
struct IncBeta {
  double value;    // I_x(a, b)
  double density;  // x^(a-1) (1-x)^(b-1) / B(a, b)
};

// I_x(a, b) for x in [0, 1], with y = 1 - x given separately (see
// log_beta_prefactor).
CERTSSB_HOST_DEVICE inline IncBeta incbeta_eval(const BetaNorm& n, double x,
                                                double y) {
  const double a = n.a;
  const double b = n.b;
  if (!(x > 0.0)) return IncBeta{0.0, a < 1.0 ? INFINITY : (a == 1.0 ? b : 0.0)};
  if (!(y > 0.0)) return IncBeta{1.0, b < 1.0 ? INFINITY : (b == 1.0 ? a : 0.0)};
  const double pref = exp(log_beta_prefactor(n, x, y));
  const double density = pref / (x * y);
  if (x < (a + 1.0) / (a + b + 2.0)) {
    return IncBeta{pref * incbeta_cf(a, b, x, y) / a, density};
  }
  return IncBeta{1.0 - pref * incbeta_cf(b, a, y, x) / b, density};  // symmetry
}

// The regularized incomplete beta function I_x(a, b), a, b > 0, x in [0, 1].
CERTSSB_HOST_DEVICE inline double incbeta(double a, double b, double x) {
  if (!(a > 0.0 && b > 0.0 && x >= 0.0 && x <= 1.0)) return NAN;
  return incbeta_eval(make_beta_norm(a, b), x, 1.0 - x).value;
}

// Starting point of the inverse: Abramowitz & Stegun 26.5.22 for a, b >= 1
// (a normal approximation in the logit scale), else the two tail power laws
// I_x ~ x^a / (a B) and 1 - I_x ~ (1-x)^b / (b B).
CERTSSB_HOST_DEVICE inline double incbeta_inv_guess(double a, double b,
                                                    double p) {
  if (a >= 1.0 && b >= 1.0) {
    const double z = -phi_inv(p);  // upper-tail normal quantile of p
    const double lam = (z * z - 3.0) / 6.0;
    const double h = 2.0 / (1.0 / (2.0 * a - 1.0) + 1.0 / (2.0 * b - 1.0));
    const double w = z * sqrt(h + lam) / h -
                     (1.0 / (2.0 * b - 1.0) - 1.0 / (2.0 * a - 1.0)) *
                         (lam + 5.0 / 6.0 - 2.0 / (3.0 * h));
    return a / (a + b * exp(2.0 * w));
  }
  const double lx = log(a / (a + b));
  const double ly = log(b / (a + b));
  const double t = exp(a * lx) / a;
  const double u = exp(b * ly) / b;
  const double tot = t + u;
  if (p < t / tot) return pow(a * tot * p, 1.0 / a);
  return 1.0 - pow(b * tot * (1.0 - p), 1.0 / b);
}

// A point of the inverse's search: x and y = 1 - x, the smaller of the two
// held exactly (the other is 1 minus it, rounded), so that a quantile near 1
// is found to full relative precision in 1 - x, as a quantile near 0 is in x.
struct UnitPoint {
  double x;
  double y;
};

CERTSSB_HOST_DEVICE inline UnitPoint unit_from_x(double x) {
  return UnitPoint{x, 1.0 - x};
}
CERTSSB_HOST_DEVICE inline UnitPoint unit_from_y(double y) {
  return UnitPoint{1.0 - y, y};
}

// The smallest positive double: the lower end of a geometric bisection whose
// bracket still starts at 0.
constexpr double kTinyPositive = 4.9406564584124654e-324;

// A point between lo and hi (lo.x < hi.x), halving the bracket in the
// coordinate that is small there, geometrically across orders of magnitude
// (an end at 0 counts as the smallest positive double, so that a quantile of
// 1e-150 is reached in ~10 halvings of its exponent, not ~250 quarterings).
// sqrt(l) * sqrt(h) cannot underflow to 0 as sqrt(l * h) could.
CERTSSB_HOST_DEVICE inline double geometric_mid(double l, double h) {
  const double lp = l > 0.0 ? l : kTinyPositive;
  return h > 4.0 * lp ? sqrt(lp) * sqrt(h) : 0.5 * (l + h);
}

CERTSSB_HOST_DEVICE inline UnitPoint unit_bisect(UnitPoint lo, UnitPoint hi) {
  if (hi.x <= 0.5) return unit_from_x(geometric_mid(lo.x, hi.x));
  if (lo.y <= 0.5) return unit_from_y(geometric_mid(hi.y, lo.y));
  return unit_from_x(0.5);  // the bracket straddles 1/2
}

// The p quantile of Beta(a, b): the x with I_x(a, b) = p, for a, b > 0 and
// p in [0, 1] (NaN outside). Closed forms for b = 1 (x = p^(1/a)) and a = 1
// (x = 1 - (1 - p)^(1/b)); otherwise Halley steps (in whichever of x, 1 - x is
// below 1/2) safeguarded by a bracket that every evaluation shrinks, until a
// step is below 4 ulps. A step that is not below a quarter of the previous
// move is crawling (from far above a tail quantile, Halley only multiplies x
// by (a - 1) / (a + 1) per step: 600 steps from 1/2 down to 1e-50 at a = 6)
// and is replaced by a (geometric) bisection. Should the iteration cap be
// reached anyway, the lower end of the bracket is returned: I(lo) <= p, so
// the result is never above the quantile (a lower confidence bound that errs
// only on the safe side).
CERTSSB_HOST_DEVICE inline double incbeta_inv(double a, double b, double p) {
  if (!(a > 0.0 && b > 0.0 && p >= 0.0 && p <= 1.0)) return NAN;
  if (p == 0.0) return 0.0;
  if (p == 1.0) return 1.0;
  if (b == 1.0) return exp(log(p) / a);
  if (a == 1.0) return -expm1(log1p(-p) / b);
  UnitPoint lo{0.0, 1.0};  // I(lo) <= p <= I(hi) throughout
  UnitPoint hi{1.0, 0.0};
  double guess = incbeta_inv_guess(a, b, p);
  if (!(guess > 0.0 && guess < 1.0)) guess = 0.5;
  UnitPoint pt = unit_from_x(guess);
  const BetaNorm norm = make_beta_norm(a, b);
  double last_move = INFINITY;  // |x change| of the previous iteration
  bool converged = false;
  for (int iter = 0; iter < 300; ++iter) {
    const IncBeta ib = incbeta_eval(norm, pt.x, pt.y);
    const double f = ib.value - p;
    if (f == 0.0) {
      converged = true;
      break;
    }
    if (f < 0.0) {
      lo = pt;
    } else {
      hi = pt;
    }
    const bool in_y = pt.x > 0.5;  // step in the small coordinate
    const double scale = in_y ? pt.y : pt.x;
    if (ib.density > 0.0 && isfinite(ib.density)) {
      const double newton = f / ib.density;  // in x units
      // Halley: divide the Newton step by 1 - f f'' / (2 f'^2).
      const double curv = (a - 1.0) / pt.x - (b - 1.0) / pt.y;
      const double denom = 1.0 - 0.5 * newton * curv;
      const bool halley = denom > 0.5 && denom < 2.0;
      const double step = halley ? newton / denom : newton;
      const UnitPoint next =
          in_y ? unit_from_y(pt.y + step) : unit_from_x(pt.x - step);
      // Converged: a step at the rounding level of the point (it may even
      // round back onto the bracket end that pt just became), or a Halley step
      // below 1e-7 relative, whose cubic convergence leaves an error far
      // below one ulp (this saves the confirming evaluation; checked against
      // fully iterated solves for every k <= m <= 10000).
      if (fabs(step) <= (halley ? kHalleyAccept : 4.0 * kDoubleEps) * scale) {
        pt = next;
        converged = true;
        break;
      }
      const bool inside = in_y ? (next.y < lo.y && next.y > hi.y)
                               : (next.x > lo.x && next.x < hi.x);
      if (inside && fabs(step) <= 0.25 * last_move) {
        last_move = fabs(step);
        pt = next;
        continue;
      }
    }
    // No usable step, one leaving the bracket or a crawling one: bisect
    // instead, unless the bracket is already at the rounding level.
    if (in_y ? !(lo.y - hi.y > 4.0 * kDoubleEps * hi.y)
             : !(hi.x - lo.x > 4.0 * kDoubleEps * lo.x)) {
      converged = true;
      break;
    }
    const UnitPoint mid = unit_bisect(lo, hi);
    last_move = in_y ? fabs(mid.y - pt.y) : fabs(mid.x - pt.x);
    pt = mid;
  }
  return converged ? pt.x : lo.x;
}

// One-sided Clopper-Pearson lower bound for k successes in m trials at level
// p: the p quantile of Beta(k, m - k + 1); 0 for k = 0.
CERTSSB_HOST_DEVICE inline double clopper_pearson_lower(int64_t k, int64_t m,
                                                        double p) {
  if (k <= 0) return 0.0;
  return incbeta_inv(static_cast<double>(k), static_cast<double>(m - k + 1), p);
}

}  // namespace stats
}  // namespace certssb
