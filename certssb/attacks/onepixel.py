"""The ``onepixel`` trigger (RAB / Cert-SSB), additive with nominal L2 norm ``delta``.

The pixel ``pixel`` (default the centre), every channel ``+= delta / sqrt(C)``,
then clipped to [0, 1] (RAB: ``min(x + d, 1)``). Nominal norm
``sqrt(C * delta^2 / C) = delta``; clipping can only make it smaller.
`PixelTrigger` is the shared implementation of the pixel triggers: each of its
``_pixels()`` gets ``delta / sqrt(len(pixels) * C)`` per value.
"""
from __future__ import annotations

import math

import torch

from .base import Trigger
from .registry import register_trigger


class PixelTrigger(Trigger):
    """Adds ``delta / sqrt(P * C)`` to every channel of the P pixels ``_pixels()``, clipped to [0, 1]."""

    def _pixels(self) -> list[tuple[int, int]]:
        raise NotImplementedError

    def _per_value_change(self) -> float:
        return self.delta / math.sqrt(len(self._pixels()) * self.image_shape[0])

    def _apply(self, out: torch.Tensor) -> torch.Tensor:
        d = self._per_value_change()
        for ph, pw in self._pixels():
            out[:, :, ph, pw] = (out[:, :, ph, pw] + d).clamp(0.0, 1.0)
        return out

    def _parameters(self) -> dict:
        return {"pixels": [list(p) for p in self._pixels()], "per_value_change": self._per_value_change(),
                "clipped": True}


@register_trigger("onepixel", additive=True)
class OnePixel(PixelTrigger):
    def _pixels(self) -> list[tuple[int, int]]:
        return [self.pixel]
