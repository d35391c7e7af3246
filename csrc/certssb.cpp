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
}
