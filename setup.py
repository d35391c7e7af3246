"""Build of certssb's native extension `certssb._C` (metadata: pyproject.toml).

Install with `pip install --no-build-isolation -e .` (also `.[test]`): the
extension is compiled against the torch that is installed, which is the one it
must run with.

What is built:
- always a C++ extension from csrc/*.cpp and csrc/cpu/*.cpp;
- with CUDA, also csrc/cuda/*.cu (raw kernels) and csrc/cuda/*.cpp (torch
  glue), when torch itself was built with CUDA (`torch.version.cuda`) and a
  CUDA toolkit is found (CUDA_HOME). A CPU-only torch cannot build CUDA
  extensions at all.

Environment switches (each printed in the build log with the decision):
- FORCE_CUDA=1      build CUDA or fail with a message saying why it cannot;
- FORCE_ONLY_CPU=1  never build CUDA;
- DEBUG=1           -O0 -g (and -G for device code), defines CERTSSB_DEBUG;
- TORCH_CUDA_ARCH_LIST, MAX_JOBS: torch's own, passed through.
OpenMP flags are added only when torch's parallel backend is OpenMP. No
`-std=` flag: torch's headers choose the C++ standard themselves.
"""
from __future__ import annotations

import glob
import os
import re
import sys
from pathlib import Path

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise SystemExit(
        "certssb: building needs torch installed first (the extension is compiled "
        "against it). Install torch, then run `pip install --no-build-isolation -e .` "
        f"(original error: {exc})"
    ) from exc

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"  # relative paths: setuptools wants sources relative to setup.py


def log(msg: str) -> None:
    """Print one line of the build log (stderr is shown by pip -v and on failure)."""
    print(f"[certssb build] {msg}", file=sys.stderr, flush=True)


def env_flag(name: str) -> bool:
    """True when environment variable `name` is set to 1/true/yes/on."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def read_version() -> str:
    """The version from pyproject.toml's [project] table (the single source)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    match = project and re.search(r'^version\s*=\s*"([^"]+)"', project.group(1), re.M)
    if not match:
        raise SystemExit("certssb: no version = \"...\" in the [project] table of pyproject.toml")
    version = match.group(1)
    if not re.fullmatch(r"[0-9A-Za-z.+_-]+", version):
        # Passed unquoted as -DCERTSSB_VERSION=...; keep it one preprocessor token run.
        raise SystemExit(f"certssb: version {version!r} has characters a -D define cannot carry")
    return version


def torch_uses_openmp() -> bool:
    """Whether torch's ATen parallel backend is OpenMP (then our at::parallel_for is too)."""
    info = torch.__config__.parallel_info()
    match = re.search(r"ATen parallel backend:\s*(\S+)", info)
    return bool(match) and match.group(1).lower() == "openmp"


def decide_cuda() -> bool:
    """Whether to build the CUDA sources; logs every input and the decision."""
    force_cuda = env_flag("FORCE_CUDA")
    force_cpu = env_flag("FORCE_ONLY_CPU")
    cuda_home = cpp_extension.CUDA_HOME
    log(f"FORCE_CUDA={int(force_cuda)} FORCE_ONLY_CPU={int(force_cpu)}")
    log(f"torch {torch.__version__}: torch.version.cuda={torch.version.cuda} "
        f"torch.version.hip={getattr(torch.version, 'hip', None)}; CUDA_HOME={cuda_home}")
    if force_cuda and force_cpu:
        raise SystemExit("certssb: FORCE_CUDA=1 and FORCE_ONLY_CPU=1 contradict each other; "
                         "unset one of them and rebuild")
    if force_cpu:
        log("CUDA: off (FORCE_ONLY_CPU=1)")
        return False
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a build without CUDA, which cannot "
                       "compile CUDA extensions (install a CUDA build of torch)")
    elif cuda_home is None:  # torch only looks for a toolkit when it has CUDA itself
        reasons.append("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    if reasons:
        if force_cuda:
            raise SystemExit("certssb: FORCE_CUDA=1 but CUDA cannot be built: "
                             + "; ".join(reasons) + ". Fix that, or unset FORCE_CUDA "
                             "to build the CPU-only extension.")
        log("CUDA: off (" + "; ".join(reasons) + ")")
        return False
    log(f"CUDA: on (toolkit {cuda_home}, TORCH_CUDA_ARCH_LIST="
        f"{os.environ.get('TORCH_CUDA_ARCH_LIST', '<torch default>')})")
    return True


def limited_api() -> tuple[bool, str | None]:
    """(build against the limited API?, wheel tag such as 'cp310').

    Torch >= 2.6 headers work with Py_LIMITED_API when, as here, no pybind11 or
    torch/extension.h is used. Recent torch adds -DPy_LIMITED_API itself
    (cpp_extension.min_supported_cpython); then its value sets the wheel tag,
    and adding our own value would only redefine the macro.
    """
    major_minor = tuple(int(p) for p in re.findall(r"\d+", torch.__version__)[:2])
    if major_minor < (2, 6):
        return False, None
    torch_min = getattr(cpp_extension, "min_supported_cpython", None)
    hexcode = int(torch_min, 16) if torch_min else 0x030A0000
    tag = f"cp{hexcode >> 24}{(hexcode >> 16) & 0xFF}"
    return True, tag


def check_object_names(sources: list[str]) -> None:
    """Fail early when two sources would compile to the same object file."""
    seen: dict[str, str] = {}
    for src in sources:
        key = os.path.splitext(src)[0]
        if key in seen:
            raise SystemExit(f"certssb: {seen[key]} and {src} would both compile to "
                             f"{key}.o; rename one (e.g. <op>_kernel.cu beside <op>_glue.cpp)")
        seen[key] = src


def get_extensions() -> list:
    """The `certssb._C` extension, configured from the switches above."""
    version = read_version()
    debug = env_flag("DEBUG")
    with_cuda = decide_cuda()
    openmp = torch_uses_openmp() and sys.platform.startswith("linux")
    use_limited, tag = limited_api()

    log(f"version {version}; python {sys.version.split()[0]}; platform {sys.platform}")
    log(f"DEBUG={int(debug)}: " + ("-O0 -g, CERTSSB_DEBUG defined" if debug else "-O3"))
    log("OpenMP: " + ("on (-fopenmp; torch's parallel backend is OpenMP)" if openmp else
                      "off (torch's parallel backend is not OpenMP, or not Linux)"))
    log("limited API: " + (f"on, one _C for CPython >= {tag[2]}.{tag[3:]} (abi3 wheel tag {tag})"
                           if use_limited else "off (torch < 2.6)"))

    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp"))) + \
        sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    if with_cuda:
        sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
        sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cpp")))
    check_object_names(sources)
    log(f"sources ({len(sources)}): " + " ".join(sources))

    define_macros = [("CERTSSB_VERSION", version)]
    if with_cuda:
        define_macros.append(("CERTSSB_WITH_CUDA", None))
    if debug:
        define_macros.append(("CERTSSB_DEBUG", None))

    # -fno-math-errno: sqrt and friends need not set errno (nothing reads it), so loops
    # over them vectorize (the noise kernel's Box-Muller).
    cxx = (["-O0", "-g"] if debug else ["-O3"]) + ["-fno-math-errno"]
    nvcc = ["-O0", "-g", "-G"] if debug else ["-O3"]
    link = ["-O0", "-g"] if debug else []
    if openmp:
        cxx.append("-fopenmp")
        nvcc.append("-Xcompiler=-fopenmp")
        link.append("-fopenmp")
    if use_limited and not getattr(cpp_extension, "min_supported_cpython", None):
        cxx.append("-DPy_LIMITED_API=0x030A0000")  # older torch does not add it
    log(f"defines: {define_macros}")
    log(f"cxx flags: {cxx}" + (f"; nvcc flags: {nvcc}" if with_cuda else "") + f"; link: {link}")

    kind = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    compile_args: dict[str, list[str]] = {"cxx": cxx}
    if with_cuda:
        compile_args["nvcc"] = nvcc
    ext = kind(
        "certssb._C",
        sources,
        include_dirs=[str(ROOT / CSRC)],
        define_macros=define_macros,
        extra_compile_args=compile_args,
        extra_link_args=link,
        py_limited_api=use_limited,
    )
    log(f"extension: certssb._C as {kind.__name__}")
    return [ext]


_, _WHEEL_TAG = limited_api()

setup(
    ext_modules=get_extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    options={"bdist_wheel": {"py_limited_api": _WHEEL_TAG}} if _WHEEL_TAG else {},
)
