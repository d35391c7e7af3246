"""Per-sample noise levels (docs/THEORY.md): gradient ascent on the radius proxy.

For every sample x, sigma_x = argmax over sigma of
    r(x, sigma) = sigma / 2 * (PhiInv(pA) - PhiInv(pB)),
pA, pB the top-2 entries of the mean softmax of the base model over n draws of
x + sigma * eps (eps from the SIGMA stream: a = step, b = sample id), clamped
to [0.02, 0.98] before PhiInv. The gradient flows THROUGH the model
(reparameterisation: d(x + sigma eps)/d sigma = eps), K steps of plain gradient
ascent, sigma clamped to [sigma_min, sigma_max] after every step. Each sample's
objective depends only on its own sigma, so a batch is optimised at once by
ascending the sum. Method "rab" skips this stage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..core.radius import radius_proxy
from ..errors import CertssbError
from ..kernels.dispatch import use_native
from ..kernels.radius import radius_proxy as kernel_radius_proxy
from .noise import Stream, noisy_copies
from .engine import Engine
from .training import memory_format


@dataclass(frozen=True)
class SigmaSearch:
    """Settings of the sigma optimisation (defaults relative to sigma0 are filled by the config)."""

    sigma0: float
    steps: int = 5
    draws: int = 4
    lr: float = 0.05
    sigma_min: float = 0.06
    sigma_max: float = 0.5
    prob_clamp: tuple[float, float] = (0.02, 0.98)

    def validate(self) -> None:
        """Raise CertssbError naming the bad setting: sigmas must be finite with
        0 < sigma_min <= sigma0 <= sigma_max, lr finite and > 0, steps >= 0, draws >= 1."""
        for name in ("sigma0", "sigma_min", "sigma_max", "lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise CertssbError(f"sigma search: {name} must be a finite number > 0, got {v!r}; "
                                   f"adjust --{name.replace('_', '-').replace('lr', 'sigma-lr')}")
        if not (0 < self.sigma_min <= self.sigma0 <= self.sigma_max):
            raise CertssbError(
                f"need 0 < sigma_min <= sigma0 <= sigma_max, got sigma_min={self.sigma_min}, "
                f"sigma0={self.sigma0}, sigma_max={self.sigma_max}; adjust --sigma-min/--sigma-max")
        if self.steps < 0 or self.draws < 1:
            raise CertssbError(f"--sigma-steps must be >= 0 and --sigma-draws >= 1, got "
                               f"{self.steps} and {self.draws}")
        lo, hi = self.prob_clamp
        if not (0 < lo < 0.5 < hi < 1):
            raise CertssbError(f"probability clamp must satisfy 0 < lo < 0.5 < hi < 1, got {self.prob_clamp}")

    def as_dict(self) -> dict:
        return {"sigma0": self.sigma0, "steps": self.steps, "draws": self.draws, "lr": self.lr,
                "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "prob_clamp": list(self.prob_clamp)}


def optimize_sigma(model: nn.Module, x: torch.Tensor, ids: torch.Tensor, search: SigmaSearch, *,
                   seed: int, batch_size: int = 32, device: torch.device | str = "cpu",
                   progress=None, engine: Optional[Engine] = None) -> torch.Tensor:
    """Optimised sigma [N] (float32, CPU) for the samples x [N, C, H, W] with SIGMA-stream ids [N].

    `model` is the base model (put in eval mode; its weights get no gradient).
    `progress`: optional tqdm bar advanced by the number of samples done.
    `engine`: the precision of the model's forward (`certssb.smoothing.engine`: bf16 runs it
    under autocast, tf32 allows TF32 on a GPU; None: fp32, today's computation); the draws,
    the radius proxy and sigma stay float32.
    """
    search.validate()
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise CertssbError("x must be a float tensor of images [N, C, H, W]")
    if not isinstance(ids, torch.Tensor) or tuple(ids.shape) != (x.shape[0],):
        raise CertssbError(f"ids must be a tensor of shape [{x.shape[0]}] (one SIGMA-stream id per sample)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CertssbError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise CertssbError("x contains NaN or Inf values; pass images as floats in [0, 1]")
    device = torch.device(device)
    model.to(memory_format=memory_format(x)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    out = torch.empty(x.shape[0], dtype=torch.float32)
    try:
        for start in range(0, x.shape[0], batch_size):
            xb = x[start:start + batch_size].to(device)
            ib = ids[start:start + batch_size].to(device)
            sigma = torch.full((xb.shape[0],), float(search.sigma0), device=device)
            for step in range(search.steps):
                sigma = sigma.detach().requires_grad_(True)
                draws = _draws(xb, sigma, ib, step, search.draws, seed)  # [n, B, ...]
                n, b = draws.shape[:2]
                flat = draws.reshape(n * b, *xb.shape[1:])
                if engine is None or engine.is_default:
                    probs = torch.softmax(model(flat.contiguous(memory_format=memory_format(flat))), dim=1)
                else:
                    with engine.math_flags(device), engine.forward_context(device):
                        logits = model(flat.contiguous(memory_format=memory_format(flat)))
                    probs = torch.softmax(logits.float(), dim=1)
                mean_probs = probs.reshape(n, b, -1).mean(0)
                r = _radius_proxy(mean_probs, sigma, search.prob_clamp)
                (grad,) = torch.autograd.grad(r.sum(), sigma)
                with torch.no_grad():
                    sigma = (sigma + search.lr * grad).clamp(search.sigma_min, search.sigma_max)
            out[start:start + xb.shape[0]] = sigma.detach().float().cpu()
            if progress is not None:
                progress.update(xb.shape[0])
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    return out


def _radius_proxy(mean_probs: torch.Tensor, sigma: torch.Tensor, clamp: tuple[float, float]) -> torch.Tensor:
    """The radius proxy through the native op (with its own backward) or the PyTorch reference."""
    if use_native("radius_proxy", mean_probs.device, dtype=mean_probs.dtype):
        return kernel_radius_proxy(mean_probs, sigma, clamp=clamp)
    return radius_proxy(mean_probs, sigma, clamp=clamp)


def _draws(x: torch.Tensor, sigma: torch.Tensor, ids: torch.Tensor, step: int, n: int,
           seed: int) -> torch.Tensor:
    """n reparameterised draws x + sigma * eps(SIGMA, step, id) -> [n, B, ...].

    Draw j of a sample uses elements [j * D, (j + 1) * D) of its (step, id) noise vector.
    """
    b = x.shape[0]
    d = x[0].numel()
    # One noise vector of n * D elements per sample: treat the n draws as one wide input.
    wide = x.reshape(b, 1, d).expand(b, n, d).reshape(b, n * d)
    noisy = noisy_copies(wide, sigma, seed=seed, stream=int(Stream.SIGMA), models=[step], ids=ids)[0]
    return noisy.reshape(b, n, *x.shape[1:]).transpose(0, 1)


def sigma_stats(sigma: torch.Tensor) -> dict:
    """min / median / mean / max of a sigma vector, as plain floats."""
    if sigma.numel() == 0:
        return {"min": None, "median": None, "mean": None, "max": None}
    s = sigma.double()
    return {"min": float(s.min()), "median": float(s.median()), "mean": float(s.mean()),
            "max": float(s.max())}
