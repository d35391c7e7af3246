// philox_unit.cpp: compiles csrc/philox.h into every build and checks it at
// compile time against the Random123 known-answer vectors, so a broken
// Philox (or 53-bit uniform mapping) can never ship (the noise kernels that use it come later).
#include "../philox.h"

namespace certssb {
namespace philox {
namespace {

constexpr bool equals(U32x4 got, uint32_t a, uint32_t b, uint32_t c,
                      uint32_t d) {
  return got.v[0] == a && got.v[1] == b && got.v[2] == c && got.v[3] == d;
}

static_assert(equals(philox4x32_10(U32x4{{0u, 0u, 0u, 0u}}, Key{0u, 0u}),
                     0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u),
              "Philox4x32-10 known-answer test (zeros) failed");
static_assert(equals(philox4x32_10(U32x4{{0xffffffffu, 0xffffffffu,
                                          0xffffffffu, 0xffffffffu}},
                                   Key{0xffffffffu, 0xffffffffu}),
                     0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu),
              "Philox4x32-10 known-answer test (ones) failed");
static_assert(equals(philox4x32_10(U32x4{{0x243f6a88u, 0x85a308d3u,
                                          0x13198a2eu, 0x03707344u}},
                                   Key{0xa4093822u, 0x299f31d0u}),
                     0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u),
              "Philox4x32-10 known-answer test (pi digits) failed");
static_assert(bits53(0u, 0u) == 0u && bits53(0u, 0x800u) == 1u &&
                  bits53(0xffffffffu, 0xffffffffu) == (uint64_t{1} << 53) - 1 &&
                  bits53(0x80000000u, 0x7ffu) == (uint64_t{1} << 52),
              "bits53 must take the top 53 bits of hi:lo (Box-Muller's uniforms)");
static_assert(horner(2.0, 1.0, -3.0, 5.0) == 3.0, "horner: 1 x^2 - 3 x + 5 at x = 2");
static_assert(split_seed(0x0123456789abcdefull).k0 == 0x89abcdefu &&
                  split_seed(0x0123456789abcdefull).k1 == 0x01234567u,
              "split_seed must put the low word in k0");

}  // namespace
}  // namespace philox
}  // namespace certssb
