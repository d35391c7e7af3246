// radius_kernel.cu: the CUDA kernels of the radius ops and their host
// launchers (declared in launch.h): certificate arithmetic (Hoeffding
// and Clopper-Pearson pA_lower, pB_upper, radius, abstain) and the radius
// proxy with its gradient.
//
// Raw pointers only: this file includes cuda_runtime.h, the fp16/bf16 headers
// and stats.h, so CPU-only CI compile-checks it with
// `nvcc -c -I csrc csrc/cuda/radius_kernel.cu`. The math is the one of the CPU
// kernels (cpu/radius.cpp), with PhiInv from CUDA's normcdfinv.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/launch.h"
#include "stats.h"

namespace certssb {
namespace cuda {
namespace {

constexpr int kThreads = 256;            // threads per block
constexpr int64_t kMaxBlocks = 4096;     // capped grid; kernels loop over the rest
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr double kScoreTol = 1e-6;       // bounds._SCORE_TOL
constexpr long long kNoIndex = 0x7fffffffffffffffLL;  // "no entry yet": loses every tie

int grid_for(int64_t work_items, int64_t per_block) {
  const int64_t blocks = (work_items + per_block - 1) / per_block;
  return static_cast<int>(blocks < kMaxBlocks ? (blocks > 0 ? blocks : 1) : kMaxBlocks);
}

// ------------------------------------------------------------- certificates
struct Cert {
  double pb;
  double radius;
  bool abstain;
};

// pb_upper = 1 - pA_lower; abstain = pA_lower <= 1/2 (radius 0 there);
// radius = sigma * PhiInv(pa_c) = sigma / 2 (PhiInv(pa_c) - PhiInv(1 - pa_c)),
// pa_c = pA_lower clamped to [1/2, PA_MAX].
__device__ __forceinline__ Cert finish(double pa, double sigma) {
  const bool abstain = pa <= 0.5;
  const double pa_c = fmin(fmax(pa, 0.5), stats::kPaMax);
  return Cert{1.0 - pa, abstain ? 0.0 : sigma * stats::phi_inv(pa_c), abstain};
}

// (0, kSigmaMax], as the CPU kernel: false on NaN; keeps the radius finite.
__device__ __forceinline__ bool valid_sigma(double s) {
  return s > 0.0 && s <= stats::kSigmaMax;
}

// Row i of a certificate kernel: its pA_lower (meaningless when !valid), its
// sigma, and whether its inputs are valid.
struct CertRow {
  double pa;
  double sigma;
  bool valid;
};

// Hoeffding: pa = clamp(top_score - width, 0, 1).
struct HoeffdingRow {
  Strided<double> score, sigma;
  double width;
  __device__ CertRow operator()(int64_t i) const {
    const double p = score.data[i * score.stride];
    const double s = sigma.data[i * sigma.stride];
    const bool valid = p >= -kScoreTol && p <= 1.0 + kScoreTol && valid_sigma(s);
    return CertRow{fmin(fmax(p - width, 0.0), 1.0), s, valid};
  }
};

// Clopper-Pearson: pa = the level quantile of Beta(k, models - k + 1).
struct ClopperPearsonRow {
  Strided<int64_t> count;
  Strided<double> sigma;
  int64_t models;
  double level;
  __device__ CertRow operator()(int64_t i) const {
    const int64_t k = count.data[i * count.stride];
    const double s = sigma.data[i * sigma.stride];
    const bool valid = k >= 0 && k <= models && valid_sigma(s);
    return CertRow{valid ? stats::clopper_pearson_lower(k, models, level) : 0.0, s, valid};
  }
};

// Grid-stride loop over the rows: invalid rows get NaN and abstain = true (the
// wrapper rejects these; never a silent certificate).
template <typename Row>
__global__ void certify_kernel(Row row, int64_t n, CertOut out) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    const CertRow r = row(i);
    const Cert c = finish(r.pa, r.sigma);
    out.pa_lower[i] = r.valid ? r.pa : NAN;
    out.pb_upper[i] = r.valid ? c.pb : NAN;
    out.radius[i] = r.valid ? c.radius : NAN;
    out.abstain[i] = r.valid ? c.abstain : true;
  }
}

// ------------------------------------------------------------- proxy
template <typename acc_t>
__device__ __forceinline__ acc_t load_acc(const float* p) {
  return static_cast<acc_t>(*p);
}
template <typename acc_t>
__device__ __forceinline__ acc_t load_acc(const double* p) {
  return static_cast<acc_t>(*p);
}
template <typename acc_t>
__device__ __forceinline__ acc_t load_acc(const __half* p) {
  return static_cast<acc_t>(__half2float(*p));
}
template <typename acc_t>
__device__ __forceinline__ acc_t load_acc(const __nv_bfloat16* p) {
  return static_cast<acc_t>(__bfloat162float(*p));
}

template <typename acc_t>
__device__ __forceinline__ void store_as(float* p, acc_t v) {
  *p = static_cast<float>(v);
}
template <typename acc_t>
__device__ __forceinline__ void store_as(double* p, acc_t v) {
  *p = static_cast<double>(v);
}
template <typename acc_t>
__device__ __forceinline__ void store_as(__half* p, acc_t v) {
  *p = __float2half_rn(static_cast<float>(v));
}
template <typename acc_t>
__device__ __forceinline__ void store_as(__nv_bfloat16* p, acc_t v) {
  *p = __float2bfloat16_rn(static_cast<float>(v));
}

__device__ __forceinline__ float acc_exp(float v) { return expf(v); }
__device__ __forceinline__ double acc_exp(double v) { return exp(v); }

// The two best entries of a row: value descending, then index ascending
// (ties to the lowest class index, as bounds.top2). nan flags a NaN entry.
template <typename acc_t>
struct Top2 {
  acc_t v1;
  long long i1;
  acc_t v2;
  long long i2;
  int nan;
};

template <typename acc_t>
__device__ __forceinline__ bool better(acc_t va, long long ia, acc_t vb,
                                       long long ib) {
  return va > vb || (va == vb && ia < ib);
}

// Merge of two sorted pairs under the total order of `better`.
template <typename acc_t>
__device__ __forceinline__ Top2<acc_t> merge(const Top2<acc_t>& a,
                                             const Top2<acc_t>& b) {
  Top2<acc_t> out;
  out.nan = a.nan | b.nan;
  if (better(b.v1, b.i1, a.v1, a.i1)) {
    out.v1 = b.v1;
    out.i1 = b.i1;
    const bool first = better(a.v1, a.i1, b.v2, b.i2);
    out.v2 = first ? a.v1 : b.v2;
    out.i2 = first ? a.i1 : b.i2;
  } else {
    out.v1 = a.v1;
    out.i1 = a.i1;
    const bool first = better(b.v1, b.i1, a.v2, a.i2);
    out.v2 = first ? b.v1 : a.v2;
    out.i2 = first ? b.i1 : a.i2;
  }
  return out;
}

// Top-2 of row `row` by one warp: each lane scans a strided slice, then a
// butterfly of shuffles merges the lanes; every lane ends with the result.
template <typename scalar_t, typename acc_t>
__device__ Top2<acc_t> warp_row_top2(const scalar_t* row, int64_t cols,
                                     int64_t col_stride, int lane) {
  Top2<acc_t> t{-INFINITY, kNoIndex, -INFINITY, kNoIndex, 0};
  for (int64_t c = lane; c < cols; c += kWarp) {
    const acc_t v = load_acc<acc_t>(row + c * col_stride);
    if (isnan(v)) {
      t.nan = 1;
    } else if (better(v, static_cast<long long>(c), t.v1, t.i1)) {
      t.v2 = t.v1;
      t.i2 = t.i1;
      t.v1 = v;
      t.i1 = c;
    } else if (better(v, static_cast<long long>(c), t.v2, t.i2)) {
      t.v2 = v;
      t.i2 = c;
    }
  }
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    Top2<acc_t> o;
    o.v1 = __shfl_xor_sync(kFullMask, t.v1, offset);
    o.i1 = __shfl_xor_sync(kFullMask, t.i1, offset);
    o.v2 = __shfl_xor_sync(kFullMask, t.v2, offset);
    o.i2 = __shfl_xor_sync(kFullMask, t.i2, offset);
    o.nan = __shfl_xor_sync(kFullMask, t.nan, offset);
    t = merge(t, o);
  }
  return t;
}

template <typename acc_t>
__device__ __forceinline__ acc_t clamp_to(acc_t v, acc_t lo, acc_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// One warp per row (warp-uniform grid-stride loop over rows, so the full-mask
// shuffles are safe).
template <typename scalar_t, typename acc_t>
__global__ void proxy_forward_kernel(const scalar_t* __restrict__ probs,
                                     int64_t rows, int64_t cols,
                                     int64_t row_stride, int64_t col_stride,
                                     const acc_t* __restrict__ sigma,
                                     int64_t sigma_stride, acc_t lo, acc_t hi,
                                     acc_t* __restrict__ out) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warp =
      (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  for (int64_t r = warp; r < rows; r += warps) {
    const Top2<acc_t> t =
        warp_row_top2<scalar_t, acc_t>(probs + r * row_stride, cols, col_stride, lane);
    if (lane == 0) {
      if (t.nan) {
        out[r] = static_cast<acc_t>(NAN);
      } else {
        const acc_t za = stats::phi_inv(clamp_to(t.v1, lo, hi));
        const acc_t zb = stats::phi_inv(clamp_to(t.v2, lo, hi));
        out[r] = sigma[r * sigma_stride] / acc_t(2) * (za - zb);
      }
    }
  }
}

// Gradient: the row's lanes write its zeros and the two nonzero entries.
template <typename scalar_t, typename acc_t>
__global__ void proxy_backward_kernel(const acc_t* __restrict__ grad,
                                      int64_t grad_stride,
                                      const scalar_t* __restrict__ probs,
                                      int64_t rows, int64_t cols,
                                      int64_t row_stride, int64_t col_stride,
                                      const acc_t* __restrict__ sigma,
                                      int64_t sigma_stride, acc_t lo, acc_t hi,
                                      scalar_t* __restrict__ grad_probs,
                                      acc_t* __restrict__ grad_sigma) {
  const acc_t sqrt_2pi = static_cast<acc_t>(stats::kSqrt2Pi);
  const int lane = threadIdx.x % kWarp;
  const int64_t warp =
      (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  for (int64_t r = warp; r < rows; r += warps) {
    const Top2<acc_t> t =
        warp_row_top2<scalar_t, acc_t>(probs + r * row_stride, cols, col_stride, lane);
    const acc_t g = grad[r * grad_stride];
    scalar_t* out_row = grad_probs + r * cols;
    if (t.nan) {
      for (int64_t c = lane; c < cols; c += kWarp) store_as(out_row + c, static_cast<acc_t>(NAN));
      if (lane == 0) grad_sigma[r] = static_cast<acc_t>(NAN);
      continue;
    }
    const acc_t za = stats::phi_inv(clamp_to(t.v1, lo, hi));
    const acc_t zb = stats::phi_inv(clamp_to(t.v2, lo, hi));
    const acc_t g_diff = g * (sigma[r * sigma_stride] / acc_t(2));
    // clamp passes the gradient inside [lo, hi], edges included
    const acc_t ga = (t.v1 >= lo && t.v1 <= hi)
                         ? g_diff * sqrt_2pi * acc_exp(za * za / acc_t(2))
                         : acc_t(0);
    const acc_t gb = (t.v2 >= lo && t.v2 <= hi)
                         ? -g_diff * sqrt_2pi * acc_exp(zb * zb / acc_t(2))
                         : acc_t(0);
    for (int64_t c = lane; c < cols; c += kWarp) {
      const acc_t v = c == t.i1 ? ga : (c == t.i2 ? gb : acc_t(0));
      store_as(out_row + c, v);
    }
    if (lane == 0) grad_sigma[r] = g * (za - zb) / acc_t(2);
  }
}

}  // namespace

cudaError_t launch_certify_hoeffding(Strided<double> top_score, Strided<double> sigma, int64_t n,
                                     double width, CertOut out, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  certify_kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(
      HoeffdingRow{top_score, sigma, width}, n, out);
  return cudaGetLastError();
}

cudaError_t launch_certify_clopper_pearson(Strided<int64_t> top_count, Strided<double> sigma,
                                           int64_t n, int64_t models, double level, CertOut out,
                                           cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  // Each thread runs an iterative solve: smaller blocks spread it over more SMs.
  constexpr int kCpThreads = 128;
  certify_kernel<<<grid_for(n, kCpThreads), kCpThreads, 0, stream>>>(
      ClopperPearsonRow{top_count, sigma, models, level}, n, out);
  return cudaGetLastError();
}

cudaError_t launch_proxy_forward(const ProxyIn& in, void* out, cudaStream_t stream) {
  if (in.rows <= 0) return cudaSuccess;
  const int grid = grid_for(in.rows, kThreads / kWarp);  // one warp per row
  const cudaError_t bad_dtype = dispatch_dtype(in.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    const auto* probs = static_cast<const scalar_t*>(in.mean_probs);
    if (in.acc_double) {
      proxy_forward_kernel<scalar_t, double><<<grid, kThreads, 0, stream>>>(
          probs, in.rows, in.cols, in.row_stride, in.col_stride,
          static_cast<const double*>(in.sigma), in.sigma_stride, in.lo, in.hi,
          static_cast<double*>(out));
    } else {
      proxy_forward_kernel<scalar_t, float><<<grid, kThreads, 0, stream>>>(
          probs, in.rows, in.cols, in.row_stride, in.col_stride,
          static_cast<const float*>(in.sigma), in.sigma_stride, static_cast<float>(in.lo),
          static_cast<float>(in.hi), static_cast<float*>(out));
    }
    return cudaSuccess;
  });
  return bad_dtype != cudaSuccess ? bad_dtype : cudaGetLastError();
}

cudaError_t launch_proxy_backward(const ProxyIn& in, const void* grad, int64_t grad_stride,
                                  void* grad_mean_probs, void* grad_sigma, cudaStream_t stream) {
  if (in.rows <= 0) return cudaSuccess;
  const int grid = grid_for(in.rows, kThreads / kWarp);
  const cudaError_t bad_dtype = dispatch_dtype(in.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    const auto* probs = static_cast<const scalar_t*>(in.mean_probs);
    auto* gp = static_cast<scalar_t*>(grad_mean_probs);
    if (in.acc_double) {
      proxy_backward_kernel<scalar_t, double><<<grid, kThreads, 0, stream>>>(
          static_cast<const double*>(grad), grad_stride, probs, in.rows, in.cols, in.row_stride,
          in.col_stride, static_cast<const double*>(in.sigma), in.sigma_stride, in.lo, in.hi, gp,
          static_cast<double*>(grad_sigma));
    } else {
      proxy_backward_kernel<scalar_t, float><<<grid, kThreads, 0, stream>>>(
          static_cast<const float*>(grad), grad_stride, probs, in.rows, in.cols, in.row_stride,
          in.col_stride, static_cast<const float*>(in.sigma), in.sigma_stride,
          static_cast<float>(in.lo), static_cast<float>(in.hi), gp,
          static_cast<float*>(grad_sigma));
    }
    return cudaSuccess;
  });
  return bad_dtype != cudaSuccess ? bad_dtype : cudaGetLastError();
}

}  // namespace cuda
}  // namespace certssb
