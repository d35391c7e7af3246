"""Backdoor triggers, training-set poisoning and triggered test sets (DESIGN.md 1.2).

Triggers act on images in [0, 1] of shape ``[N, C, H, W]``; ``(H // 2, W // 2)``
is "the centre" pixel, the default position of the pixel triggers (``pixel``
moves it: on MNIST the centre of a '1' is ink, where clipping erases a
one-pixel trigger, so the pipeline uses RAB's MNIST positions there).

Additive triggers with a nominal L2 norm ``delta`` (RAB / Cert-SSB):

- ``onepixel``: the centre pixel, every channel ``+= delta / sqrt(C)``, then
  clipped to [0, 1] (RAB: ``min(x + d, 1)``). Nominal norm
  ``sqrt(C * delta^2 / C) = delta``; clipping can only make it smaller.
- ``fourpixel``: the four 4-neighbours of the centre, every channel
  ``+= delta / sqrt(4 C)``, clipped to [0, 1].
- ``blending``: a fixed standard-Gaussian pattern ``[C, H, W]`` drawn from
  ``torch.Generator().manual_seed(seed)``, scaled to L2 norm exactly ``delta``
  and added WITHOUT clipping (as RAB's blending attack).

Triggers of the backdoor benchmarks (BackdoorBench / BackdoorBox), ``delta`` unused:

- ``badnets``: a white (value 1) square patch of ``patch_size`` pixels at the
  bottom-right corner, every channel.
- ``blended`` (Chen et al. 2017): ``x' = (1 - a) x + a * pattern``, ``a =
  blend_alpha``, pattern a fixed uniform [0, 1] image drawn from the seed.

Poisoning picks ``round(rate * N)`` samples (non-target ones for all-to-one),
applies the trigger and relabels them; every poisoned set reports the trigger's
measured L2 norm beside the nominal one. Labels here are task labels 0..K-1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import CertssbError

TRIGGERS = ("onepixel", "fourpixel", "blending", "badnets", "blended")
# Triggers whose strength is the nominal L2 norm `delta`.
ADDITIVE_TRIGGERS = ("onepixel", "fourpixel", "blending")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class Trigger:
    """A backdoor trigger for images of shape ``image_shape = (C, H, W)``.

    Build it with `make_trigger` (same validation). ``pattern`` is the fixed
    ``[C, H, W]`` float32 image of the ``blending`` (scaled Gaussian, norm
    ``delta``) and ``blended`` (uniform [0, 1]) triggers, ``None`` otherwise.
    """

    name: str
    delta: float
    image_shape: tuple[int, int, int]
    seed: int = 0
    patch_size: int | None = None
    blend_alpha: float = 0.2
    pixel: tuple[int, int] | None = None  # position of onepixel / centre of fourpixel; None = centre
    pattern: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.name not in TRIGGERS:
            raise CertssbError(f"unknown trigger {self.name!r}; choose one of: {', '.join(TRIGGERS)}")
        shape = self.image_shape
        if not (
            isinstance(shape, (tuple, list))
            and len(shape) == 3
            and all(_is_int(v) and v >= 1 for v in shape)
        ):
            raise CertssbError(
                f"image_shape must be (C, H, W) of positive integers, got {shape!r}"
            )
        self.image_shape = tuple(int(v) for v in shape)  # type: ignore[assignment]
        c, h, w = self.image_shape
        if not _is_int(self.seed):
            raise CertssbError(f"trigger seed must be an integer, got {self.seed!r}")

        if self.name in ADDITIVE_TRIGGERS:
            if not (_is_real(self.delta) and math.isfinite(self.delta) and self.delta > 0):
                raise CertssbError(
                    f"trigger {self.name!r} needs a finite L2 norm delta > 0, got {self.delta!r}; "
                    "pass e.g. delta=0.1"
                )
            self.delta = float(self.delta)
        if self.name == "fourpixel" and (h < 3 or w < 3):
            raise CertssbError(
                f"the fourpixel trigger needs images of at least 3x3 pixels (the four neighbours "
                f"of the centre), got {h}x{w}; use the onepixel or blending trigger"
            )
        if self.pixel is None:
            self.pixel = (h // 2, w // 2)
        if not (isinstance(self.pixel, (tuple, list)) and len(self.pixel) == 2
                and all(_is_int(v) for v in self.pixel)):
            raise CertssbError(f"trigger pixel must be a pair (row, column), got {self.pixel!r}")
        self.pixel = (int(self.pixel[0]), int(self.pixel[1]))
        margin = 1 if self.name == "fourpixel" else 0
        if not (margin <= self.pixel[0] < h - margin and margin <= self.pixel[1] < w - margin):
            raise CertssbError(
                f"trigger pixel {self.pixel} does not fit an image of {h}x{w}"
                + (" with its four neighbours" if margin else "") + "; pick a position inside the image")
        if self.name == "badnets":
            if self.patch_size is None:
                self.patch_size = max(1, round(3 * h / 32))
            if not (_is_int(self.patch_size) and self.patch_size >= 1):
                raise CertssbError(
                    f"badnets patch_size must be a positive integer, got {self.patch_size!r}"
                )
            if self.patch_size > min(h, w):
                raise CertssbError(
                    f"badnets patch of {self.patch_size}x{self.patch_size} pixels does not fit an "
                    f"image of {h}x{w}; pass a patch_size of at most {min(h, w)}"
                )
        if self.name == "blended":
            a = self.blend_alpha
            if not (_is_real(a) and math.isfinite(a) and 0 < a <= 1):
                raise CertssbError(
                    f"blend_alpha must be in (0, 1] (the weight of the blended pattern), got {a!r}; "
                    "BackdoorBench uses 0.2"
                )
            self.blend_alpha = float(a)

        if self.name == "blending":
            g = torch.Generator().manual_seed(self.seed)
            noise = torch.randn((c, h, w), generator=g, dtype=torch.float64)
            # Scale in float64 so the float32 pattern's norm is delta to rounding.
            self.pattern = (noise * (self.delta / noise.norm())).to(torch.float32)
        elif self.name == "blended":
            g = torch.Generator().manual_seed(self.seed)
            self.pattern = torch.rand((c, h, w), generator=g, dtype=torch.float32)

    @property
    def nominal_l2(self) -> float | None:
        """The nominal L2 norm of the perturbation: ``delta`` for additive triggers, else None."""
        return self.delta if self.name in ADDITIVE_TRIGGERS else None

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            what = (
                f"a {x.dim()}-d {x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
            )
            raise CertssbError(
                f"trigger input must be a float tensor [N, C, H, W] in [0, 1], got {what}"
            )
        if tuple(x.shape[1:]) != self.image_shape:
            raise CertssbError(
                f"trigger was made for images of shape {self.image_shape}, got images of shape "
                f"{tuple(x.shape[1:])}; build the trigger with the dataset's image_shape"
            )
        if x.numel():
            lo, hi = torch.aminmax(x.detach())
            lo, hi = float(lo), float(hi)
            if not (0.0 <= lo and hi <= 1.0):  # also False for NaN
                raise CertssbError(
                    f"trigger input must be images in [0, 1] without NaN/Inf, got values in "
                    f"[{lo}, {hi}]; scale pixels to [0, 1] (uint8 / 255) and do not normalize"
                )

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Return the triggered copy of ``x`` (float ``[N, C, H, W]``); ``x`` is not modified.

        Same dtype and device as ``x``. See the module docstring for each trigger's formula.
        """
        self._check_input(x)
        c, h, w = self.image_shape
        ch, cw = self.pixel  # type: ignore[misc]
        out = x.clone()
        if self.name == "onepixel":
            d = self.delta / math.sqrt(c)
            out[:, :, ch, cw] = (out[:, :, ch, cw] + d).clamp(0.0, 1.0)
        elif self.name == "fourpixel":
            d = self.delta / math.sqrt(4 * c)
            for ph, pw in self._four_pixels():
                out[:, :, ph, pw] = (out[:, :, ph, pw] + d).clamp(0.0, 1.0)
        elif self.name == "blending":
            assert self.pattern is not None  # set in __post_init__
            out = out + self.pattern.to(device=x.device, dtype=x.dtype)
        elif self.name == "badnets":
            p = int(self.patch_size)  # type: ignore[arg-type]
            out[:, :, h - p :, w - p :] = 1.0
        else:  # blended
            assert self.pattern is not None
            a = self.blend_alpha
            out = (1.0 - a) * out + a * self.pattern.to(device=x.device, dtype=x.dtype)
        return out

    def _four_pixels(self) -> list[tuple[int, int]]:
        ch, cw = self.pixel  # type: ignore[misc]
        return [(ch - 1, cw), (ch + 1, cw), (ch, cw - 1), (ch, cw + 1)]

    def describe(self) -> dict:
        """JSON-ready summary: name, nominal L2 ``delta`` (None if unused), image shape, parameters."""
        c, h, w = self.image_shape
        params: dict
        if self.name == "onepixel":
            params = {"pixels": [list(self.pixel)], "per_value_change": self.delta / math.sqrt(c),
                      "clipped": True}
        elif self.name == "fourpixel":
            params = {"pixels": [list(p) for p in self._four_pixels()],
                      "per_value_change": self.delta / math.sqrt(4 * c), "clipped": True}
        elif self.name == "blending":
            params = {"pattern": "standard normal scaled to norm delta", "seed": self.seed,
                      "clipped": False}
        elif self.name == "badnets":
            params = {"patch_size": self.patch_size, "location": "bottom-right", "value": 1.0}
        else:
            params = {"blend_alpha": self.blend_alpha, "pattern": "uniform [0, 1]",
                      "seed": self.seed}
        return {"name": self.name, "delta": self.nominal_l2, "image_shape": list(self.image_shape),
                "parameters": params}


def make_trigger(
    name: str,
    delta: float,
    image_shape: tuple[int, int, int],
    *,
    seed: int = 0,
    patch_size: int | None = None,
    blend_alpha: float = 0.2,
    pixel: tuple[int, int] | None = None,
) -> Trigger:
    """Build and validate a trigger.

    Args:
        name: one of ``TRIGGERS``.
        delta: nominal L2 norm of the additive triggers (onepixel, fourpixel,
            blending): finite and > 0. Ignored by badnets and blended.
        image_shape: (C, H, W) of the images it will be applied to.
        seed: seed of the fixed pattern (blending, blended).
        patch_size: badnets patch side; default ``max(1, round(3 * H / 32))``
            (3 on 32-pixel images).
        blend_alpha: blended trigger weight a in (0, 1].
        pixel: (row, column) of the onepixel trigger / centre of the fourpixel
            trigger; default the image centre ``(H // 2, W // 2)``.

    Raises:
        CertssbError: unknown name, bad delta, patch larger than the image,
            blend_alpha outside (0, 1], image smaller than 3x3 for fourpixel.
    """
    return Trigger(name=name, delta=delta, image_shape=image_shape, seed=seed,
                   patch_size=patch_size, blend_alpha=blend_alpha, pixel=pixel)


def measured_l2(x_clean: torch.Tensor, x_triggered: torch.Tensor) -> dict:
    """Per-sample L2 norms ``||x_triggered[i] - x_clean[i]||_2`` (in float64): {"mean","min","max"}.

    Both tensors ``[N, ...]`` of the same shape, N >= 1. Returns Python floats.
    """
    if not isinstance(x_clean, torch.Tensor) or not isinstance(x_triggered, torch.Tensor):
        raise CertssbError("measured_l2 needs two tensors [N, C, H, W]")
    if x_clean.shape != x_triggered.shape:
        raise CertssbError(
            f"measured_l2 needs tensors of the same shape, got {tuple(x_clean.shape)} and "
            f"{tuple(x_triggered.shape)}"
        )
    if x_clean.dim() < 1 or x_clean.shape[0] == 0:
        raise CertssbError("measured_l2 needs at least one sample")
    diff = x_triggered.detach().to(torch.float64) - x_clean.detach().to(torch.float64)
    norms = diff.reshape(diff.shape[0], -1).norm(dim=1)
    return {"mean": float(norms.mean()), "min": float(norms.min()), "max": float(norms.max())}


@dataclass
class PoisonedTrainingSet:
    """A poisoned training set, same size and order as the clean one.

    x: float [N, C, H, W]; y: int64 [N] (poisoned samples relabelled);
    poison_idx: int64 [n], sorted indices of the poisoned samples;
    trigger_l2: {"nominal": delta or None, "mean", "min", "max"}: the measured
    ``||x'_i - x_i||_2`` over the poisoned samples.
    """

    x: torch.Tensor
    y: torch.Tensor
    poison_idx: torch.Tensor
    trigger_l2: dict


@dataclass
class TriggeredTestSet:
    """Triggered test inputs.

    x: float [n, C, H, W] triggered images; y_true: int64 [n] true labels
    (robust accuracy, as RAB); y_target: int64 [n] the attacker's labels
    (attack success rate); idx: int64 [n] indices into the clean test set.
    """

    x: torch.Tensor
    y_true: torch.Tensor
    y_target: torch.Tensor
    idx: torch.Tensor


def _check_mode(target: int | None, all_to_all: bool, num_classes: int) -> None:
    if not (_is_int(num_classes) and num_classes >= 2):
        raise CertssbError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if all_to_all and target is not None:
        raise CertssbError(
            f"all-to-all poisoning relabels y -> (y + 1) mod K and takes no target, got "
            f"target={target!r}; pass either a target class or all_to_all=True, not both"
        )
    if not all_to_all and target is None:
        raise CertssbError(
            "no attack target given; pass a target task label (all-to-one) or all_to_all=True"
        )
    if target is not None and not (_is_int(target) and 0 <= target < num_classes):
        raise CertssbError(
            f"target {target!r} is not a task label; use a label in 0..{num_classes - 1}"
        )


def _check_data(x: torch.Tensor, y: torch.Tensor, trigger: Trigger, num_classes: int,
                what: str) -> None:
    if not isinstance(trigger, Trigger):
        raise CertssbError(f"trigger must be a Trigger (see make_trigger), got {type(trigger).__name__}")
    trigger._check_input(x)
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.dtype != torch.int64:
        raise CertssbError(f"{what} labels must be an int64 tensor [N]")
    if y.shape[0] != x.shape[0]:
        raise CertssbError(
            f"{what} has {x.shape[0]} images but {y.shape[0]} labels; they must match"
        )
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise CertssbError(
            f"{what} labels must be task labels in 0..{num_classes - 1}, found "
            f"{int(y.min())}..{int(y.max())}; check num_classes"
        )


def poison_training_set(
    x: torch.Tensor,
    y: torch.Tensor,
    trigger: Trigger,
    *,
    rate: float,
    target: int | None,
    all_to_all: bool,
    num_classes: int,
    seed: int,
) -> PoisonedTrainingSet:
    """Poison ``n = round(rate * N)`` training samples.

    Candidates: the samples with ``y != target`` (all-to-one) or all samples
    (all-to-all). ``n`` of them are chosen without replacement by
    ``torch.randperm`` on a ``torch.Generator`` seeded by ``seed``; their images
    get the trigger and their labels become ``target`` (all-to-one) or
    ``(y + 1) % num_classes`` (all-to-all). ``x`` and ``y`` are not modified.

    Args:
        x: float [N, C, H, W] in [0, 1]; y: int64 [N] task labels.
        rate: poison rate in (0, 1).

    Raises:
        CertssbError: rate outside (0, 1), rate selecting no sample or more
            samples than there are candidates, target outside 0..K-1, both or
            neither of target / all_to_all, mismatched inputs.
    """
    _check_mode(target, all_to_all, num_classes)
    _check_data(x, y, trigger, num_classes, "training set")
    if not (_is_real(rate) and math.isfinite(rate) and 0 < rate < 1):
        raise CertssbError(f"poison rate must be in (0, 1), got {rate!r}; e.g. rate=0.01")
    if not _is_int(seed):
        raise CertssbError(f"poisoning seed must be an integer, got {seed!r}")
    total = int(x.shape[0])
    if total == 0:
        raise CertssbError("the training set is empty; nothing can be poisoned")
    n = round(rate * total)
    if n == 0:
        raise CertssbError(
            f"poison rate {rate} of {total} training samples selects no sample ({rate} x {total} = "
            f"{rate * total:.3g} rounds to 0); the smallest rate that works is just above 0.5/{total} "
            f"= {0.5 / total:.3g}: use e.g. a rate of {1 / total:.3g} (1/{total}: one sample)"
        )
    if all_to_all:
        candidates = torch.arange(total, dtype=torch.int64)
        kind = "training samples"
    else:
        candidates = torch.nonzero(y.cpu() != target).flatten()
        kind = f"non-target training samples (label != {target})"
    if n > candidates.numel():
        raise CertssbError(
            f"poison rate {rate} selects {n} samples but only {candidates.numel()} {kind} exist; "
            f"use a rate of at most {candidates.numel()}/{total}"
        )
    g = torch.Generator().manual_seed(seed)
    chosen = candidates[torch.randperm(candidates.numel(), generator=g)[:n]]
    poison_idx = torch.sort(chosen).values.to(torch.int64)

    dev_idx = poison_idx.to(x.device)
    x_out = x.clone()
    clean = x[dev_idx]
    triggered = trigger.apply(clean)
    x_out[dev_idx] = triggered
    y_out = y.clone()
    lbl_idx = poison_idx.to(y.device)
    if all_to_all:
        y_out[lbl_idx] = (y[lbl_idx] + 1) % num_classes
    else:
        y_out[lbl_idx] = int(target)  # type: ignore[arg-type]
    l2 = measured_l2(clean, triggered)
    return PoisonedTrainingSet(x=x_out, y=y_out, poison_idx=poison_idx,
                               trigger_l2={"nominal": trigger.nominal_l2, **l2})


def triggered_test_set(
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    trigger: Trigger,
    *,
    target: int | None,
    all_to_all: bool,
    num_classes: int,
) -> TriggeredTestSet:
    """Apply the trigger to the test inputs the attack targets.

    All-to-one: the samples with ``y != target``, ``y_target = target``.
    All-to-all: every sample, ``y_target = (y + 1) % num_classes``.
    ``y_true`` keeps the true labels. ``x_test``/``y_test`` are not modified.

    Raises:
        CertssbError: as `poison_training_set` for target/all_to_all/inputs, and
            when no test sample lies outside the target class.
    """
    _check_mode(target, all_to_all, num_classes)
    _check_data(x_test, y_test, trigger, num_classes, "test set")
    if all_to_all:
        idx = torch.arange(int(x_test.shape[0]), dtype=torch.int64)
    else:
        idx = torch.nonzero(y_test.cpu() != target).flatten().to(torch.int64)
    if idx.numel() == 0:
        raise CertssbError(
            "the test set has no sample to trigger (all-to-one uses only samples outside the "
            f"target class {target}); use a test set with other classes"
        )
    x_sel = x_test[idx.to(x_test.device)]
    y_true = y_test[idx.to(y_test.device)].clone()
    if all_to_all:
        y_target = (y_true + 1) % num_classes
    else:
        y_target = torch.full_like(y_true, int(target))  # type: ignore[arg-type]
    return TriggeredTestSet(x=trigger.apply(x_sel), y_true=y_true, y_target=y_target, idx=idx)
