"""Typed wrappers of the native ops (torch.ops.certssb.*), with their fake kernels and autograd.

One file per op family, each pairing the native kernel with its pure-PyTorch
reference (the reference lives with the stage that uses it: noise.py, certify.py,
bounds.py):

- `noise`:  fused noisy copies x + sigma * eps(seed, stream, k, id) for a block of models;
- `vote`:   streaming soft/hard vote accumulation and top-2 finalisation;
- `radius`: pA bounds, PhiInv, certified radius, and the radius proxy with its gradient.

`BACKENDS` names the two implementations every stage can run on; `use_kernels`
decides, per call, whether the native path applies.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch

from .._ops import has_cuda_kernels
from ..errors import CertssbError

BACKENDS = ("kernels", "reference")
DEFAULT_BACKEND = "kernels"


_BACKEND: contextvars.ContextVar[str] = contextvars.ContextVar("certssb_backend",
                                                              default=DEFAULT_BACKEND)


def current_backend() -> str:
    """The backend used by calls that pass backend=None ("kernels" unless `using_backend` says)."""
    return _BACKEND.get()


@contextlib.contextmanager
def using_backend(backend: str) -> Iterator[str]:
    """Run the enclosed stages on `backend` ("kernels" or "reference"); restores the previous one.

    Example::

        with using_backend("reference"):
            certssb.run(config)  # every noise draw, vote and radius through pure PyTorch
    """
    token = _BACKEND.set(check_backend(backend))
    try:
        yield backend
    finally:
        _BACKEND.reset(token)


def check_backend(backend: str) -> str:
    """Validate a backend name; returns it."""
    if backend not in BACKENDS:
        raise CertssbError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} "
                           "('kernels' runs the native C++/CUDA ops, 'reference' the pure-PyTorch path)")
    return backend


def kernels_on(device: torch.device | str) -> bool:
    """Whether the native kernels were built for `device`'s type (CPU always, CUDA when compiled in)."""
    kind = torch.device(device).type
    if kind == "cpu":
        return True
    if kind == "cuda":
        return has_cuda_kernels()
    return False


def use_kernels(backend: str | None, device: torch.device | str) -> bool:
    """True when `backend` (None: `current_backend()`) asks for the kernels and they exist for `device`.

    The reference path is taken silently on devices without kernels (for example
    MPS): both give the same numbers, only the speed differs.
    """
    if backend is None:
        backend = current_backend()
    return check_backend(backend) == "kernels" and kernels_on(device)


def seed_to_int64(seed: int) -> int:
    """The 64-bit seed as the two's-complement int64 that the op schemas carry."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < (1 << 64):
        raise CertssbError(f"seed must be an integer in [0, 2^64), got {seed!r}")
    return seed - (1 << 64) if seed >= (1 << 63) else seed


__all__ = ["BACKENDS", "DEFAULT_BACKEND", "current_backend", "using_backend", "check_backend", "kernels_on", "use_kernels", "seed_to_int64"]
