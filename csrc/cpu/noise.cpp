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
// Speed: normals are made in chunks of 64 Philox blocks, first the 64 Philox
// calls into four word arrays, then Box-Muller with the polynomial pieces of
// philox.h over the pairs; both loops vectorize. The chunk functions are
// compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "philox.h"

namespace certssb {
namespace {

using philox::Key;

constexpr int64_t kChunkBlocks = 64;               // Philox calls per chunk
constexpr int64_t kChunkElems = 4 * kChunkBlocks;  // normals per chunk

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(CERTSSB_DEBUG)
#define CERTSSB_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CERTSSB_SIMD_CLONES
#endif

// z[0 .. 4 * nblk) = the normals of Philox blocks blk0 .. blk0 + nblk - 1 of
// stream (stream, a, b), in element order.
CERTSSB_SIMD_CLONES
void normals_chunk(Key key, uint32_t stream, uint32_t a, uint32_t b, uint32_t blk0,
                   int64_t nblk, double* __restrict z) {
  uint32_t w0[kChunkBlocks], w1[kChunkBlocks], w2[kChunkBlocks], w3[kChunkBlocks];
  for (int64_t j = 0; j < nblk; ++j) {
    const philox::U32x4 c = philox::philox4x32_10(
        philox::make_counter(stream, a, b, blk0 + static_cast<uint32_t>(j)), key);
    w0[j] = c.v[0];
    w1[j] = c.v[1];
    w2[j] = c.v[2];
    w3[j] = c.v[3];
  }
  for (int64_t j = 0; j < nblk; ++j) {
    const double r0 = sqrt(philox::neg2_log_u1(w0[j]));
    const double r1 = sqrt(philox::neg2_log_u1(w2[j]));
    double c0, s0, c1, s1;
    philox::cos_sin_2pi_u2(w1[j], &c0, &s0);
    philox::cos_sin_2pi_u2(w3[j], &c1, &s1);
    z[4 * j + 0] = r0 * c0;
    z[4 * j + 1] = r0 * s0;
    z[4 * j + 2] = r1 * c1;
    z[4 * j + 3] = r1 * s1;
  }
}

// Normals of elements [e0, e0 + n) of stream (stream, a, b) into z; e0 % 4 == 0.
inline void normals_span(Key key, uint32_t stream, uint32_t a, uint32_t b, int64_t e0, int64_t n,
                         double* z) {
  const int64_t nblk = (n + 3) / 4;
  normals_chunk(key, stream, a, b, static_cast<uint32_t>(e0 / 4), nblk, z);
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

// ---- argument checks shared by both ops -------------------------------------
void check_ids(const at::Tensor& ids, int64_t B, const char* op) {
  TORCH_CHECK(ids.scalar_type() == at::kLong, op, ": ids must be int64, got ", ids.scalar_type(),
              "; pass torch.int64 sample indices");
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == B, op, ": ids must have shape [", B,
              "] (one index per input), got ", ids.sizes());
}

void check_words(int64_t stream, int64_t k0, int64_t models, const char* op) {
  TORCH_CHECK(stream >= 0 && stream <= 0xffffffffLL, op, ": stream must lie in [0, 2^32), got ",
              stream);
  TORCH_CHECK(models >= 0, op, ": models must be >= 0, got ", models);
  TORCH_CHECK(k0 >= 0 && k0 + std::max<int64_t>(models, 1) - 1 <= 0xffffffffLL, op,
              ": model indices k0 .. k0 + models - 1 must lie in [0, 2^32), got k0 = ", k0,
              " and models = ", models);
}

void check_id_values(const at::Tensor& ids, const char* op) {
  const int64_t* p = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < ids.numel(); ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] <= 0xffffffffLL, op, ": ids must lie in [0, 2^32), got ", p[i],
                " at position ", i);
  }
}

at::Tensor noise_cpu(const at::Tensor& x, const at::Tensor& sigma, const at::Tensor& ids,
                     int64_t seed, int64_t stream, int64_t k0, int64_t models) {
  TORCH_CHECK(x.device().is_cpu() && sigma.device().is_cpu() && ids.device().is_cpu(),
              "noise: x, sigma and ids must all be on the CPU for the CPU kernel, got ", x.device(),
              ", ", sigma.device(), ", ", ids.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "noise: x must be a floating tensor, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "noise: x must have a batch dimension [B, ...], got a scalar");
  TORCH_CHECK(at::isFloatingType(sigma.scalar_type()), "noise: sigma must be floating, got ",
              sigma.scalar_type());
  const int64_t B = x.size(0);
  TORCH_CHECK(sigma.dim() == 1 && sigma.size(0) == B, "noise: sigma must have shape [", B,
              "] (one noise level per input), got ", sigma.sizes());
  check_ids(ids, B, "noise");
  check_words(stream, k0, models, "noise");
  std::vector<int64_t> shape{models};
  shape.insert(shape.end(), x.sizes().begin(), x.sizes().end());
  at::Tensor out = at::empty(shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor ids_c = ids.contiguous();
  check_id_values(ids_c, "noise");
  const at::Tensor x_c = x.contiguous();
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
  TORCH_CHECK(grad.device().is_cpu() && ids.device().is_cpu(),
              "noise_sigma_grad: grad_out and ids must be on the CPU, got ", grad.device(), ", ",
              ids.device());
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()),
              "noise_sigma_grad: grad_out must be floating, got ", grad.scalar_type());
  TORCH_CHECK(grad.dim() >= 2, "noise_sigma_grad: grad_out must have shape [K, B, ...], got ",
              grad.sizes());
  const int64_t K = grad.size(0);
  const int64_t B = grad.size(1);
  check_ids(ids, B, "noise_sigma_grad");
  check_words(stream, k0, K, "noise_sigma_grad");
  const auto acc_type = at::toOpMathType(grad.scalar_type());
  at::Tensor out = at::zeros({B}, grad.options().dtype(acc_type));
  if (B == 0 || K == 0 || grad.numel() == 0) return out;
  const at::Tensor ids_c = ids.contiguous();
  check_id_values(ids_c, "noise_sigma_grad");
  const at::Tensor g = grad.contiguous();
  const int64_t D = g.numel() / (K * B);
  const Key key = philox::split_seed(static_cast<uint64_t>(seed));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "noise_sigma_grad_cpu",
                                  [&] {
    using acc = acc_t<scalar_t>;
    noise_sigma_grad_kernel<scalar_t>(g.data_ptr<scalar_t>(), ids_c.data_ptr<int64_t>(),
                                      out.data_ptr<acc>(), K, B, D, key,
                                      static_cast<uint32_t>(stream), static_cast<uint32_t>(k0));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(certssb, CPU, m) {
  m.impl("noise", &noise_cpu);
  m.impl("noise_sigma_grad", &noise_sigma_grad_cpu);
}

}  // namespace certssb
