"""Tests of the build: the compiled `certssb._C`, its build_info op, the CUDA
sources' plain-nvcc compile check, csrc/philox.h against the Random123
known-answer vectors, setup.py's switches and the conftest markers."""
from __future__ import annotations

import importlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import certssb
import certssb._ops as ops

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
CUDA_SOURCES = sorted((CSRC / "cuda").glob("*.cu"))

MASK32 = 0xFFFFFFFF

# Random123 known-answer tests for Philox4x32-10: (counter, key, expected output).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK32,) * 4, (MASK32, MASK32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def pyproject_version() -> str:
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    match = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
    assert match, "pyproject.toml has no version"
    return match.group(1)


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for name in ("FORCE_CUDA", "FORCE_ONLY_CPU", "DEBUG", "CERTSSB_SLOW"):
        env.pop(name, None)
    return env


# ---------------------------------------------------------------- the extension


def test_c_extension_is_the_compiled_limited_api_module() -> None:
    c = importlib.import_module("certssb._C")
    path = Path(c.__file__)
    assert path.parent == Path(certssb.__file__).parent
    assert path.suffix in {".so", ".pyd"}
    major_minor = tuple(int(p) for p in torch.__version__.split(".")[:2])
    if sys.platform.startswith("linux") and major_minor >= (2, 6):
        assert path.name.endswith(".abi3.so"), f"{path.name} is not a limited-API build"


def test_build_info_keys_and_values() -> None:
    info = ops.build_info()
    assert set(info) == {"version", "torch", "cuda", "cuda_version", "openmp", "debug", "cxx"}
    assert info["version"] == pyproject_version(), "stale build: rerun pip install -e ."
    built = info["torch"].split(".")[:2]
    running = torch.__version__.split("+")[0].split(".")[:2]
    assert built == running, f"built against torch {info['torch']}, running {torch.__version__}"
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["openmp"], bool)
    assert isinstance(info["debug"], bool)
    assert isinstance(info["cxx"], str) and info["cxx"] and info["cxx"] != "unknown"
    if info["cuda"]:
        assert re.fullmatch(r"\d+\.\d+", info["cuda_version"])
    else:
        assert info["cuda_version"] is None
    parallel = torch.__config__.parallel_info()
    if sys.platform.startswith("linux") and "ATen parallel backend: OpenMP" in parallel:
        assert info["openmp"] is True


def test_build_info_returns_a_fresh_dict_from_json() -> None:
    raw = torch.ops.certssb.build_info()
    assert isinstance(raw, str)
    assert json.loads(raw) == ops.build_info()
    first = ops.build_info()
    first["version"] = "mutated"
    assert ops.build_info()["version"] != "mutated"


def test_has_cuda_kernels_reflects_the_build_not_the_device() -> None:
    assert ops.has_cuda_kernels() is ops.build_info()["cuda"]
    if torch.version.cuda is None:  # a CPU-only torch cannot build CUDA kernels
        assert ops.has_cuda_kernels() is False


def test_op_is_registered_with_its_schema() -> None:
    assert hasattr(torch.ops.certssb, "build_info")
    assert str(torch.ops.certssb.build_info.default._schema) == "certssb::build_info() -> str"


def test_import_error_is_actionable(monkeypatch: pytest.MonkeyPatch) -> None:
    # Make `from . import _C` fail as a missing or mismatched build would.
    monkeypatch.delitem(sys.modules, "certssb._ops")
    monkeypatch.setitem(sys.modules, "certssb._C", None)
    monkeypatch.delattr(certssb, "_C", raising=False)
    monkeypatch.delattr(certssb, "_ops", raising=False)
    with pytest.raises(ImportError, match=r"pip install --no-build-isolation -e \.") as err:
        importlib.import_module("certssb._ops")
    assert "Original error" in str(err.value)
    assert torch.__version__ in str(err.value)


def test_import_does_not_touch_cuda() -> None:
    code = "import certssb._ops, torch; print(torch.cuda.is_initialized())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- CUDA sources


def test_cuda_sources_include_no_torch_headers() -> None:
    # Kernel files take raw pointers so that plain `nvcc -c` compiles them on CPU CI.
    assert CUDA_SOURCES, "csrc/cuda/*.cu is empty"
    forbidden = re.compile(r'#\s*include\s*[<"](torch/|ATen/|c10/|pybind11|Python\.h)')
    for src in CUDA_SOURCES:
        bad = forbidden.findall(src.read_text(encoding="utf-8"))
        assert not bad, f"{src.name} includes torch headers {bad}; move the glue to a .cpp"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
@pytest.mark.parametrize("src", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles_with_plain_nvcc(src: Path, tmp_path: Path) -> None:
    out = subprocess.run(["nvcc", "-c", "-I", str(CSRC), str(src), "-o", str(tmp_path / "k.o")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "k.o").stat().st_size > 0


def _cuda_include_dir() -> Path | None:
    nvcc = shutil.which("nvcc")
    candidates = [Path(os.environ["CUDA_HOME"]) / "include"] if os.environ.get("CUDA_HOME") else []
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    return next((c for c in candidates if (c / "cuda_runtime_api.h").is_file()), None)


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
def test_build_info_cuda_branch_compiles() -> None:
    # CPU builds never compile the CERTSSB_WITH_CUDA branch; check its syntax here.
    inc = _cuda_include_dir()
    if inc is None:
        pytest.skip("CUDA headers (cuda_runtime_api.h) not found")
    from torch.utils.cpp_extension import include_paths

    cmd = ["g++", "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
           "-DCERTSSB_VERSION=0.1.0", "-DCERTSSB_WITH_CUDA", "-DCERTSSB_DEBUG", f"-I{inc}"]
    cmd += [f"-I{p}" for p in include_paths()] + [str(CSRC / "cpu" / "build_info.cpp")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]


# ---------------------------------------------------------------- philox.h

PHILOX_DRIVER = r"""
#include <cinttypes>
#include <cstdio>
#include "philox.h"
using namespace certssb::philox;
// Reads lines "c0 c1 c2 c3 k0 k1" (hex); prints x0..x3 (hex), then z0, z1 of box_muller2
// and of box_muller2_poly (%.17g).
int main() {
  unsigned c[4], k[2];
  while (std::scanf("%x %x %x %x %x %x", &c[0], &c[1], &c[2], &c[3], &k[0], &k[1]) == 6) {
    const U32x4 x = philox4x32_10(U32x4{{c[0], c[1], c[2], c[3]}}, Key{k[0], k[1]});
    const Normal2 z = box_muller2(x);
    const Normal2 p = box_muller2_poly(x);
    std::printf("%08" PRIx32 " %08" PRIx32 " %08" PRIx32 " %08" PRIx32 " %.17g %.17g %.17g %.17g\n",
                x.v[0], x.v[1], x.v[2], x.v[3], z.z[0], z.z[1], p.z[0], p.z[1]);
  }
  return 0;
}
"""


def philox_py(counter: tuple[int, ...], key: tuple[int, int]) -> tuple[int, ...]:
    """Independent Philox4x32-10 on Python ints, from the published definition."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & MASK32, (k1 + 0xBB67AE85) & MASK32
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & MASK32, (p0 >> 32) ^ c3 ^ k1, p0 & MASK32
    return c0, c1, c2, c3


def box_muller_py(x: tuple[int, ...]) -> list[float]:
    """The project's Box-Muller in float64: 53-bit u1 from (x0, x1), u2 from (x2, x3) -> (cos, sin)."""
    u1 = (((x[0] << 21) | (x[1] >> 11)) + 1) * 2.0 ** -53
    u2 = ((x[2] << 21) | (x[3] >> 11)) * 2.0 ** -53
    r = math.sqrt(-2.0 * math.log(u1))
    return [r * math.cos(2.0 * math.pi * u2), r * math.sin(2.0 * math.pi * u2)]


@pytest.fixture(scope="module")
def philox_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    tmp = tmp_path_factory.mktemp("philox")
    (tmp / "driver.cpp").write_text(PHILOX_DRIVER, encoding="utf-8")
    exe = tmp / "driver"
    out = subprocess.run(["g++", "-O2", "-Wall", "-Wextra", "-Werror", "-pedantic", f"-I{CSRC}",
                          str(tmp / "driver.cpp"), "-o", str(exe), "-lm"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return exe


def run_philox(exe: Path, cases: list[tuple[tuple[int, ...], tuple[int, int]]]):
    stdin = "".join(" ".join(f"{w:x}" for w in (*c, *k)) + "\n" for c, k in cases)
    out = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()]
    assert len(rows) == len(cases)
    return [(tuple(int(w, 16) for w in r[:4]), [float(v) for v in r[4:]]) for r in rows]


def test_philox_known_answer_vectors(philox_binary: Path) -> None:
    results = run_philox(philox_binary, [(c, k) for c, k, _ in PHILOX_KAT])
    for (counter, key, expected), (got, _) in zip(PHILOX_KAT, results):
        assert got == expected, f"counter {counter} key {key}: {[hex(w) for w in got]}"
        assert philox_py(counter, key) == expected  # the test's own reference agrees


def test_philox_and_box_muller_match_python_on_random_inputs(philox_binary: Path) -> None:
    rng = random.Random(1234)
    cases = [(tuple(rng.getrandbits(32) for _ in range(4)), (rng.getrandbits(32), rng.getrandbits(32)))
             for _ in range(200)]
    # Box-Muller edge words: u1 = 2^-53 (largest radius) and u1 = 1 (radius 0); u2 = 0.
    cases += [((0, 0, 0, 0), (0, 0))]
    results = run_philox(philox_binary, cases)
    for (counter, key), (got, z) in zip(cases, results):
        assert got == philox_py(counter, key)
        for zc, zp in zip(z, box_muller_py(got) * 2):  # libm and polynomial versions
            assert math.isclose(zc, zp, rel_tol=1e-14, abs_tol=1e-14)
    # The conversion itself at its extremes.
    assert box_muller_py((0, 0, 0, 0)) == pytest.approx([math.sqrt(106 * math.log(2)), 0.0])  # r max
    assert box_muller_py((MASK32, MASK32, 0, 0)) == [0.0, 0.0]  # u1 = 1: radius 0


def test_philox_header_matches_the_noise_reference(philox_binary: Path) -> None:
    noise = pytest.importorskip("certssb.smoothing.noise")
    if not hasattr(noise, "normal"):
        pytest.skip("certssb.smoothing.noise.normal not present")
    seed, stream, a, b, numel = 0x0123456789ABCDEF, 1, 7, 42, 10
    key = (seed & MASK32, seed >> 32)
    cases = [((stream, a, b, blk), key) for blk in range((numel + 1) // 2)]
    z = [v for _, zs in run_philox(philox_binary, cases) for v in zs[:2]][:numel]
    ref = noise.normal(seed, stream, a, b, numel, dtype=torch.float64)
    torch.testing.assert_close(ref, torch.tensor(z, dtype=torch.float64), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- setup.py


def run_setups(*switches: dict[str, str]) -> list[subprocess.CompletedProcess]:
    """Run `python setup.py --name` once per switch set, concurrently (each imports torch)."""
    procs = []
    for extra in switches:
        env = subprocess_env()
        env.update(extra)
        procs.append(subprocess.Popen([sys.executable, "setup.py", "--name"], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return results


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks a CPU-only torch")
def test_setup_logs_decisions_and_refuses_force_cuda_without_cuda() -> None:
    ok, forced, both = run_setups({}, {"FORCE_CUDA": "1"}, {"FORCE_CUDA": "1", "FORCE_ONLY_CPU": "1"})
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().splitlines()[-1] == "certssb"
    for line in ("CUDA: off", "DEBUG=0", "OpenMP:", "limited API:", "sources ("):
        assert line in ok.stderr, f"build log lacks {line!r}"
    assert forced.returncode != 0
    assert "FORCE_CUDA=1 but CUDA cannot be built" in forced.stderr
    assert both.returncode != 0 and "contradict" in both.stderr


# ---------------------------------------------------------------- conftest markers

MARKER_TESTS = """
import pytest

@pytest.mark.slow
def test_slow():
    pass

@pytest.mark.needs_cuda
def test_cuda():
    pass

def test_plain(data_root):
    assert data_root.is_dir()
"""

# No needs_cuda test here, so the inner run never imports torch: fast.
SLOW_ONLY_TESTS = """
import pytest

@pytest.mark.slow
def test_slow():
    pass
"""


def run_inner_pytest(tmp_path: Path, test_file: str, *args: str, **env_switches: str) -> str:
    env = subprocess_env()
    env["CERTSSB_DATA"] = str(tmp_path)
    env.update(env_switches)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          "-p", "no:hypothesispytest", *args, test_file], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_conftest_markers_skip_as_documented(tmp_path: Path) -> None:
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_markers.py").write_text(MARKER_TESTS, encoding="utf-8")
    (tmp_path / "test_slow_only.py").write_text(SLOW_ONLY_TESTS, encoding="utf-8")
    default = run_inner_pytest(tmp_path, "test_markers.py")
    assert "slow: run with --runslow" in default
    cuda_expected = torch.cuda.is_available() and ops.has_cuda_kernels()
    assert ("needs_cuda:" in default) is (not cuda_expected)
    assert re.search(r"\b1 passed", default) or cuda_expected  # data_root found CERTSSB_DATA
    assert "1 skipped" in run_inner_pytest(tmp_path, "test_slow_only.py")
    assert "1 passed" in run_inner_pytest(tmp_path, "test_slow_only.py", "--runslow")
    assert "1 passed" in run_inner_pytest(tmp_path, "test_slow_only.py", CERTSSB_SLOW="1")


def test_data_root_skips_when_the_folder_is_missing(tmp_path: Path) -> None:
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_data.py").write_text("def test_d(data_root):\n    pass\n", encoding="utf-8")
    out = run_inner_pytest(tmp_path, "test_data.py", CERTSSB_DATA=str(tmp_path / "absent"))
    assert "1 skipped" in out and "CERTSSB_DATA" in out
