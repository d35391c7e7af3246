"""Noise streams: every Gaussian draw of the project as a pure function.

A draw is a function of (seed, stream, a, b, element) and nothing else, so the
same noise comes out whatever the batch size, shuffle order, chunking of models,
number of processes or device. Nothing of size M x N x D is ever stored: noise
is regenerated where it is used.

Definition (the native kernels implement exactly the same):

* Philox4x32-10 (Salmon et al., SC 2011), key (k0, k1) = (low, high) 32 bits of
  the 64-bit seed, counter (c0, c1, c2, c3) = (stream, a, b, element // 2).
  Round: with multipliers M0 = 0xD2511F53, M1 = 0xCD9E8D57,
  hi0:lo0 = M0 * c0, hi1:lo1 = M1 * c2,
  (c0, c1, c2, c3) <- (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0),
  then the key is bumped by (0x9E3779B9, 0xBB67AE85); 10 rounds.
* Box-Muller on the four uint32 outputs (x0, x1, x2, x3) of one call, each
  uniform from 53 bits of two words, k(hi, lo) = hi * 2^21 + (lo >> 11):
  u1 = (k(x0, x1) + 1) * 2^-53 in (0, 1], u2 = k(x2, x3) * 2^-53 in [0, 1),
  in float64: r = sqrt(-2 ln u1), z = (r cos(2 pi u2), r sin(2 pi u2)).
  Element e takes z[e % 2] (cos for even e, sin for odd) of counter e // 2.
  The cast to the output dtype comes last.
* Streams: BASE (a = epoch, b = sample index; the base model's training noise),
  TRAIN (a = model k, b = training sample index), TEST (a = model k, b = 0,
  shared by all test inputs), SIGMA (a = gradient-ascent step, b = sample id;
  see `sample_ids`).

u1's 2^-53 resolution caps |z| at sqrt(-2 ln 2^-53) ~ 8.57: each pair loses at most
2^-53 of Gaussian mass (docs/THEORY.md sections 7 and 8).
This module is the pure-PyTorch reference; `noisy_copies` dispatches to the
fused native kernel (`certssb.kernels.noise`) unless the reference backend is
asked for.
"""
from __future__ import annotations

import math
from enum import IntEnum
from typing import Sequence

import torch

from ..errors import CertssbError
from ..kernels.dispatch import use_native
from ..kernels.noise import noise
from ..kernels.noise_common import MASK32 as _MASK32, PHILOX_M0 as _M0, PHILOX_M1 as _M1
from ..kernels.noise_common import PHILOX_W0 as _W0, PHILOX_W1 as _W1
from ..kernels.noise_common import check_noise_inputs, check_seed


class Stream(IntEnum):
    """The noise streams (docs/THEORY.md): which random draws a (stream, a, b) triple names."""

    BASE = 0
    TRAIN = 1
    TEST = 2
    SIGMA = 3


# Sample ids on the SIGMA stream: training sample i -> i, clean test j -> 2^30 + j,
# triggered test j -> 2^31 + j, so the three sets never share a draw.
SPLIT_OFFSETS = {"train": 0, "clean": 1 << 30, "triggered": 1 << 31}


def sample_ids(split: str, n: int) -> torch.Tensor:
    """Ids on the SIGMA stream for the first `n` samples of `split` ("train", "clean", "triggered")."""
    if split not in SPLIT_OFFSETS:
        raise CertssbError(f"unknown split {split!r}; expected one of {sorted(SPLIT_OFFSETS)}")
    if n >= (1 << 30):
        raise CertssbError(f"{n} samples do not fit in the 2^30 ids of a split")
    return torch.arange(n, dtype=torch.int64) + SPLIT_OFFSETS[split]


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * m for uint32 values held in int64.

    The 64-bit product may overflow int64, so it is assembled from two 48-bit
    partial products: a * m = a * m_lo + (a * m_hi) << 16.
    """
    t = a * (m & 0xFFFF)  # < 2^48
    u = a * (m >> 16)  # < 2^48
    hi = ((t >> 16) + u) >> 16
    lo = (t + ((u & 0xFFFF) << 16)) & _MASK32
    return hi, lo


def philox4x32(seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor,
               c3: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on broadcastable int64 counters holding uint32 values; returns 4 int64 words."""
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for r in range(10):
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        if r < 9:
            k0 = (k0 + _W0) & _MASK32
            k1 = (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def _bits53(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """hi * 2^21 + (lo >> 11): the top 53 bits of the 64-bit word hi:lo, as int64 (exact)."""
    return (hi << 21) | (lo >> 11)


def _uniform53(hi: torch.Tensor, lo: torch.Tensor, *, open_at_zero: bool) -> torch.Tensor:
    """k(hi, lo) * 2^-53 in [0, 1), or (k + 1) * 2^-53 in (0, 1] (never 0) with open_at_zero."""
    return (_bits53(hi, lo) + int(open_at_zero)).double() * 2.0 ** -53


def _box_muller(x0: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor,
                x3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u1 = _uniform53(x0, x1, open_at_zero=True)
    u2 = _uniform53(x2, x3, open_at_zero=False)
    r = torch.sqrt(-2.0 * torch.log(u1))
    theta = (2.0 * math.pi) * u2
    return r * torch.cos(theta), r * torch.sin(theta)


def normal(seed: int, stream: int, a: torch.Tensor | int, b: torch.Tensor | int, numel: int,
           *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normals eps(seed, stream, a, b, 0..numel-1).

    `a` and `b` are integers or int64 tensors of the same shape S (one noise
    vector per entry); the result has shape S + [numel]. Values of a and b must
    lie in [0, 2^32).
    """
    seed = check_seed(seed)
    device = torch.device(device)
    a_t = torch.as_tensor(a, dtype=torch.int64, device=device)
    b_t = torch.as_tensor(b, dtype=torch.int64, device=device)
    a_t, b_t = torch.broadcast_tensors(a_t, b_t)
    if a_t.numel() and (int(a_t.min()) < 0 or int(a_t.max()) > _MASK32
                        or int(b_t.min()) < 0 or int(b_t.max()) > _MASK32):
        raise CertssbError("noise indices a and b must lie in [0, 2^32)")
    shape = tuple(a_t.shape)
    n_ctr = (numel + 1) // 2
    if numel == 0 or a_t.numel() == 0:
        return torch.empty(shape + (numel,), dtype=dtype, device=device)
    ctr = torch.arange(n_ctr, dtype=torch.int64, device=device)
    x0, x1, x2, x3 = philox4x32(
        seed,
        torch.full((), int(stream), dtype=torch.int64, device=device),
        a_t.reshape(-1, 1), b_t.reshape(-1, 1), ctr.reshape(1, -1))
    z0, z1 = _box_muller(x0, x1, x2, x3)
    z = torch.stack((z0, z1), dim=-1).reshape(a_t.numel(), n_ctr * 2)[:, :numel]
    return z.to(dtype).reshape(shape + (numel,))


def noisy_copies(x: torch.Tensor, sigma: torch.Tensor | float, *, seed: int, stream: int,
                 models: Sequence[int] | torch.Tensor, ids: torch.Tensor | None,
                 backend: str | None = None, check: bool = True) -> torch.Tensor:
    """out[k, j] = x[j] + sigma[j] * eps(seed, stream, models[k], ids[j], :) for a block of models.

    x: [B, ...] floating, finite; sigma: a float or [B], finite and > 0; models: K model
    indices (the `a` word); ids: [B] sample indices (the `b` word), or None for b = 0
    shared by every input (the TEST stream). Returns [K, B, ...] in x's dtype.
    Differentiable in x and sigma (the noise itself is a constant).

    backend: "kernels" (the fused native op, one call per run of consecutive model
    indices), "reference" (this module's pure PyTorch), or None for
    `certssb.kernels.current_backend()`. Both give the same numbers (to 1e-6).
    check: validate x and sigma values (`check_noise_inputs`, one GPU sync); hot loops
    that validated them once up front pass False. Raises CertssbError on bad input.

    Example::

        out = noisy_copies(torch.rand(8, 1, 8, 8), 0.25, seed=0, stream=int(Stream.TEST),
                           models=[0, 1, 2], ids=None)   # [3, 8, 1, 8, 8]
    """
    if check:
        check_noise_inputs(x, sigma)
    if use_native("noise", x.device, dtype=x.dtype, backend=backend) and x.dim() >= 1:
        return _noisy_copies_kernel(x, sigma, seed=seed, stream=stream, models=models, ids=ids)
    B = x.shape[0]
    d = x[0].numel() if B else int(math.prod(x.shape[1:]))
    models_t = torch.as_tensor(models, dtype=torch.int64, device=x.device).reshape(-1)
    if ids is None:
        eps = normal(seed, stream, models_t, 0, d, dtype=x.dtype, device=x.device)  # [K, D]
        eps = eps[:, None, :].expand(len(models_t), B, d)
    else:
        ids = torch.as_tensor(ids, dtype=torch.int64, device=x.device)
        if ids.shape != (B,):
            raise CertssbError(f"ids must have shape [{B}], got {list(ids.shape)}")
        eps = normal(seed, stream, models_t[:, None], ids[None, :], d, dtype=x.dtype, device=x.device)
    sig = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sig.dim() == 1:
        sig = sig.reshape(1, B, *([1] * (x.dim() - 1)))
    return x.unsqueeze(0) + sig * eps.reshape(len(models_t), B, *x.shape[1:])


def _noisy_copies_kernel(x: torch.Tensor, sigma: torch.Tensor | float, *, seed: int, stream: int,
                         models: Sequence[int] | torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    """`noisy_copies` through the fused kernel: one op call per run of consecutive models."""
    B = x.shape[0]
    models_l = [int(k) for k in torch.as_tensor(models, dtype=torch.int64).reshape(-1).tolist()]
    if ids is None:
        ids_t = torch.zeros(B, dtype=torch.int64, device=x.device)
    else:
        ids_t = torch.as_tensor(ids, dtype=torch.int64, device=x.device)
        if ids_t.shape != (B,):
            raise CertssbError(f"ids must have shape [{B}], got {list(ids_t.shape)}")
    sig = torch.as_tensor(sigma, device=x.device)
    if not sig.is_floating_point():
        sig = sig.to(x.dtype)
    if sig.dim() == 0:
        sig = sig.expand(B)
    elif sig.shape != (B,):
        raise CertssbError(f"sigma must be a number or have shape [{B}], got {list(sig.shape)}")
    runs: list[tuple[int, int]] = []  # (first model, count)
    for k in models_l:
        if runs and k == runs[-1][0] + runs[-1][1]:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((k, 1))
    if not runs:  # no models: still through the op, so the empty output stays on the autograd graph
        return noise(x, sig, ids_t, seed=check_seed(seed), stream=int(stream), k0=0, models=0, check=False)
    parts = [noise(x, sig, ids_t, seed=check_seed(seed), stream=int(stream), k0=k0, models=n, check=False)
             for k0, n in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts)
