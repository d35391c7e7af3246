// noise.cpp: CPU kernels of certssb::noise and certssb::noise_sigma_grad.
//
//   noise:            out[k, b, e] = x[b, e] + sigma[b] * eps(seed, stream, k0 + k, ids[b], e)
//   noise_sigma_grad: g[b] = sum_k sum_e grad[k, b, e] * eps(seed, stream, k0 + k, ids[b], e)
//
// eps is regenerated from Philox4x32-10 + Box-Muller (philox.h) and never
// stored. The arithmetic follows the pure-PyTorch reference (noise.py): eps is
// cast to the output dtype, then sigma * eps + x in that dtype (float32 for
// half and bfloat16, rounded once at the end).
//
// Speed: normals are made in chunks of 128 Philox blocks (one block = one
// pair of normals), first the 128 Philox calls into two arrays of 53-bit
// words, then Box-Muller with the polynomial pieces of philox.h over the
// pairs; both loops vectorize. The chunk functions are
// compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "checks.h"
#include "philox.h"

namespace certssb {
namespace {

using philox::Key;

constexpr int64_t kChunkBlocks = 128;              // Philox calls per chunk
constexpr int64_t kChunkElems = 2 * kChunkBlocks;  // normals per chunk

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(CERTSSB_DEBUG)
#define CERTSSB_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CERTSSB_SIMD_CLONES
#endif

// z[0 .. 2 * nblk) = the normals of Philox blocks blk0 .. blk0 + nblk - 1 of
// stream (stream, a, b), in element order.
CERTSSB_SIMD_CLONES
void normals_chunk(Key key, uint32_t stream, uint32_t a, uint32_t b, uint32_t blk0,
                   int64_t nblk, double* __restrict z) {
  uint64_t k1[kChunkBlocks], k2[kChunkBlocks];  // the 53-bit words of u1 and u2
  for (int64_t j = 0; j < nblk; ++j) {
    const philox::U32x4 c = philox::philox4x32_10(
        philox::make_counter(stream, a, b, blk0 + static_cast<uint32_t>(j)), key);
    k1[j] = philox::bits53(c.v[0], c.v[1]);
    k2[j] = philox::bits53(c.v[2], c.v[3]);
  }
  for (int64_t j = 0; j < nblk; ++j) {
    const double r = sqrt(philox::neg2_log_u1(k1[j]));
    double c, s;
    philox::cos_sin_2pi_u2(k2[j], &c, &s);
    z[2 * j + 0] = r * c;
    z[2 * j + 1] = r * s;
  }
}

// Normals of elements [e0, e0 + n) of stream (stream, a, b) into z; e0 % 2 == 0.
inline void normals_span(Key key, uint32_t stream, uint32_t a, uint32_t b, int64_t e0, int64_t n,
                         double* z) {
  const int64_t nblk = (n + 1) / 2;
  normals_chunk(key, stream, a, b, static_cast<uint32_t>(e0 / 2), nblk, z);
}

// The dtype of the arithmetic: the input's own, float32 for half and bfloat16.
template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

template <typename scalar_t>
void noise_forward(const scalar_t* x, const acc_t<scalar_t>* sigma, const int64_t* ids,
                   scalar_t* out, int64_t K, int64_t B, int64_t D, Key key, uint32_t stream,
                   uint32_t k0) {
  using acc = acc_t<scalar_t>;
  // Rows (k, b) in parallel; a grain of about 64 Ki elements per task.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(D, 1));
  at::parallel_for(0, K * B, grain, [&](int64_t begin, int64_t end) {
    double z[kChunkElems];
    for (int64_t row = begin; row < end; ++row) {
      const int64_t k = row / B;
      const int64_t b = row % B;
      const uint32_t a = k0 + static_cast<uint32_t>(k);
      const uint32_t id = static_cast<uint32_t>(ids[b]);
      const acc s = sigma[b];
      const scalar_t* xr = x + b * D;
      scalar_t* outr = out + row * D;
      for (int64_t e0 = 0; e0 < D; e0 += kChunkElems) {
        const int64_t n = std::min<int64_t>(kChunkElems, D - e0);
        normals_span(key, stream, a, id, e0, n, z);
        for (int64_t j = 0; j < n; ++j) {
          // eps is cast to the output dtype first, as in the reference.
          const acc eps = static_cast<acc>(static_cast<scalar_t>(z[j]));
          outr[e0 + j] = static_cast<scalar_t>(static_cast<acc>(xr[e0 + j]) + s * eps);
        }
      }
    }
  });
}

template <typename scalar_t>
void noise_sigma_grad_kernel(const scalar_t* grad, const int64_t* ids, acc_t<scalar_t>* out,
                             int64_t K, int64_t B, int64_t D, Key key, uint32_t stream,
                             uint32_t k0) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(K * D, 1));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    double z[kChunkElems];
    for (int64_t b = begin; b < end; ++b) {
      const uint32_t id = static_cast<uint32_t>(ids[b]);
      double total = 0.0;  // float64 accumulation whatever the dtype
      for (int64_t k = 0; k < K; ++k) {
        const scalar_t* gr = grad + (k * B + b) * D;
        const uint32_t a = k0 + static_cast<uint32_t>(k);
        for (int64_t e0 = 0; e0 < D; e0 += kChunkElems) {
          const int64_t n = std::min<int64_t>(kChunkElems, D - e0);
          normals_span(key, stream, a, id, e0, n, z);
          for (int64_t j = 0; j < n; ++j) {
            // d out / d sigma = eps as the forward used it (cast to the dtype).
            total += static_cast<double>(gr[e0 + j]) *
                     static_cast<double>(static_cast<scalar_t>(z[j]));
          }
        }
      }
      out[b] = static_cast<acc_t<scalar_t>>(total);
    }
  });
}

at::Tensor noise_cpu(const at::Tensor& x, const at::Tensor& sigma, const at::Tensor& ids,
                     int64_t seed, int64_t stream, int64_t k0, int64_t models) {
  at::Tensor out = checks::noise_args(x, sigma, ids, stream, k0, models);
  if (out.numel() == 0) return out;
  const at::Tensor ids_c = ids.contiguous();
  const at::Tensor x_c = x.contiguous();
  const int64_t B = x.size(0);
  const int64_t D = x_c.numel() / B;
  const Key key = philox::split_seed(static_cast<uint64_t>(seed));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "noise_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const at::Tensor sig = sigma.to(c10::CppTypeToScalarType<acc>::value).contiguous();
    noise_forward<scalar_t>(x_c.data_ptr<scalar_t>(), sig.data_ptr<acc>(),
                            ids_c.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), models, B, D, key,
                            static_cast<uint32_t>(stream), static_cast<uint32_t>(k0));
  });
  return out;
}

at::Tensor noise_sigma_grad_cpu(const at::Tensor& grad, const at::Tensor& ids, int64_t seed,
                                int64_t stream, int64_t k0) {
  const checks::SigmaGradArgs a = checks::noise_sigma_grad_args(grad, ids, stream, k0);
  if (a.empty()) return a.out;
  const at::Tensor ids_c = ids.contiguous();
  const at::Tensor g = grad.contiguous();
  const Key key = philox::split_seed(static_cast<uint64_t>(seed));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "noise_sigma_grad_cpu",
                                  [&] {
    using acc = acc_t<scalar_t>;
    noise_sigma_grad_kernel<scalar_t>(g.data_ptr<scalar_t>(), ids_c.data_ptr<int64_t>(),
                                      a.out.data_ptr<acc>(), a.K, a.B, a.D, key,
                                      static_cast<uint32_t>(stream), static_cast<uint32_t>(k0));
  });
  return a.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(certssb, CPU, m) { m.impl("noise", &noise_cpu).impl("noise_sigma_grad", &noise_sigma_grad_cpu); }

}  // namespace certssb
