"""Metrics of certificates: certified accuracy curves, per-split metrics, streaming totals.

Definitions (docs/THEORY.md section 9):
- certified accuracy at radius r: share of inputs not abstained, correctly
  classified, with radius > r (at r = 0: not abstained and correct);
- clean accuracy: share of clean inputs not abstained and correct;
- robust accuracy (triggered inputs, true labels, as RAB) and attack success
  rate (triggered inputs predicted as the attacker's label, not abstained).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..certify.region_file import UPDATE_KINDS


def radius_key(r: float) -> str:
    return f"{float(r):g}" if float(r) != int(r) else f"{float(r):.1f}"


def certified_accuracy(correct: torch.Tensor, abstain: torch.Tensor, radius: torch.Tensor,
                       radii: Sequence[float]) -> dict[str, float]:
    """{"0.0": x, "0.25": x, ...}: the certified accuracy curve (never increases with r)."""
    ok = correct.bool() & ~abstain.bool()
    n = max(int(ok.numel()), 1)
    out = {}
    for r in radii:
        hit = ok if r == 0 else ok & (radius > r)
        out[radius_key(r)] = int(hit.sum()) / n
    return out


def split_metrics(rows: Mapping[str, torch.Tensor], radii: Sequence[float], *, triggered: bool,
                  use_update: bool, conservative: bool) -> dict:
    """Metrics of one split from its certificate columns.

    use_update: read the columns after the storage update (predict, radius)
    or before it (predict_raw, radius_raw).
    """
    predict = rows["predict"] if use_update else rows["predict_raw"]
    radius = rows["radius"] if use_update else rows["radius_raw"]
    label = rows["label"]
    abstain = rows["abstain"].bool()
    n = max(int(label.numel()), 1)
    correct = predict == label
    out = {}
    if triggered:
        out["robust_accuracy"] = int((correct & ~abstain).sum()) / n
        out["attack_success_rate"] = int(((predict == rows["target"]) & ~abstain).sum()) / n
    else:
        out["accuracy"] = int((correct & ~abstain).sum()) / n
    out["abstain_rate"] = int(abstain.sum()) / n
    out["certified_accuracy"] = certified_accuracy(correct, abstain, radius, radii)
    if conservative:
        # The conservative radius certifies the prediction before the storage update. The update
        # cannot be applied to it: an `align` replaces label and radius by an earlier input's
        # ball, and that ball's conservative radius is not kept (docs/THEORY.md section 6). So
        # the conservative curve is always the one without the update, in both variants.
        correct_raw = rows["predict_raw"] == label
        out["certified_accuracy_conservative"] = certified_accuracy(correct_raw, abstain,
                                                                   rows["radius_conservative"], radii)
    out["mean_radius"] = float(torch.where(correct & ~abstain, radius, torch.zeros_like(radius)).sum()) / n
    return out


def update_variants(rows: Mapping[str, torch.Tensor], radii: Sequence[float], *, triggered: bool,
                    applied: bool, conservative: bool) -> tuple[dict, dict, dict]:
    """(with the storage update, without it, the headline) metrics of one split: the headline is
    the first when the update is applied to this method, else the second."""
    kw = dict(triggered=triggered, conservative=conservative)
    with_update = split_metrics(rows, radii, use_update=True, **kw)
    no_update = split_metrics(rows, radii, use_update=False, **kw)
    return with_update, no_update, (with_update if applied else no_update)


@dataclass
class StreamTally:
    """Running totals of a streamed job's summary, added chunk by chunk (`add` takes a chunk's
    certificate columns; `region_update` holds codes into UPDATE_KINDS, -1 without the update)."""

    radii: Sequence[float]
    n: int = 0
    abstained: int = 0
    correct: int = 0
    correct_raw: int = 0
    radius_sum: float = 0.0
    sigma_min: float = math.inf
    sigma_max: float = -math.inf
    sigma_sum: float = 0.0
    labelled: bool = False

    def __post_init__(self) -> None:
        self.kinds = {k: 0 for k in UPDATE_KINDS}
        self.cert = {radius_key(r): 0 for r in self.radii}
        self.cert_raw = {radius_key(r): 0 for r in self.radii}
        self.predicted: dict[int, int] = {}

    def add(self, t: dict[str, torch.Tensor]) -> None:
        n = int(t["idx"].numel())
        ab = t["abstain"]
        self.n += n
        self.abstained += int(ab.sum())
        self.radius_sum += float(t["radius"].sum())
        s = t["sigma"]
        if n:
            self.sigma_min = min(self.sigma_min, float(s.min()))
            self.sigma_max = max(self.sigma_max, float(s.max()))
            self.sigma_sum += float(s.sum())
        for code, c in zip(*torch.unique(t["region_update"], return_counts=True)):
            if int(code) >= 0:
                self.kinds[UPDATE_KINDS[int(code)]] += int(c)
        for cls, c in zip(*torch.unique(t["predict"][~ab], return_counts=True)):
            self.predicted[int(cls)] = self.predicted.get(int(cls), 0) + int(c)
        if "label" in t:
            self.labelled = True
            for suffix, pred, rad, acc in (("", t["predict"], t["radius"], self.cert),
                                           ("_raw", t["predict_raw"], t["radius_raw"], self.cert_raw)):
                ok = (pred == t["label"]) & ~ab
                if suffix:
                    self.correct_raw += int(ok.sum())
                else:
                    self.correct += int(ok.sum())
                for r in self.radii:
                    acc[radius_key(r)] += int((ok if r == 0 else ok & (rad > r)).sum())

    def summary(self) -> dict:
        n = max(self.n, 1)
        out = {"inputs": self.n, "abstain_rate": self.abstained / n, "mean_radius": self.radius_sum / n,
               "sigma": {"min": self.sigma_min if self.n else None, "mean": self.sigma_sum / n if self.n else None,
                         "max": self.sigma_max if self.n else None},
               "predicted": {str(k): v for k, v in sorted(self.predicted.items())},
               "region_update": dict(self.kinds)}
        if self.labelled:
            out["accuracy"] = self.correct / n
            out["certified_accuracy"] = {k: v / n for k, v in self.cert.items()}
            out["no_update"] = {"accuracy": self.correct_raw / n,
                                "certified_accuracy": {k: v / n for k, v in self.cert_raw.items()}}
        return out
