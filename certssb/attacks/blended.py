"""The ``blended`` trigger (Chen et al. 2017, as in BackdoorBench); ``delta`` unused.

``x' = (1 - a) x + a * pattern`` with ``a = blend_alpha`` (option, in (0, 1],
default 0.2 as BackdoorBench) and ``pattern`` a fixed uniform [0, 1] image drawn
from ``torch.Generator().manual_seed(seed)``.
"""
from __future__ import annotations

import math

import torch

from ..errors import CertssbError
from .base import Trigger
from .registry import TriggerParam, is_real, register_trigger


def _check_alpha(a: object, image_shape: tuple[int, int, int]) -> float:
    if not (is_real(a) and math.isfinite(a) and 0 < a <= 1):  # type: ignore[arg-type, operator]
        raise CertssbError(
            f"blend_alpha must be in (0, 1] (the weight of the blended pattern), got {a!r}; "
            "BackdoorBench uses 0.2")
    return float(a)  # type: ignore[arg-type]


@register_trigger("blended", additive=False, params=(
    TriggerParam("blend_alpha", float, 0.2, _check_alpha, "weight of the pattern, in (0, 1]"),))
class Blended(Trigger):
    def _setup(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        self.pattern = torch.rand(self.image_shape, generator=g, dtype=torch.float32)

    def _apply(self, out: torch.Tensor) -> torch.Tensor:
        a = self.blend_alpha
        return (1.0 - a) * out + a * self.pattern.to(device=out.device, dtype=out.dtype)

    def _parameters(self) -> dict:
        return {"blend_alpha": self.blend_alpha, "pattern": "uniform [0, 1]", "seed": self.seed}
