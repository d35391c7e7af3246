// philox.h: the project's one random-number definition, Philox4x32-10 plus
// Box-Muller, usable unchanged from host C++ and from CUDA device code.
//
// Every Gaussian draw of certssb is a pure function of
// (seed, stream, a, b, element) (docs/THEORY.md section 8):
//
//   key     = (k0, k1) = (seed & 0xffffffff, seed >> 32)        [split_seed]
//   counter = (c0, c1, c2, c3) = (stream, a, b, element / 2)
//   (x0, x1, x2, x3) = Philox4x32-10(counter, key)              [philox4x32_10]
//   (z0, z1) = box_muller2(x0, x1, x2, x3)                      [box_muller2]
//   normal(element) = z[element % 2], cast to the output dtype last.
//
// Philox4x32-10 (Salmon et al., SC'11; Random123): 10 rounds; each round
//   (hi0, lo0) = mulhilo(M0, c0),  (hi1, lo1) = mulhilo(M1, c2)
//   c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
// and between rounds the key is bumped: k0 += W0, k1 += W1 (mod 2^32), with
// M0 = 0xD2511F53, M1 = 0xCD9E8D57, W0 = 0x9E3779B9, W1 = 0xBB67AE85.
//
// Bits to floats (Box-Muller), all in double precision. Each uniform takes 53
// bits of two words, k(hi, lo) = hi * 2^21 + (lo >> 11) in [0, 2^53)  [bits53]:
//   u1 = (k(x0, x1) + 1) * 2^-53   in (0, 1]   (never 0, so log(u1) is finite)
//   u2 =  k(x2, x3)      * 2^-53   in [0, 1)
//   r  = sqrt(-2 * log(u1))
//   z0 = r * cos(2pi * u2),  z1 = r * sin(2pi * u2)
// with 2pi the double nearest 2*pi (6.283185307179586). The pure-PyTorch
// reference must do exactly this.
//
// Why 53 bits for u1: with a 32-bit u1 the smallest value is 2^-32, so |z|
// never exceeds 6.66 and each pair loses 2^-32 of Gaussian mass, which summed
// over a training set's pairs is a total-variation gap the certificate does not
// allow for. With 53 bits the loss is at most 2^-53 per pair (docs/THEORY.md
// sections 7 and 8). u2 only sets the angle: 32 bits would lose no mass, but
// the one Philox call per pair yields the two words anyway, and the same
// 53-bit mapping for both keeps one helper and a finer angle grid.
//
// This header includes only <stdint.h>, <math.h> and <string.h>, so a raw .cu file can use
// it beside cuda_runtime.h without any torch header.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>  // memcpy: bit casts that host and device compilers both accept

#if defined(__CUDACC__)
#define CERTSSB_HOST_DEVICE __host__ __device__
#define CERTSSB_INLINE __forceinline__
#elif defined(__GNUC__)
#define CERTSSB_HOST_DEVICE
// Forced: the CPU noise kernel's loops are compiled for several instruction
// sets (target_clones), and GCC will not otherwise inline these helpers into
// them, which stops the loops from vectorizing.
#define CERTSSB_INLINE inline __attribute__((always_inline))
#else
#define CERTSSB_HOST_DEVICE
#define CERTSSB_INLINE inline
#endif

namespace certssb {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u;  // round multiplier for c0
constexpr uint32_t kM1 = 0xCD9E8D57u;  // round multiplier for c2
constexpr uint32_t kW0 = 0x9E3779B9u;  // key bump for k0 (golden ratio)
constexpr uint32_t kW1 = 0xBB67AE85u;  // key bump for k1 (sqrt(3) - 1)
constexpr int kRounds = 10;

// 2^-53, exact in double.
constexpr double kTwoPow53Inv = 1.0 / 9007199254740992.0;
// The double nearest 2*pi (= 2 * the double nearest pi, exactly).
constexpr double kTwoPi = 6.283185307179586476925286766559;

// Four 32-bit words: a Philox counter or output, or a seed-derived key pair.
struct U32x4 {
  uint32_t v[4];
};

struct Key {
  uint32_t k0;
  uint32_t k1;
};

// Two standard normals, in double; callers cast to their dtype last.
struct Normal2 {
  double z[2];
};

// The 64-bit seed keys Philox as k0 = low word, k1 = high word.
CERTSSB_HOST_DEVICE constexpr Key split_seed(uint64_t seed) {
  return Key{static_cast<uint32_t>(seed & 0xffffffffu),
             static_cast<uint32_t>(seed >> 32)};
}

// One Philox round on counter c with round key (k0, k1).
CERTSSB_HOST_DEVICE CERTSSB_INLINE constexpr U32x4 philox_round(U32x4 c, uint32_t k0,
                                                 uint32_t k1) {
  // 32x32 -> 64-bit products; the high and low words feed the next round.
  const uint64_t p0 = static_cast<uint64_t>(kM0) * c.v[0];
  const uint64_t p1 = static_cast<uint64_t>(kM1) * c.v[2];
  const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32);
  const uint32_t lo0 = static_cast<uint32_t>(p0);
  const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32);
  const uint32_t lo1 = static_cast<uint32_t>(p1);
  return U32x4{{hi1 ^ c.v[1] ^ k0, lo1, hi0 ^ c.v[3] ^ k1, lo0}};
}

// Philox4x32-10: 10 rounds, the key bumped by (W0, W1) between rounds.
CERTSSB_HOST_DEVICE CERTSSB_INLINE constexpr U32x4 philox4x32_10(U32x4 counter, Key key) {
  uint32_t k0 = key.k0;
  uint32_t k1 = key.k1;
  U32x4 c = counter;
  for (int round = 0; round < kRounds; ++round) {
    if (round > 0) {
      k0 += kW0;  // wraps mod 2^32 (unsigned arithmetic)
      k1 += kW1;
    }
    c = philox_round(c, k0, k1);
  }
  return c;
}

// The counter of element `element` of the noise stream (stream, a, b):
// two consecutive elements (block = element / 2) share one Philox call.
CERTSSB_HOST_DEVICE constexpr U32x4 make_counter(uint32_t stream, uint32_t a,
                                                 uint32_t b, uint32_t block) {
  return U32x4{{stream, a, b, block}};
}

// k(hi, lo) = hi * 2^21 + (lo >> 11): the top 53 bits of the 64-bit word hi:lo.
CERTSSB_HOST_DEVICE CERTSSB_INLINE constexpr uint64_t bits53(uint32_t hi, uint32_t lo) {
  return (static_cast<uint64_t>(hi) << 21) | static_cast<uint64_t>(lo >> 11);
}

// Box-Muller on the four words of one Philox call, in double, as documented at the top.
CERTSSB_HOST_DEVICE inline Normal2 box_muller2(U32x4 x) {
  const double u1 = (static_cast<double>(bits53(x.v[0], x.v[1])) + 1.0) * kTwoPow53Inv;
  const double u2 = static_cast<double>(bits53(x.v[2], x.v[3])) * kTwoPow53Inv;
  const double r = ::sqrt(-2.0 * ::log(u1));
  const double theta = kTwoPi * u2;
  return Normal2{{r * ::cos(theta), r * ::sin(theta)}};
}

// The two normals of Philox block `counter` under `key`.
CERTSSB_HOST_DEVICE inline Normal2 normal2(U32x4 counter, Key key) {
  return box_muller2(philox4x32_10(counter, key));
}

// c[0] x^(n-1) + c[1] x^(n-2) + ... + c[n-1] by Horner's rule, as written out
// term by term (p = c0; p = p x + c1; ...).
CERTSSB_HOST_DEVICE CERTSSB_INLINE constexpr double horner(double, double c) { return c; }
template <typename... Rest>
CERTSSB_HOST_DEVICE CERTSSB_INLINE constexpr double horner(double x, double c0, double c1,
                                                           Rest... rest) {
  return horner(x, c0 * x + c1, rest...);
}

// ---------------------------------------------------------------------------
// The same Box-Muller with branch-free polynomial log, sin and cos, so that
// loops over many blocks vectorize (libm calls do not) and CPU and CUDA
// kernels share one arithmetic. It computes the same mathematical values as
// box_muller2: the relative error of each piece is below 1e-14 (checked
// against box_muller2 by the tests), far inside the 1e-6 agreement that the
// kernels promise after the cast to float.
//
// 1 / d and sqrt(v) for the Box-Muller below. On the GPU a float32 estimate
// refined by two Newton steps in double (error ~ (2^-23)^4, far below double
// rounding) is several times cheaper than IEEE double division and square
// root; on the CPU the hardware instructions vectorize and are used directly.
CERTSSB_HOST_DEVICE CERTSSB_INLINE double reciprocal(double d) {  // d in [1.7, 2.5]
#if defined(__CUDA_ARCH__)
  double y = static_cast<double>(__frcp_rn(static_cast<float>(d)));
  y = y * (2.0 - d * y);
  y = y * (2.0 - d * y);
  return y;
#else
  return 1.0 / d;
#endif
}

CERTSSB_HOST_DEVICE CERTSSB_INLINE double sqrt_nonneg(double v) {  // v in [0, 73.5]
#if defined(__CUDA_ARCH__)
  if (!(v > 0.0)) return 0.0;
  double y = static_cast<double>(rsqrtf(static_cast<float>(v)));  // ~ 1 / sqrt(v)
  y = y * (1.5 - 0.5 * v * y * y);
  y = y * (1.5 - 0.5 * v * y * y);
  return v * y;
#else
  return sqrt(v);
#endif
}

// -2 ln(u1), u1 = (k + 1) 2^-53, k = bits53(...) < 2^53: write k + 1 = m 2^e
// with m in [sqrt(1/2), sqrt(2)), so ln(u1) = (e - 53) ln 2 + ln(m), and
// ln(m) = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.1716, by its odd series
// (terms to s^19: truncation below 1e-16 relative). Near u1 = 1 the exponent
// term vanishes, so the small result keeps full relative precision.
CERTSSB_HOST_DEVICE CERTSSB_INLINE double neg2_log_u1(uint64_t k) {
  const double v = static_cast<double>(k) + 1.0;  // exact: <= 2^53
  uint64_t bits;
  memcpy(&bits, &v, sizeof bits);
  int64_t e = static_cast<int64_t>((bits >> 52) & 0x7ff) - 1023;
  const uint64_t mbits = (bits & 0x000fffffffffffffull) | 0x3ff0000000000000ull;
  double m;
  memcpy(&m, &mbits, sizeof m);  // m in [1, 2)
  const bool big = m > 1.4142135623730951;
  m = big ? 0.5 * m : m;
  e = big ? e + 1 : e;
  const double s = (m - 1.0) * reciprocal(m + 1.0);
  // 2 * (1 + s2/3 + s2^2/5 + ... + s2^9/19)
  const double p = horner(s * s, 2.0 / 19.0, 2.0 / 17.0, 2.0 / 15.0, 2.0 / 13.0, 2.0 / 11.0,
                          2.0 / 9.0, 2.0 / 7.0, 2.0 / 5.0, 2.0 / 3.0, 2.0);
  const double ln_m = s * p;
  constexpr double kLn2 = 0.6931471805599453094172321214581766;
  const double ln_u1 = static_cast<double>(e - 53) * kLn2 + ln_m;
  return -2.0 * ln_u1;
}

// x rounded to the nearest integer (ties to even) for |x| < 2^51, by adding and
// removing 1.5 * 2^52. Unlike floor() it vectorizes without -ffast-math;
// compilers keep (x + C) - C as written unless fast-math is on.
CERTSSB_HOST_DEVICE CERTSSB_INLINE double round_small(double x) {
  constexpr double kMagic = 6755399441055744.0;  // 1.5 * 2^52
  return (x + kMagic) - kMagic;
}

// (cos, sin) of 2 pi u2, u2 = k 2^-53, k = bits53(...): with t = 4 u2 = n + f, n the nearest
// integer, f in [-1/2, 1/2] (both exact), the angle f pi/2 lies in
// [-pi/4, pi/4], where Taylor series to degree 16/17 are exact to below
// 1e-16; the quadrant n mod 4 then swaps and negates. (A tie t = n + 1/2 may
// round either way: both give the same angle.)
CERTSSB_HOST_DEVICE CERTSSB_INLINE void cos_sin_2pi_u2(uint64_t k, double* c, double* s) {
  const double t = static_cast<double>(k) * (4.0 * kTwoPow53Inv);  // exact: k < 2^53
  const double n = round_small(t);
  const double f = t - n;  // exact
  constexpr double kHalfPi = 1.5707963267948966192313216916397514;
  const double x = f * kHalfPi;
  const double x2 = x * x;
  // sin x = x (1 - x2/3! + x2^2/5! - ... + x2^8/17!)
  const double sx = x * horner(x2, 1.0 / 355687428096000.0, -1.0 / 1307674368000.0,
                               1.0 / 6227020800.0, -1.0 / 39916800.0, 1.0 / 362880.0,
                               -1.0 / 5040.0, 1.0 / 120.0, -1.0 / 6.0, 1.0);
  // cos x = 1 - x2/2! + x2^2/4! - ... + x2^8/16!
  const double cx = horner(x2, 1.0 / 20922789888000.0, -1.0 / 87178291200.0,
                           1.0 / 479001600.0, -1.0 / 3628800.0, 1.0 / 40320.0, -1.0 / 720.0,
                           1.0 / 24.0, -1.0 / 2.0, 1.0);
  // angle = q pi/2 + x, q = n mod 4: rotate (cos x, sin x) by q quarter
  // turns: q = 0: (c, s), 1: (-s, c), 2: (-c, -s), 3: (s, -c). Computed with
  // 0/1 and +-1 factors in double (exact: one term is x, the other 0) rather
  // than branches or integer selects, so the loop around it vectorizes.
  // The floors below act on multiples of 1/4 (or 1/2), so they are roundings
  // of the argument shifted down by 3/8 (or 1/4).
  const double q = n - 4.0 * round_small(0.25 * n - 0.375);                       // 0..3
  const double odd = q - 2.0 * round_small(0.5 * q - 0.25);                      // q = 1, 3
  const double neg_c = round_small(0.5 * (q + 1.0) - 0.25) -
                       2.0 * round_small(0.25 * (q + 1.0) - 0.375);             // q = 1, 2
  const double neg_s = round_small(0.5 * q - 0.25);                              // q = 2, 3
  const double base_c = (1.0 - odd) * cx + odd * sx;
  const double base_s = (1.0 - odd) * sx + odd * cx;
  *c = (1.0 - 2.0 * neg_c) * base_c;
  *s = (1.0 - 2.0 * neg_s) * base_s;
}

// box_muller2 through the polynomial pieces above.
CERTSSB_HOST_DEVICE CERTSSB_INLINE Normal2 box_muller2_poly(U32x4 x) {
  const double r = sqrt_nonneg(neg2_log_u1(bits53(x.v[0], x.v[1])));
  double c, s;
  cos_sin_2pi_u2(bits53(x.v[2], x.v[3]), &c, &s);
  return Normal2{{r * c, r * s}};
}

}  // namespace philox
}  // namespace certssb
