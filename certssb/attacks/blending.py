"""The ``blending`` trigger (RAB / Cert-SSB), additive with nominal L2 norm ``delta``.

A fixed standard-Gaussian pattern ``[C, H, W]`` drawn from
``torch.Generator().manual_seed(seed)``, scaled to L2 norm exactly ``delta`` and
added WITHOUT clipping (as RAB's blending attack).
"""
from __future__ import annotations

import torch

from .base import Trigger
from .registry import register_trigger


@register_trigger("blending", additive=True)
class Blending(Trigger):
    def _setup(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(self.image_shape, generator=g, dtype=torch.float64)
        # Scale in float64 so the float32 pattern's norm is delta to rounding.
        self.pattern = (noise * (self.delta / noise.norm())).to(torch.float32)

    def _apply(self, out: torch.Tensor) -> torch.Tensor:
        return out + self.pattern.to(device=out.device, dtype=out.dtype)

    def _parameters(self) -> dict:
        return {"pattern": "standard normal scaled to norm delta", "seed": self.seed, "clipped": False}
