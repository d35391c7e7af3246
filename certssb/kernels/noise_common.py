"""What the noise reference (certssb.smoothing.noise) and the noise op (certssb.kernels.noise)
share: the Philox4x32-10 constants, the seed's checks and int64 form, the input checks.
Imports neither of them, so neither imports the other for these."""
from __future__ import annotations

import math
import numbers

import torch

from ..errors import CertssbError

__all__ = ["MASK32", "PHILOX_M0", "PHILOX_M1", "PHILOX_W0", "PHILOX_W1", "check_seed", "seed_to_int64",
           "check_noise_inputs"]

MASK32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53  # round multipliers
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9  # key bumps (Weyl sequence)
PHILOX_W1 = 0xBB67AE85

_SEED_MSG = "seed must be an integer in [0, 2^64), got {!r}"


def check_seed(seed: int) -> int:
    """The 64-bit seed of a noise draw, checked (an integer in [0, 2^64))."""
    if not isinstance(seed, int) or seed < 0 or seed >= (1 << 64):
        raise CertssbError(_SEED_MSG.format(seed))
    return seed


def seed_to_int64(seed: int) -> int:
    """The 64-bit seed as the two's-complement int64 that the op schemas carry."""
    if isinstance(seed, bool):
        raise CertssbError(_SEED_MSG.format(seed))
    seed = check_seed(seed)
    return seed - (1 << 64) if seed >= (1 << 63) else seed


def check_noise_inputs(x: torch.Tensor, sigma: torch.Tensor | float) -> None:
    """Boundary checks of a noise draw: x a floating tensor [B, ...] without NaN/Inf; sigma a
    number or a [B] tensor, finite and > 0 everywhere. Raises CertssbError. One host
    synchronisation on a GPU (the extremes travel together)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        what = f"a {x.dtype} tensor of shape {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise CertssbError(f"x must be a floating tensor of shape [B, ...], got {what}")
    b = x.shape[0]
    if isinstance(sigma, torch.Tensor):
        if not (sigma.dim() == 0 or tuple(sigma.shape) == (b,)):
            raise CertssbError(f"sigma must be a number or have shape [{b}], got {list(sigma.shape)}")
        if not sigma.is_floating_point():
            raise CertssbError(f"sigma must be a floating tensor of noise levels, got {sigma.dtype}")
        s = sigma.detach()
    elif isinstance(sigma, numbers.Real) and not isinstance(sigma, bool):
        s = torch.tensor(float(sigma), dtype=torch.float64)
    else:
        raise CertssbError(f"sigma must be a number or a [B] tensor, got {type(sigma).__name__}")
    parts = []
    if s.numel():
        parts += [v.to(torch.float64).cpu() for v in torch.aminmax(s)]
    if x.numel():
        parts.append(torch.isfinite(x.detach()).all().to(torch.float64).cpu())
    vals = torch.stack(parts).tolist() if parts else []
    if s.numel() and not (vals[0] > 0 and vals[1] < math.inf):  # False for NaN too
        raise CertssbError(f"sigma must be finite and > 0 everywhere (noise levels in [0, 1] pixel units), "
                           f"got values in [{vals[0]}, {vals[1]}]; check the sigma file / settings")
    if x.numel() and vals[-1] != 1.0:
        raise CertssbError("x contains NaN or Inf values; check the input images (floats in [0, 1])")
