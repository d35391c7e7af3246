"""Experiment grids: the paper's layout of runs, from one experiment file to many run directories.

An experiment file (JSON, see experiments/*.json) names a base configuration,
the axes to sweep (any RunConfig field: trigger, sigma0, ...), the bounds to
certify with, and named scales (``full`` = the paper's M and schedules; ``cpu``
and ``smoke`` = fewer models and epochs, labelled as reduced everywhere their
numbers appear). `run_grid` trains each cell once (both methods, the same
data, seeds and M) and certifies it once per bound into ``<cell>/<bound>/``.

Cells are resumable at every level: a finished cell (``cell.json`` with the
same configuration) is skipped, a half-trained one resumes from its model
checkpoints, and a changed configuration retrains rather than reusing stale
work (the pipeline's fingerprints).

Layout: ``<out>/<experiment>/<scale>/<cell>/`` with ``cell.json`` (config,
bounds, wall times, hardware), the training run directory's files, and one
results folder per bound (summary.json, certificates, table, plot).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from ..certify.bounds import BOUNDS
from ..runner.config import RunConfig
from ..errors import CertssbError
from ..core.files import atomic_write_json, read_json

CELL_FORMAT = 1
EXPERIMENT_KEYS = {"name", "title", "page", "description", "base", "axes", "bounds", "scales", "published",
                   "extra_cells"}
SCALE_ONLY_KEYS = {"axes", "note", "extra_cells"}
CONFIG_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}
# The grid owns these: each cell trains into its own directory and is certified once per
# bound. (`method` defaults to both; an experiment may pin one, e.g. to match a publication.)
GRID_OWNED = {"out", "bound"}


@dataclass
class Experiment:
    """One experiment file: a base config, the axes swept over it, bounds and scales."""

    name: str
    title: str
    page: str  # results page (docs/results/<page>.md) that shows it, usually the dataset
    base: dict[str, Any]
    axes: dict[str, list]
    bounds: list[str]
    scales: dict[str, dict[str, Any]]
    description: str = ""
    published: Optional[dict] = None  # figures from the original work to compare against
    path: Optional[str] = None
    # cells beside the product of the axes, each a dict of settings that is also its point, e.g.
    # {"method": "rab", "sigma0": 0.5}: RAB at the other sigma0 of the grid, for RAB's envelope
    # (certssb.report.envelope), where the axes train one sigma0 only. A scale may replace the list.
    extra_cells: list = dataclasses.field(default_factory=list)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Experiment":
        path = Path(path)
        if not path.is_file():
            raise CertssbError(f"experiment file {path} not found; pass one of experiments/*.json "
                               f"or a file of the same shape")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CertssbError(f"experiment file {path} is not valid JSON ({e}); fix or regenerate it") from None
        return cls.from_dict(raw, str(path))

    @classmethod
    def from_dict(cls, raw: Any, where: str = "experiment") -> "Experiment":
        if not isinstance(raw, dict):
            raise CertssbError(f"{where}: expected a JSON object at the top level")
        unknown = sorted(set(raw) - EXPERIMENT_KEYS)
        if unknown:
            raise CertssbError(f"{where}: unknown keys {unknown}; valid keys: {sorted(EXPERIMENT_KEYS)}")
        for key in ("name", "base", "scales"):
            if key not in raw:
                raise CertssbError(f"{where}: missing key {key!r}")
        name = raw["name"]
        if not isinstance(name, str) or not name or any(c in name for c in "/\\ ") or name.startswith("."):
            raise CertssbError(f"{where}: name must be a non-empty folder name without '/', '\\' or "
                               f"spaces, got {name!r}")
        exp = cls(name=name, title=raw.get("title", name), page=raw.get("page", raw["base"].get("dataset", name)),
                  base=dict(raw["base"]), axes={k: list(v) for k, v in raw.get("axes", {}).items()},
                  bounds=list(raw.get("bounds", ["hoeffding"])), scales=dict(raw["scales"]),
                  description=raw.get("description", ""), published=raw.get("published"), path=where,
                  extra_cells=list(raw.get("extra_cells", [])))
        exp.validate()
        return exp

    def validate(self) -> None:
        where = self.path or self.name

        def check_fields(d: dict, what: str, extra: set = frozenset()) -> None:
            bad = sorted(set(d) - CONFIG_FIELDS - set(extra))
            if bad:
                raise CertssbError(f"{where}: {what} has unknown settings {bad}; use RunConfig fields "
                                   f"(the names of `certssb run` options with '_' for '-')")
            owned = sorted(set(d) & GRID_OWNED)
            if owned:
                raise CertssbError(f"{where}: {what} sets {owned}, which the grid owns (each cell trains into "
                                   f"its own folder; list bounds under \"bounds\")")

        check_fields(self.base, "base")
        for axis, values in self.axes.items():
            check_fields({axis: None}, "axes")
            if not values:
                raise CertssbError(f"{where}: axis {axis!r} has no values")
        for b in self.bounds:
            if b not in BOUNDS:
                raise CertssbError(f"{where}: unknown bound {b!r}; choose from {', '.join(BOUNDS)}")
        if not self.bounds:
            raise CertssbError(f"{where}: \"bounds\" is empty; list at least one of {', '.join(BOUNDS)}")
        if not self.scales:
            raise CertssbError(f"{where}: \"scales\" is empty; define at least \"full\"")
        for what, extras in [("extra_cells", self.extra_cells)] + [
                (f"scale {s!r} extra_cells", o.get("extra_cells", [])) for s, o in self.scales.items()
                if isinstance(o, dict)]:
            if not isinstance(extras, list) or not all(isinstance(e, dict) and e for e in extras):
                raise CertssbError(f"{where}: {what} must be a list of non-empty objects of settings")
            for e in extras:
                check_fields(e, what)
        for scale, over in self.scales.items():
            if not isinstance(over, dict):
                raise CertssbError(f"{where}: scale {scale!r} must be an object of settings")
            check_fields(over, f"scale {scale!r}", SCALE_ONLY_KEYS)
            for axis in over.get("axes", {}):
                if axis not in self.axes:
                    raise CertssbError(f"{where}: scale {scale!r} restricts axis {axis!r}, which the "
                                       f"experiment does not sweep")
        for scale in self.scales:  # every cell of every scale must be a valid run
            for cell in self.cells(scale):
                RunConfig.from_dict(cell.config).resolve()

    def scale(self, name: str) -> dict[str, Any]:
        if name not in self.scales:
            raise CertssbError(f"experiment {self.name} has no scale {name!r}; choose from "
                               f"{', '.join(self.scales)}")
        return self.scales[name]

    def cells(self, scale: str, only: Optional[dict[str, list[str]]] = None) -> list["Cell"]:
        """The cells of one scale: the product of the axes (restricted by the scale and by `only`)."""
        over = self.scale(scale)
        axes = {k: list(over.get("axes", {}).get(k, v)) for k, v in self.axes.items()}
        settings = {k: v for k, v in over.items() if k not in SCALE_ONLY_KEYS}
        cells = []
        names = list(axes)
        points = [dict(zip(names, values)) for values in itertools.product(*(axes[k] for k in names))]
        points += [dict(e) for e in over.get("extra_cells", self.extra_cells)]
        seen = set()
        for point in points:
            if only and any(k in point and _fmt(point[k]) not in want for k, want in only.items()):
                continue
            name = cell_name(point)
            if name in seen:
                continue
            seen.add(name)
            cfg = {"method": "both", **self.base, **settings, **point}
            cells.append(Cell(self, scale, name, point, cfg))
        return cells


@dataclass
class Cell:
    """One point of the grid: a training run (both methods), certified once per bound."""

    experiment: Experiment
    scale: str
    name: str
    point: dict[str, Any]
    config: dict[str, Any]

    def dir(self, root: str | os.PathLike) -> Path:
        return Path(root) / self.experiment.name / self.scale / self.name

    @property
    def reduced(self) -> bool:
        return self.scale != "full"


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def cell_name(point: dict[str, Any]) -> str:
    """Folder name of a cell: its axis values, e.g. 'trigger-onepixel_sigma0-0.25'."""
    if not point:
        return "default"
    return "_".join(f"{k}-{_fmt(v)}" for k, v in point.items())


def _normalise(v: str) -> str:
    """A command-line axis value printed the way cell names print it (0.50 -> 0.5)."""
    try:
        return _fmt(float(v))
    except ValueError:
        return v


def parse_only(items: Sequence[str]) -> dict[str, list[str]]:
    """--only trigger=onepixel,blending --only sigma0=0.25 -> {"trigger": [...], "sigma0": [...]}."""
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise CertssbError(f"--only expects AXIS=VALUE[,VALUE...], got {item!r}")
        vals = [_normalise(v) for v in values.split(",")]
        out.setdefault(key, []).extend(vals)
    return out


def hardware() -> dict[str, Any]:
    """What the run ran on, for the results pages."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "host": platform.node()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cell_done(cell: Cell, d: Path) -> bool:
    path = d / "cell.json"
    if not path.exists():
        return False
    try:
        saved = read_json(path)
    except CertssbError:
        return False  # unreadable: redo (finished work inside is still reused)
    return (saved.get("format") == CELL_FORMAT and saved.get("config") == cell.config
            and saved.get("status") == "done"
            and all((d / b / "summary.json").exists() for b in cell.experiment.bounds))


def run_cell(cell: Cell, root: str | os.PathLike, *, overrides: Optional[dict[str, Any]] = None,
             progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Train one cell (resuming what exists) and certify it with each bound; returns cell.json."""
    from ..runner import pipeline

    d = cell.dir(root)
    cfg = {**cell.config, **(overrides or {}), "out": str(d)}
    t0 = time.perf_counter()
    train = pipeline.run(RunConfig.from_dict(cfg), certify=False, progress=progress, log=log)
    seconds = {"train": round(time.perf_counter() - t0, 3)}
    results = {}
    for bound in cell.experiment.bounds:
        t1 = time.perf_counter()
        summary = pipeline.run(RunConfig.from_dict({**cfg, "bound": bound}), train=False, progress=progress,
                               log=log, results_dir=d / bound)
        seconds[f"certify_{bound}"] = round(time.perf_counter() - t1, 3)
        results[bound] = {m: {"clean_accuracy": s["clean"]["accuracy"],
                              "attack_success_rate": s["triggered"]["attack_success_rate"]}
                          for m, s in summary["methods"].items()}
    record = {"format": CELL_FORMAT, "status": "done", "experiment": cell.experiment.name,
              "scale": cell.scale, "reduced": cell.reduced, "cell": cell.name, "point": cell.point,
              "config": cell.config, "overrides": overrides or {}, "bounds": cell.experiment.bounds,
              "seconds": seconds, "train_methods": list(train["methods"]), "hardware": hardware(),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "results": results}
    atomic_write_json(d / "cell.json", record)
    return record


def run_grid(experiments: Iterable[Experiment], scale: str, root: str | os.PathLike, *,
             only: Optional[dict[str, list[str]]] = None, overrides: Optional[dict[str, Any]] = None,
             dry_run: bool = False, progress: bool = True, log: Callable[[str], None] = print) -> list[dict]:
    """Run every cell of `experiments` at `scale` under `root`, skipping finished ones.

    overrides: settings applied to every cell (device, group_size, ...); ones that change
    results (models, epochs, ...) are part of what a finished cell is compared with.
    Returns one entry per cell: {"cell", "dir", "status": "done"|"skipped"|"planned"}.
    """
    overrides = dict(overrides or {})
    bad = sorted(set(overrides) - CONFIG_FIELDS)
    if bad:
        raise CertssbError(f"unknown overrides {bad}")
    plan = [(c, c.dir(root)) for e in experiments for c in e.cells(scale, only)]
    if not plan:
        raise CertssbError("no cell matches: check the experiment files, --scale and --only")
    done = []
    for i, (cell, d) in enumerate(plan, 1):
        key = f"[{i}/{len(plan)}] {cell.experiment.name}/{cell.scale}/{cell.name}"
        cell.config.update({k: v for k, v in overrides.items() if k not in RESULT_NEUTRAL})
        neutral = {k: v for k, v in overrides.items() if k in RESULT_NEUTRAL}
        if _cell_done(cell, d):
            log(f"{key}: finished earlier, skipped")
            done.append({"cell": key, "dir": str(d), "status": "skipped"})
            continue
        if dry_run:
            log(f"{key}: would run -> {d}")
            done.append({"cell": key, "dir": str(d), "status": "planned"})
            continue
        log(f"{key}: running -> {d}")
        rec = run_cell(cell, root, overrides=neutral, progress=progress, log=log)
        log(f"{key}: done in {sum(rec['seconds'].values()):.0f} s")
        done.append({"cell": key, "dir": str(d), "status": "done"})
    return done


# Settings that change how fast a run goes but not its numbers (the pipeline guarantees
# identical certificates across devices' noise streams, group sizes, backends and batch sizes).
RESULT_NEUTRAL = {"device", "group_size", "backend", "eval_batch_size", "data_dir"}
