"""Finished grid cells: found in run directories, and kept in the repository so pages rebuild without them.

A cell is a folder `<runs>/<experiment>/<scale>/<cell>/` with `cell.json` and one
`<bound>/summary.json` per bound, written by `certssb grid`. `keep_cells` copies what
the pages read (the cell's record and each bound's summary, machine paths dropped) to
`docs/results/cells/`, and `gather_cells` reads both, the run directories winning.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from ..core.files import atomic_write_json, read_json
from ..errors import CertssbError


def find_cells(runs: str | os.PathLike) -> list[dict[str, Any]]:
    """Every finished cell under a grid root, with its per-bound summaries loaded."""
    runs = Path(runs)
    if not runs.is_dir():
        raise CertssbError(f"{runs} is not a directory; pass the --out of `certssb grid` (default runs/grid)")
    cells = []
    for path in sorted(runs.glob("*/*/*/cell.json")):
        rec = read_json(path)
        if rec.get("status") != "done":
            continue
        rec["dir"] = path.parent
        rec["summaries"] = {}
        for bound in rec["bounds"]:
            s = path.parent / bound / "summary.json"
            if s.exists():
                rec["summaries"][bound] = read_json(s)
        cells.append(rec)
    return cells


KEPT_DIR = "cells"
_MACHINE_KEYS = ("out", "data_dir")  # paths of the machine that ran the cell: not kept


def _kept_config(cfg: dict) -> dict:
    return {k: v for k, v in (cfg or {}).items() if k not in _MACHINE_KEYS}


def keep_cells(cells: Sequence[dict], docs: str | os.PathLike) -> list[Path]:
    """Keep what the pages need of each finished cell under <docs>/cells/<experiment>/<scale>/<cell>/:
    its cell.json and one <bound>.json per bound (that bound's summary.json), JSON only, without
    machine paths or the host name. `certssb pages` renders from these when the grid's run
    directories are absent, so the pages can be rebuilt from the repository alone."""
    from ..certify.bounds import BOUNDS

    written = []
    for c in cells:
        d = Path(docs) / KEPT_DIR / c["experiment"] / c["scale"] / c["cell"]
        rec = {k: v for k, v in c.items() if k not in ("dir", "summaries")}
        rec["config"] = _kept_config(rec.get("config"))
        rec["overrides"] = _kept_config(rec.get("overrides"))
        rec["hardware"] = {k: v for k, v in (rec.get("hardware") or {}).items() if k != "host"}
        for bound, s in c["summaries"].items():
            if bound not in BOUNDS:
                continue
            path = d / f"{bound}.json"
            atomic_write_json(path, {**s, "config": _kept_config(s.get("config"))})
            written.append(path)
        atomic_write_json(d / "cell.json", rec)  # last: a cell.json says its summaries are complete
        written.append(d / "cell.json")
    return written


def find_kept_cells(docs: str | os.PathLike) -> list[dict]:
    """The cells kept by `keep_cells` under <docs>/cells, loaded like `find_cells` loads a grid's."""
    root = Path(docs) / KEPT_DIR
    cells = []
    for path in sorted(root.glob("*/*/*/cell.json")) if root.is_dir() else []:
        rec = read_json(path)
        if rec.get("status") != "done":
            continue
        rec["dir"] = path.parent
        rec["summaries"] = {b: read_json(path.parent / f"{b}.json") for b in rec.get("bounds", [])
                            if (path.parent / f"{b}.json").exists()}
        cells.append(rec)
    return cells


def gather_cells(runs: str | os.PathLike, docs: str | os.PathLike) -> list[dict]:
    """The cells the pages show: every cell kept under <docs>/cells, replaced or joined by the finished
    cells of the grid root `runs` where it exists (those are kept first). Without run directories
    the pages are rendered from the kept copy alone."""
    live = find_cells(runs) if Path(runs).is_dir() else []
    if live:
        keep_cells(live, docs)
    merged = {(c["experiment"], c["scale"], c["cell"]): c for c in find_kept_cells(docs)}
    merged.update({(c["experiment"], c["scale"], c["cell"]): c for c in live})
    cells = [merged[k] for k in sorted(merged)]
    if not cells:
        if not Path(runs).is_dir():
            raise CertssbError(f"{runs} is not a directory and {Path(docs) / KEPT_DIR} holds no kept cells; pass "
                               f"the --out of `certssb grid` (default runs/grid)")
        raise CertssbError(f"no finished grid cells under {runs}; run `certssb grid ...` first")
    return cells


def pct(x: Optional[float], digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}"


def curve(summary: dict, method: str, split: str, variant: Optional[str] = None,
           key: str = "certified_accuracy") -> dict[str, float]:
    m = summary.get("methods", {}).get(method)
    if not m:
        return {}
    src = m if variant is None else m.get("variants", {}).get(variant, {})
    return src.get(split, {}).get(key, {}) or {}


def experiment_file(name: str):
    """The experiment file experiments/<name>.json (relative to the working directory, as the CLI
    finds it), or None when it is not there."""
    from ..experiments.grid import Experiment  # here: experiments/ sits above report/ (ARCHITECTURE.md 2)

    f = Path("experiments") / f"{name}.json"
    return Experiment.load(f) if f.exists() else None


def page_of(cell: dict, summary: Optional[dict]) -> str:
    exp = experiment_file(cell["experiment"])
    return exp.page if exp else cell["config"].get("dataset", "other")
