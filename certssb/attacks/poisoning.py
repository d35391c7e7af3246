"""Training-set poisoning and triggered test sets.

Poisoning picks ``round(rate * N)`` samples (non-target ones for all-to-one),
applies the trigger and relabels them; every poisoned set reports the trigger's
measured L2 norm beside the nominal one. Labels here are task labels 0..K-1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import CertssbError
from .base import Trigger
from .registry import additive_trigger_names, is_int, is_real


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
    norms = row_l2(x_clean, x_triggered)
    return {"mean": float(norms.mean()), "min": float(norms.min()), "max": float(norms.max())}


def row_l2(x_clean: torch.Tensor, x_triggered: torch.Tensor) -> torch.Tensor:
    """float64 [N]: ``||x_triggered[i] - x_clean[i]||_2`` of each sample (same shapes [N, ...])."""
    diff = x_triggered.detach().to(torch.float64) - x_clean.detach().to(torch.float64)
    return diff.reshape(diff.shape[0], -1).norm(dim=1)


def training_trigger_norm(trigger: str, delta: float, measured_max: Optional[float]) -> float:
    """The norm bounding every poisoned training image's trigger, for the poison budget: the
    nominal delta of an additive trigger (clipping only shrinks it), else the largest norm
    measured on the poisoned training images (the nominal delta when none was measured)."""
    if trigger in additive_trigger_names() or measured_max is None:
        return float(delta)
    return float(measured_max)


def input_trigger_norms(trigger: Trigger, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The L2 norm of the trigger each test input would carry, float64 [N], for the poison budget;
    None for an additive trigger (its nominal norm bounds every measured one: clipping only
    shrinks it). A patch or a blend changes each image by a different amount, so a test image
    can carry a larger trigger than any poisoned training image (docs/THEORY.md section 9)."""
    if trigger.name in additive_trigger_names():
        return None
    return row_l2(x, trigger.apply(x))


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
    if not (is_int(num_classes) and num_classes >= 2):
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
    if target is not None and not (is_int(target) and 0 <= target < num_classes):
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
    if not (is_real(rate) and math.isfinite(rate) and 0 < rate < 1):
        raise CertssbError(f"poison rate must be in (0, 1), got {rate!r}; e.g. rate=0.01")
    if not is_int(seed):
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


__all__ = ["measured_l2", "PoisonedTrainingSet", "TriggeredTestSet", "poison_training_set",
           "triggered_test_set"]
