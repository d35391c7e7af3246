// philox.h: the project's one random-number definition, Philox4x32-10 plus
// Box-Muller, usable unchanged from host C++ and from CUDA device code.
//
// Every Gaussian draw of certssb is a pure function of
// (seed, stream, a, b, element) (DESIGN.md section 2):
//
//   key     = (k0, k1) = (seed & 0xffffffff, seed >> 32)        [split_seed]
//   counter = (c0, c1, c2, c3) = (stream, a, b, element / 4)
//   (x0, x1, x2, x3) = Philox4x32-10(counter, key)              [philox4x32_10]
//   (z0, z1, z2, z3) = box_muller4(x0, x1, x2, x3)              [box_muller4]
//   normal(element) = z[element % 4], cast to the output dtype last.
//
// Philox4x32-10 (Salmon et al., SC'11; Random123): 10 rounds; each round
//   (hi0, lo0) = mulhilo(M0, c0),  (hi1, lo1) = mulhilo(M1, c2)
//   c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
// and between rounds the key is bumped: k0 += W0, k1 += W1 (mod 2^32), with
// M0 = 0xD2511F53, M1 = 0xCD9E8D57, W0 = 0x9E3779B9, W1 = 0xBB67AE85.
//
// Bits to floats (Box-Muller), all in double precision, for each pair
// (a, b) in ((x0, x1), (x2, x3)):
//   u1 = (a + 1) * 2^-32      in (0, 1]   (never 0, so log(u1) is finite)
//   u2 =  b      * 2^-32      in [0, 1)
//   r  = sqrt(-2 * log(u1))
//   first  = r * cos(2pi * u2),  second = r * sin(2pi * u2)
// with 2pi the double nearest 2*pi (6.283185307179586). Output order:
// z0 = first(x0, x1), z1 = second(x0, x1), z2 = first(x2, x3),
// z3 = second(x2, x3). The pure-PyTorch reference must do exactly this.
//
// This header includes only <stdint.h> and <math.h>, so a raw .cu file can use
// it beside cuda_runtime.h without any torch header.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define CERTSSB_HOST_DEVICE __host__ __device__
#else
#define CERTSSB_HOST_DEVICE
#endif

namespace certssb {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u;  // round multiplier for c0
constexpr uint32_t kM1 = 0xCD9E8D57u;  // round multiplier for c2
constexpr uint32_t kW0 = 0x9E3779B9u;  // key bump for k0 (golden ratio)
constexpr uint32_t kW1 = 0xBB67AE85u;  // key bump for k1 (sqrt(3) - 1)
constexpr int kRounds = 10;

// 2^-32, exact in double.
constexpr double kTwoPow32Inv = 1.0 / 4294967296.0;
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

// Four standard normals, in double; callers cast to their dtype last.
struct Normal4 {
  double z[4];
};

// The 64-bit seed keys Philox as k0 = low word, k1 = high word.
CERTSSB_HOST_DEVICE constexpr Key split_seed(uint64_t seed) {
  return Key{static_cast<uint32_t>(seed & 0xffffffffu),
             static_cast<uint32_t>(seed >> 32)};
}

// One Philox round on counter c with round key (k0, k1).
CERTSSB_HOST_DEVICE constexpr U32x4 philox_round(U32x4 c, uint32_t k0,
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
CERTSSB_HOST_DEVICE constexpr U32x4 philox4x32_10(U32x4 counter, Key key) {
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
// four consecutive elements share one Philox call.
CERTSSB_HOST_DEVICE constexpr U32x4 make_counter(uint32_t stream, uint32_t a,
                                                 uint32_t b, uint32_t block) {
  return U32x4{{stream, a, b, block}};
}

// Box-Muller on four uint32 words, in double, as documented at the top.
CERTSSB_HOST_DEVICE inline Normal4 box_muller4(U32x4 x) {
  Normal4 out{};
  for (int pair = 0; pair < 2; ++pair) {
    const double u1 = (static_cast<double>(x.v[2 * pair]) + 1.0) * kTwoPow32Inv;
    const double u2 = static_cast<double>(x.v[2 * pair + 1]) * kTwoPow32Inv;
    const double r = ::sqrt(-2.0 * ::log(u1));
    const double theta = kTwoPi * u2;
    out.z[2 * pair] = r * ::cos(theta);
    out.z[2 * pair + 1] = r * ::sin(theta);
  }
  return out;
}

// The four normals of Philox block `counter` under `key`.
CERTSSB_HOST_DEVICE inline Normal4 normal4(U32x4 counter, Key key) {
  return box_muller4(philox4x32_10(counter, key));
}

}  // namespace philox
}  // namespace certssb
