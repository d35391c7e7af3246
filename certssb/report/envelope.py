"""A fair comparison of Cert-SSB with RAB: RAB's envelope over the sigma0 grid.

In `paper` mode Cert-SSB's per-sample sigma sits at its upper clamp (2 sigma0) for most
inputs, so Cert-SSB at sigma0 against RAB at the same sigma0 mixes two effects: more noise
and per-sample noise. RAB can have more noise too, by a larger sigma0. The fair baseline is
RAB's *envelope*: at each radius, the best RAB certified accuracy over every sigma0 the grid
trained for the same task (experiment, scale, bound and every other axis value), and, as a
second reference, RAB at the sigma0 nearest Cert-SSB's median test sigma.

This module only reads finished cells (dicts as `certssb.report.cells.find_cells` returns them:
"experiment", "scale", "cell", "point", "config", "summaries" per bound); the pages render
what it computes.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Optional

# axes that do not define the task: the envelope is taken over sigma0, and a method axis
# (RAB-only extra cells beside a Cert-SSB cell) does not split a task either
ENVELOPE_FREE_AXES = ("sigma0", "method")
TOL = 1e-12


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def task_key(cell: dict) -> tuple:
    """(experiment, scale, the axis values other than sigma0 and method): the cells one envelope spans."""
    point = cell.get("point") or {}
    rest = tuple(sorted((k, _fmt(v)) for k, v in point.items() if k not in ENVELOPE_FREE_AXES))
    return cell["experiment"], cell["scale"], rest


def cell_sigma0(cell: dict, summary: Optional[dict] = None) -> float:
    cfg = (summary or {}).get("config") or {}
    if cfg.get("sigma0") is not None:
        return float(cfg["sigma0"])
    return float((cell.get("config") or {}).get("sigma0", (cell.get("point") or {}).get("sigma0")))


def curve(summary: dict, method: str, split: str = "clean", variant: Optional[str] = None,
          key: str = "certified_accuracy") -> dict[str, float]:
    m = (summary or {}).get("methods", {}).get(method)
    if not m:
        return {}
    src = m if variant is None else m.get("variants", {}).get(variant, {})
    return dict(src.get(split, {}).get(key, {}) or {})


def rab_curves(cells: Iterable[dict], bound: str, split: str = "clean") -> dict[float, dict[str, float]]:
    """{sigma0: RAB's certified-accuracy curve} over the given cells (one task), for one bound."""
    out: dict[float, dict[str, float]] = {}
    for c in cells:
        s = c["summaries"].get(bound)
        cur = curve(s, "rab", split) if s else {}
        if cur:
            out[cell_sigma0(c, s)] = cur
    return dict(sorted(out.items()))


def envelope(curves: dict[float, dict[str, float]]) -> dict[str, tuple[float, float]]:
    """{radius: (best value, the sigma0 that gives it)}; ties go to the smallest sigma0.

    A radius missing from some sigma0's curve is taken over the curves that have it."""
    radii = sorted({r for cur in curves.values() for r in cur}, key=float)
    out = {}
    for r in radii:
        best = None
        for s0, cur in sorted(curves.items()):
            if r in cur and (best is None or cur[r] > best[0] + TOL):
                best = (cur[r], s0)
        out[r] = best
    return out


def nearest_sigma0(sigmas: Iterable[float], target: float) -> Optional[float]:
    """The grid's sigma0 nearest `target` (ties to the smaller one), None for an empty grid."""
    sigmas = sorted(sigmas)
    return min(sigmas, key=lambda s: (abs(s - target), s)) if sigmas else None


@dataclass
class Verdict:
    """Where a curve beats, ties or loses to another, per radius, with the gap in test inputs."""

    beats: list[tuple[str, int]] = field(default_factory=list)
    ties: list[str] = field(default_factory=list)
    loses: list[tuple[str, int]] = field(default_factory=list)
    both_zero_from: Optional[str] = None  # from this radius on, neither certifies any input

    def text(self, n: Optional[int]) -> str:
        def gaps(items, sign):
            return ", ".join(f"{r} ({sign}{g})" for r, g in items)
        parts = []
        if self.beats:
            parts.append(f"beats it at r = {gaps(self.beats, '+')}")
        if self.ties:
            parts.append(f"ties at r = {', '.join(self.ties)}")
        if self.loses:
            parts.append(f"loses at r = {gaps(self.loses, '-')}")
        if self.both_zero_from is not None:
            parts.append(f"neither certifies any input from r = {self.both_zero_from}")
        unit = f"test inputs of {n}" if n else "percentage points"
        return "; ".join(parts) + f" (gaps in {unit})" if parts else "no common radius"


def verdict(ours: dict[str, float], theirs: dict[str, float], n: Optional[int]) -> Verdict:
    """Compare two certified-accuracy curves radius by radius.

    With n (the number of test inputs), the gap is counted in inputs (round((a - b) n)) and
    equal counts are a tie; without n, in percentage points rounded to 0.1. Radii at which both
    are 0 (and every larger one, where the curves cannot rise) are summarised as one radius."""
    v = Verdict()
    radii = sorted(set(ours) & set(theirs), key=float)
    for i, r in enumerate(radii):
        a, b = ours[r], theirs[r]
        if all(ours[q] <= TOL and theirs[q] <= TOL for q in radii[i:]):
            v.both_zero_from = r
            break
        gap = round((a - b) * n) if n else round(100 * (a - b), 1)
        if gap > 0:
            v.beats.append((r, gap))
        elif gap < 0:
            v.loses.append((r, -gap))
        else:
            v.ties.append(r)
    return v


@dataclass
class FairRow:
    """One Cert-SSB cell against RAB at its sigma0, RAB's envelope and RAB at its median sigma."""

    cell: dict
    bound: str
    sigma0: float
    median_sigma: Optional[float]
    grid: list[float]                    # the sigma0 values RAB was trained at for this task
    rab_same: dict[str, float]           # RAB at the cell's own sigma0 ({} if not trained)
    nearest: Optional[float]             # the grid's sigma0 nearest the median sigma
    rab_nearest: dict[str, float]
    env: dict[str, tuple[float, float]]
    ssb: dict[str, float]                # Cert-SSB, paper radius, storage update (the headline)
    ssb_cons: dict[str, float]           # Cert-SSB, conservative radius
    n: Optional[int]

    @property
    def env_curve(self) -> dict[str, float]:
        return {r: v for r, (v, _) in self.env.items()}

    def verdict(self, conservative: bool = False) -> Verdict:
        return verdict(self.ssb_cons if conservative else self.ssb, self.env_curve, self.n)


def fair_rows(cells: Iterable[dict], bound: str, split: str = "clean") -> list[FairRow]:
    """One FairRow per cell that certified Cert-SSB with `bound`, its envelope taken over the
    RAB curves of every cell of the same task (task_key)."""
    cells = list(cells)
    tasks: dict[tuple, list[dict]] = defaultdict(list)
    for c in cells:
        tasks[task_key(c)].append(c)
    rows = []
    for c in cells:
        s = c["summaries"].get(bound)
        ssb = curve(s, "cert-ssb", split, "storage_update") if s else {}
        if not ssb:
            continue
        curves = rab_curves(tasks[task_key(c)], bound, split)
        s0 = cell_sigma0(c, s)
        sig = (s["methods"]["cert-ssb"].get("sigma") or {}).get(split)
        med = float(sig["median"]) if sig and sig.get("median") is not None else None
        near = nearest_sigma0(curves, med) if med is not None else None
        d = s.get("dataset") or {}
        n = d.get("n_test") if split == "clean" else d.get("n_triggered")
        rows.append(FairRow(cell=c, bound=bound, sigma0=s0, median_sigma=med, grid=list(curves),
                            rab_same=curves.get(s0, {}), nearest=near,
                            rab_nearest=curves.get(near, {}) if near is not None else {},
                            env=envelope(curves), ssb=ssb,
                            ssb_cons=curve(s, "cert-ssb", split, "storage_update",
                                           "certified_accuracy_conservative"),
                            n=int(n) if n else None))
    return rows
