"""The ``badnets`` trigger (BackdoorBench / BackdoorBox); ``delta`` unused.

A white (value 1) square patch of ``patch_size`` pixels at the bottom-right
corner, every channel. Option ``patch_size``: default ``max(1, round(3 * H / 32))``
(3 on 32-pixel images), at most ``min(H, W)``.
"""
from __future__ import annotations

import torch

from ..errors import CertssbError
from .base import Trigger
from .registry import TriggerParam, is_int, register_trigger


def _default_patch(image_shape: tuple[int, int, int]) -> int:
    return max(1, round(3 * image_shape[1] / 32))


def _check_patch(value: object, image_shape: tuple[int, int, int]) -> int:
    _, h, w = image_shape
    if not (is_int(value) and value >= 1):  # type: ignore[operator]
        raise CertssbError(f"badnets patch_size must be a positive integer, got {value!r}")
    if value > min(h, w):  # type: ignore[operator]
        raise CertssbError(
            f"badnets patch of {value}x{value} pixels does not fit an image of {h}x{w}; "
            f"pass a patch_size of at most {min(h, w)}")
    return value  # type: ignore[return-value]


@register_trigger("badnets", additive=False, params=(
    TriggerParam("patch_size", int, _default_patch, _check_patch, "patch side in pixels"),))
class BadNets(Trigger):
    def _apply(self, out: torch.Tensor) -> torch.Tensor:
        _, h, w = self.image_shape
        p = int(self.patch_size)
        out[:, :, h - p:, w - p:] = 1.0
        return out

    def _parameters(self) -> dict:
        return {"patch_size": self.patch_size, "location": "bottom-right", "value": 1.0}
