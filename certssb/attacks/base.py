"""The `Trigger` base class and `make_trigger`.

Triggers act on images in [0, 1] of shape ``[N, C, H, W]``; ``(H // 2, W // 2)``
is "the centre" pixel, the default position of the pixel triggers (``pixel``
moves it: on MNIST the centre of a '1' is ink, where clipping erases a
one-pixel trigger, so the pipeline uses RAB's MNIST positions there).

``Trigger(name=...)`` builds the registered subclass of that name (see
`certssb.attacks.registry`). The base class validates what every trigger shares
(image shape, seed, ``delta`` of additive triggers, the pixel position, the
declared parameters) and checks inputs; a subclass implements ``_apply`` (the
formula, on a clone of the input), ``_parameters`` (its part of `describe`) and
optionally ``_setup`` (build a fixed pattern) and ``_check_shape``.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from ..errors import CertssbError
from .registry import check_trigger_options, get_trigger, is_int, is_real


class Trigger:
    """A backdoor trigger for images of shape ``image_shape = (C, H, W)``.

    Build it with `make_trigger` (same validation) or ``Trigger(name=..., delta=...,
    image_shape=...)``, which returns the registered subclass. ``pattern`` is a
    fixed ``[C, H, W]`` float32 image for pattern triggers (``blending``,
    ``blended``), ``None`` otherwise. Declared parameters read as attributes
    (``trigger.patch_size``); ``params`` holds them all.
    """

    spec: Any  # the TriggerSpec, set by register_trigger on each subclass
    margin = 0  # pixels that must fit around `pixel` (fourpixel: its 4-neighbours)

    def __new__(cls, *args: Any, **kwargs: Any) -> "Trigger":
        if cls is Trigger:
            cls = get_trigger(kwargs["name"] if "name" in kwargs else args[0] if args else None).cls
        return super().__new__(cls)

    def __init__(self, name: str, delta: float, image_shape: tuple[int, int, int], seed: int = 0,
                 patch_size: Optional[int] = None, blend_alpha: float = 0.2,
                 pixel: Optional[tuple[int, int]] = None, *, options: Optional[dict] = None) -> None:
        spec = get_trigger(name)
        if spec.cls is not type(self):
            raise CertssbError(f"trigger {name!r} is built by {spec.cls.__name__}, not {type(self).__name__}")
        self.name, self.delta, self.seed = name, delta, seed
        if not (isinstance(image_shape, (tuple, list)) and len(image_shape) == 3
                and all(is_int(v) and v >= 1 for v in image_shape)):
            raise CertssbError(f"image_shape must be (C, H, W) of positive integers, got {image_shape!r}")
        self.image_shape: tuple[int, int, int] = tuple(int(v) for v in image_shape)  # type: ignore[assignment]
        c, h, w = self.image_shape
        if not is_int(seed):
            raise CertssbError(f"trigger seed must be an integer, got {seed!r}")
        if spec.additive:
            if not (is_real(delta) and math.isfinite(delta) and delta > 0):
                raise CertssbError(
                    f"trigger {name!r} needs a finite L2 norm delta > 0, got {delta!r}; pass e.g. delta=0.1")
            self.delta = float(delta)
        self._check_shape()
        if pixel is None:
            pixel = (h // 2, w // 2)
        if not (isinstance(pixel, (tuple, list)) and len(pixel) == 2 and all(is_int(v) for v in pixel)):
            raise CertssbError(f"trigger pixel must be a pair (row, column), got {pixel!r}")
        self.pixel = (int(pixel[0]), int(pixel[1]))
        m = self.margin
        if not (m <= self.pixel[0] < h - m and m <= self.pixel[1] < w - m):
            raise CertssbError(
                f"trigger pixel {self.pixel} does not fit an image of {h}x{w}"
                + (" with its four neighbours" if m else "") + "; pick a position inside the image")
        # patch_size / blend_alpha: keywords from before the registry, passed on only to a
        # trigger that declares them (patch_size None: its default)
        legacy = {"blend_alpha": blend_alpha} if patch_size is None else \
            {"patch_size": patch_size, "blend_alpha": blend_alpha}
        given = {k: v for k, v in legacy.items() if k in spec.param_names}
        if options is not None:
            given.update(check_trigger_options(name, options))
        self.params: dict[str, Any] = {
            p.name: p.check(given[p.name] if p.name in given else p.default_for(self.image_shape),
                            self.image_shape)
            for p in spec.params}
        self.pattern: Optional[torch.Tensor] = None
        self._setup()

    def __getattr__(self, key: str) -> Any:
        params = self.__dict__.get("params")
        if params is not None and key in params:
            return params[key]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {key!r}")

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return (f"{type(self).__name__}(name={self.name!r}, delta={self.delta!r}, image_shape={self.image_shape!r}, "
                f"seed={self.seed!r}, pixel={self.pixel!r}{extra})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Trigger):
            return NotImplemented
        key = lambda t: (type(t), t.name, t.delta, t.image_shape, t.seed, t.pixel, t.params)  # noqa: E731
        return key(self) == key(other)

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it replaces

    # ---------------------------------------------------------------- subclass hooks
    def _check_shape(self) -> None:
        """Raise CertssbError if the trigger cannot act on images of ``self.image_shape``."""

    def _setup(self) -> None:
        """Build fixed state (e.g. ``self.pattern``) once the parameters are validated."""

    def _apply(self, out: torch.Tensor) -> torch.Tensor:
        """Return the triggered images; ``out`` is a clone of the input that may be changed in place."""
        raise NotImplementedError

    def _parameters(self) -> dict:
        """The JSON-ready ``parameters`` part of `describe`."""
        raise NotImplementedError

    # ---------------------------------------------------------------- public
    @property
    def nominal_l2(self) -> float | None:
        """The nominal L2 norm of the perturbation: ``delta`` for additive triggers, else None."""
        return self.delta if self.spec.additive else None

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            what = f"a {x.dim()}-d {x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
            raise CertssbError(f"trigger input must be a float tensor [N, C, H, W] in [0, 1], got {what}")
        if tuple(x.shape[1:]) != self.image_shape:
            raise CertssbError(
                f"trigger was made for images of shape {self.image_shape}, got images of shape "
                f"{tuple(x.shape[1:])}; build the trigger with the dataset's image_shape")
        if x.numel():
            lo, hi = torch.aminmax(x.detach())
            lo, hi = float(lo), float(hi)
            if not (0.0 <= lo and hi <= 1.0):  # also False for NaN
                raise CertssbError(
                    f"trigger input must be images in [0, 1] without NaN/Inf, got values in "
                    f"[{lo}, {hi}]; scale pixels to [0, 1] (uint8 / 255) and do not normalize")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Return the triggered copy of ``x`` (float ``[N, C, H, W]``); ``x`` is not modified.

        Same dtype and device as ``x``. See each trigger's module for its formula.
        """
        self._check_input(x)
        return self._apply(x.clone())

    def describe(self) -> dict:
        """JSON-ready summary: name, nominal L2 ``delta`` (None if unused), image shape, parameters."""
        return {"name": self.name, "delta": self.nominal_l2, "image_shape": list(self.image_shape),
                "parameters": self._parameters()}


def make_trigger(
    name: str,
    delta: float,
    image_shape: tuple[int, int, int],
    *,
    seed: int = 0,
    patch_size: int | None = None,
    blend_alpha: float = 0.2,
    pixel: tuple[int, int] | None = None,
    options: dict | None = None,
) -> Trigger:
    """Build and validate a trigger.

    Args:
        name: one of ``TRIGGERS`` (the registered triggers).
        delta: nominal L2 norm of the additive triggers (onepixel, fourpixel,
            blending): finite and > 0. Ignored by the others (badnets, blended).
        image_shape: (C, H, W) of the images it will be applied to.
        seed: seed of the fixed pattern (blending, blended).
        patch_size: badnets patch side; default ``max(1, round(3 * H / 32))``
            (3 on 32-pixel images). Same as ``options={"patch_size": ...}``.
        blend_alpha: blended trigger weight a in (0, 1]. Same as
            ``options={"blend_alpha": ...}``.
        pixel: (row, column) of the onepixel trigger / centre of the fourpixel
            trigger; default the image centre ``(H // 2, W // 2)``.
        options: the trigger's declared parameters by name (they override
            ``patch_size`` / ``blend_alpha``); an undeclared key is an error.

    Raises:
        CertssbError: unknown name, bad delta, patch larger than the image,
            blend_alpha outside (0, 1], image smaller than 3x3 for fourpixel,
            an option the trigger does not declare.
    """
    return Trigger(name=name, delta=delta, image_shape=image_shape, seed=seed, patch_size=patch_size,
                   blend_alpha=blend_alpha, pixel=pixel, options=options)


__all__ = ["Trigger", "make_trigger"]
