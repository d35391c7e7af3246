// certssb.cpp: the `certssb` operator library: every op schema in one
// TORCH_LIBRARY block, plus the empty Python module `certssb._C`.
//
// Kernels live elsewhere and register themselves per backend at the bottom of
// their own files (cpu/<op>.cpp: TORCH_LIBRARY_IMPL(certssb, CPU, m);
// cuda/<op>_glue.cpp: TORCH_LIBRARY_IMPL(certssb, CUDA, m)). Fake kernels and
// autograd are registered from Python (certssb/_ops.py).
//
// `_C` is built against Python's limited API (no pybind11): importing it only
// loads this shared library, which runs the static registrations below, so one
// build serves every CPython version at or above the one it targets.
#include <Python.h>

#include <torch/library.h>

extern "C" {
// The module `certssb._C` itself is empty; ops are reached as
// torch.ops.certssb.<name> once the library is loaded.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",     // name
      nullptr,  // docstring
      -1,       // per-interpreter state size: none
      nullptr,  // methods: none
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(certssb, m) {
  // JSON description of this build: version, torch version it was compiled
  // against, CUDA, OpenMP, debug, compiler. Kernel: cpu/build_info.cpp.
  m.def("build_info() -> str");

  // ---- noise (cpu/noise.cpp, cuda/noise_kernel.cu) --------------------------
  // out[k, b, ...] = x[b] + sigma[b] * eps(seed, stream, k0 + k, ids[b], ...)
  // for k in [0, models). x: [B, ...] float; sigma: [B] float; ids: [B] int64
  // in [0, 2^32); seed: the 64-bit seed as its two's-complement int64;
  // stream, k0 + k in [0, 2^32). Returns [models, B, ...] in x's dtype.
  m.def("noise(Tensor x, Tensor sigma, Tensor ids, int seed, int stream, int k0, int models) -> Tensor");
  // Backward of `noise` with respect to sigma: grad_sigma[b] =
  // sum_k sum_e grad_out[k, b, e] * eps(seed, stream, k0 + k, ids[b], e),
  // regenerating eps. grad_out: [K, B, ...]; returns [B] float32 (float64 for
  // float64 grad_out).
  m.def("noise_sigma_grad(Tensor grad_out, Tensor ids, int seed, int stream, int k0) -> Tensor");

  // ---- vote (cpu/vote.cpp, cuda/vote_kernel.cu) ----------------------------
  // Accumulates a chunk of logits [Mc, B, C] into soft_units [B, C] int64
  // (sum over models of round(softmax * 2^40): fixed point, so the sum is
  // exact and independent of how models are chunked or sharded) and
  // hard_count [B, C] int64 (argmax votes, ties to the lowest class index),
  // in place.
  m.def("vote_accumulate(Tensor logits, Tensor(a!) soft_units, Tensor(b!) hard_count) -> ()");
  // Top-2 classes of every row, ranked by hard_count (by_count) or soft_units,
  // ties to the lowest class index. Returns (classes [B, 2] int64,
  // soft_units at those classes [B, 2] int64, hard_count at them [B, 2] int64).
  m.def("vote_top2(Tensor soft_units, Tensor hard_count, bool by_count) -> (Tensor, Tensor, Tensor)");

  // ---- radius (cpu/radius.cpp, cuda/radius_kernel.cu) ----------------------
  // Certificate arithmetic. bound "hoeffding": pA_lower = clamp(top_score -
  // sqrt(ln(1/alpha) / (2 models)), 0, 1); "clopper-pearson": the alpha /
  // num_classes quantile of Beta(k, models - k + 1) for k = top_count (0 when
  // k = 0). pB_upper = 1 - pA_lower; radius = sigma / 2 * (PhiInv(pA) -
  // PhiInv(pB)) with pA clamped to [1/2, 1 - 1e-12]; abstain = pA_lower <= 1/2
  // (radius 0). top_score, top_count, sigma: [B]. Returns (pa_lower, pb_upper,
  // radius) float64 [B] and abstain bool [B].
  m.def("radius_certify(Tensor top_score, Tensor top_count, Tensor sigma, int models, float alpha, int num_classes, str bound) -> (Tensor, Tensor, Tensor, Tensor)");
  // Differentiable radius proxy r = sigma / 2 * (PhiInv(clamp(pA)) -
  // PhiInv(clamp(pB))), pA, pB the top-2 of mean_probs [B, C] (ties to the
  // lowest index), clamp to [lo, hi]; sigma [B]. Returns [B].
  m.def("radius_proxy(Tensor mean_probs, Tensor sigma, float lo, float hi) -> Tensor");
  // Its gradient: (d r / d mean_probs [B, C], d r / d sigma [B]) times grad [B].
  m.def("radius_proxy_backward(Tensor grad, Tensor mean_probs, Tensor sigma, float lo, float hi) -> (Tensor, Tensor)");
}
