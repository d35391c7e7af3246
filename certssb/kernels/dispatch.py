"""Native op or pure-PyTorch reference: the one place that decides, per call.

Every stage that has both paths (noise draws, vote accumulation, certificates, the
sigma search's radius proxy) asks `use_native(op, device, dtype=...)`. The native op
runs when the backend asks for kernels (the `backend` argument, else `current_backend()`,
set by `using_backend`), the kernels were built for the device's type (CPU always, CUDA
when compiled in), and the op takes the tensors' dtype. Otherwise the reference runs,
silently: both give the same numbers, only the speed differs.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch

from .._ops import has_cuda_kernels
from ..errors import CertssbError

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "NATIVE_OPS", "current_backend", "using_backend", "check_backend",
           "kernels_on", "use_kernels", "use_native"]

BACKENDS = ("kernels", "reference")
DEFAULT_BACKEND = "kernels"

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The native ops with a reference twin, and the dtypes of their main input (None: any; the
# wrapper checks). The certificate op serves only the bounds that name a kernel id
# (certssb.certify.bounds.BoundSpec.kernel).
NATIVE_OPS: dict[str, tuple[torch.dtype, ...] | None] = {
    "noise": _FLOATS,            # x of noisy_copies
    "vote_accumulate": _FLOATS,  # the logits
    "radius_certify": None,      # with vote_top2: votes -> certificates
    "radius_proxy": _FLOATS,     # mean_probs of the sigma search
}

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
    """True when `backend` (None: `current_backend()`) asks for the kernels and they exist for `device`."""
    if backend is None:
        backend = current_backend()
    return check_backend(backend) == "kernels" and kernels_on(device)


def use_native(op: str, device: torch.device | str, *, dtype: torch.dtype | None = None,
               backend: str | None = None) -> bool:
    """Whether native op `op` (a key of NATIVE_OPS) should run on tensors of `device` and `dtype`.

    backend: "kernels", "reference", or None for `current_backend()`; an unknown name raises.
    dtype: of the op's main input; None skips the dtype test.

    Example::

        if use_native("radius_proxy", p.device, dtype=p.dtype):
            r = kernels.radius.radius_proxy(p, sigma)
        else:
            r = core.radius.radius_proxy(p, sigma)
    """
    if op not in NATIVE_OPS:
        raise ValueError(f"no native op {op!r}; known: {', '.join(NATIVE_OPS)}")
    if not use_kernels(backend, device):
        return False
    dtypes = NATIVE_OPS[op]
    return dtype is None or dtypes is None or dtype in dtypes
