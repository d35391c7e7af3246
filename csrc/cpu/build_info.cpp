// build_info.cpp: the kernel of certssb::build_info(), a JSON string that says
// how this extension was compiled (what, not what the machine can run).
//
// It takes no tensors, so it registers under CompositeExplicitAutograd: the
// dispatcher serves that kernel whatever backend is asked for (there is none
// to compute from the arguments).
#include <string>

#include <torch/library.h>
#include <torch/version.h>

#if defined(CERTSSB_WITH_CUDA)
#include <cuda_runtime_api.h>  // CUDART_VERSION of the toolkit compiled with
#endif

// CERTSSB_VERSION is passed unquoted by setup.py (-DCERTSSB_VERSION=0.1.0):
// a quoted define does not survive every build tool's shell quoting.
#define CERTSSB_STRINGIFY_(x) #x
#define CERTSSB_STRINGIFY(x) CERTSSB_STRINGIFY_(x)

#if !defined(CERTSSB_VERSION)
#error "CERTSSB_VERSION is not defined: build certssb with its setup.py (pip install --no-build-isolation -e .)"
#endif

namespace certssb {
namespace {

// Escapes the few characters a compiler id or version could carry into JSON.
std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (char ch : s) {
    switch (ch) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      default:
        // Other control characters have no place in these fields; drop them.
        if (static_cast<unsigned char>(ch) >= 0x20) out += ch;
    }
  }
  out += "\"";
  return out;
}

const char* json_bool(bool b) { return b ? "true" : "false"; }

std::string compiler_id() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  return std::string("msvc ") + CERTSSB_STRINGIFY(_MSC_FULL_VER);
#else
  return "unknown";
#endif
}

std::string build_info() {
#if defined(CERTSSB_WITH_CUDA)
  constexpr bool with_cuda = true;
  // CUDART_VERSION is major * 1000 + minor * 10, e.g. 12040 -> "12.4".
  const std::string cuda_version = json_string(
      std::to_string(CUDART_VERSION / 1000) + "." +
      std::to_string((CUDART_VERSION % 1000) / 10));
#else
  constexpr bool with_cuda = false;
  const std::string cuda_version = "null";
#endif
#if defined(_OPENMP)
  constexpr bool with_openmp = true;
#else
  constexpr bool with_openmp = false;
#endif
#if defined(CERTSSB_DEBUG)
  constexpr bool debug = true;
#else
  constexpr bool debug = false;
#endif
  std::string out = "{";
  out += "\"version\": " + json_string(CERTSSB_STRINGIFY(CERTSSB_VERSION));
  out += ", \"torch\": " + json_string(TORCH_VERSION);
  out += std::string(", \"cuda\": ") + json_bool(with_cuda);
  out += ", \"cuda_version\": " + cuda_version;
  out += std::string(", \"openmp\": ") + json_bool(with_openmp);
  out += std::string(", \"debug\": ") + json_bool(debug);
  out += ", \"cxx\": " + json_string(compiler_id());
  out += "}";
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(certssb, CompositeExplicitAutograd, m) {
  m.impl("build_info", &build_info);
}

}  // namespace certssb
