"""gpu-checks.json (written by benchmarks/gpu_checks.sh on a GPU machine) back into the results pages.

`import_gpu_checks` keeps each full-scale cell of the file as a kept cell under
docs/results/cells/ (certssb.report.cells: the pages render kept cells beside live grid
cells, so the GPU cells appear in docs/results/<page>.md as the experiment's full-scale
section) and writes the CUDA section of docs/results/training.md from the
bench_training record inside the file, with the run's steps and their wall times.
`certssb pages --gpu-checks FILE` calls it, then writes the pages.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..core.files import atomic_write_text, read_json
from ..errors import CertssbError
from .cells import keep_cells
from .training_page import markdown, update_page


def _cell_record(c: dict) -> dict:
    """A kept cell (cell.json fields + summaries) from one entry of gpu-checks.json's "cells"."""
    summaries = c.get("summaries") or ({"hoeffding": c["summary"]} if c.get("summary") else {})
    if not summaries:
        raise CertssbError(f"gpu-checks cell {c.get('cell')!r} has no summary")
    rec = dict(c.get("record") or {})
    first = next(iter(summaries.values()))
    rec.setdefault("format", 1)
    rec.setdefault("status", "done")
    rec.setdefault("experiment", c["experiment"])
    rec.setdefault("scale", c["scale"])
    rec.setdefault("reduced", c["scale"] != "full")
    rec.setdefault("cell", c["cell"])
    rec.setdefault("point", {})
    rec.setdefault("config", first.get("config", {}))
    rec.setdefault("bounds", list(summaries))
    rec.setdefault("seconds", {"train": c.get("seconds", 0)})
    rec.setdefault("hardware", {})
    rec["summaries"] = summaries
    return rec


def steps_note(data: dict) -> str:
    steps = ", ".join(f"{s['name']} {s['seconds']:.0f} s" + ("" if s.get("ok") in (True, None) else " (FAILED)")
                      + (" (skipped)" if s.get("ok") is None else "") for s in data.get("steps", []))
    cells = "; ".join(f"{c['experiment']}/{c['scale']}/{c['cell']}: M = {c.get('models')}, {c.get('epochs')} "
                      f"epochs, {c.get('seconds', 0):.0f} s (training, sigma search, every bound's certification)"
                      for c in data.get("cells", []))
    return (f"Measured on {data.get('date')} by `bash benchmarks/gpu_checks.sh` ({data.get('device')}, torch "
            f"{data.get('torch')}); record docs/results/gpu-checks.json. Steps: {steps}."
            + (f" Full-scale cells: {cells}." if cells else ""))


def import_gpu_checks(path: str | os.PathLike, docs: str | os.PathLike, *, allow_dry_run: bool = False) -> list[Path]:
    """Keep the cells of a gpu-checks.json under <docs>/cells and write the CUDA section of
    <docs>/training.md; returns the files written. A dry run's file (CPU stand-ins) is refused
    unless allow_dry_run."""
    data = read_json(Path(path))
    if not isinstance(data, dict) or "steps" not in data or "cells" not in data:
        raise CertssbError(f"{path} is not a gpu-checks.json (no 'steps' and 'cells'); pass the file "
                           "benchmarks/gpu_checks.sh wrote")
    if data.get("dry_run") and not allow_dry_run:
        raise CertssbError(f"{path} comes from a --dry-run (CPU stand-ins, not results); run "
                           "benchmarks/gpu_checks.sh on a GPU")
    docs = Path(docs)
    written = keep_cells([_cell_record(c) for c in data["cells"]], docs)
    bench = (data.get("benchmarks") or {}).get("training")
    if bench:
        bench = {**bench, "note": steps_note(data)}
        md = docs / "training.md"
        atomic_write_text(md, update_page(md.read_text() if md.exists() else "", bench["device_type"],
                                          markdown(bench)))
        written.append(md)
    return written


__all__ = ["import_gpu_checks", "steps_note"]
