"""Shared pytest setup: the `needs_cuda` and `slow` markers and the `data_root` fixture.

Nothing here touches CUDA at import: whether CUDA tests can run is decided at
collection time, and only when a collected test carries `needs_cuda`.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (same as CERTSSB_SLOW=1)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs_cuda: needs certssb's CUDA kernels and a visible GPU; skipped otherwise")
    config.addinivalue_line(
        "markers", "slow: larger grids; skipped unless --runslow or CERTSSB_SLOW=1")


def _cuda_skip_reason() -> str | None:
    """Why CUDA tests cannot run here, or None when they can."""
    try:
        from certssb._ops import has_cuda_kernels
    except ImportError as exc:  # the build itself is broken: other tests say so loudly
        return f"certssb._C could not be loaded ({exc})"
    if not has_cuda_kernels():
        return "certssb._C was built without CUDA kernels"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = config.getoption("--runslow") or _env_true("CERTSSB_SLOW")
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow or CERTSSB_SLOW=1")
    cuda_checked = False
    cuda_reason: str | None = None
    for item in items:
        if item.get_closest_marker("slow") is not None and not run_slow:
            item.add_marker(skip_slow)
        if item.get_closest_marker("needs_cuda") is not None:
            if not cuda_checked:  # decided once, and only if some test needs it
                cuda_reason = _cuda_skip_reason()
                cuda_checked = True
            if cuda_reason is not None:
                item.add_marker(pytest.mark.skip(reason=f"needs_cuda: {cuda_reason}"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shared real-data folder: $CERTSSB_DATA, else <repo>/../shared/data; skips if absent."""
    env = os.environ.get("CERTSSB_DATA")
    root = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    if not root.is_dir():
        pytest.skip(f"shared data folder {root} not found (set CERTSSB_DATA to it)")
    return root
