"""`certssb report`: recompute a run's metrics from its certificate CSVs, at the same or new radii."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from ..core.files import atomic_write_json, atomic_write_text, read_json, safe_child
from ..errors import CertssbError, CheckpointError
from ..report.certificates import read_certificates_csv
from ..report.metrics import update_variants
from ..report.table import format_table, plot_certified_accuracy
from .lock import run_lock
from .rundir import check_compatible


def regenerate(run_dir: str | Path, radii: Sequence[float] | None = None) -> dict:
    """Recompute metrics from a run's certificate CSVs (optionally at new radii); rewrite
    summary.json, table.txt and the plot. Returns the updated summary.

    Holds the run directory's lock (`certssb.runner.lock`) and refuses a directory of another
    format (`certssb.runner.rundir`); damaged CSVs or summary raise CheckpointError."""

    run_dir = Path(run_dir)
    if not (run_dir / "summary.json").exists():
        raise CertssbError(f"{run_dir} has no summary.json; run `certssb run` or `certssb certify` first")
    if radii is not None:
        radii = list(radii)
        if not radii or any(isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r)
                            or r < 0 for r in radii):
            raise CertssbError(f"radii must be non-negative finite numbers, got {radii}")
    with run_lock(run_dir, "certssb report"):
        check_compatible(run_dir)
        return _regenerate(run_dir, radii)


def _regenerate(run_dir: Path, radii: Sequence[float] | None) -> dict:
    summary = read_json(run_dir / "summary.json")
    if (not isinstance(summary, dict) or not isinstance(summary.get("config"), dict)
            or not isinstance(summary.get("methods", {}), dict)):
        raise CheckpointError(f"{run_dir / 'summary.json'} is not a certssb summary; rerun "
                              f"`certssb certify --out {run_dir}` to rewrite it")
    if radii is None:
        try:
            radii = [float(r) for r in summary["config"]["radii"]]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{run_dir / 'summary.json'} has no valid config.radii; pass --radii") from None
    for method, m in summary.get("methods", {}).items():
        if not isinstance(m, dict):
            raise CheckpointError(f"{run_dir / 'summary.json'}: entry of method {method!r} is not an object; "
                                  f"rerun `certssb certify --out {run_dir}`")
        applied = m.get("storage_update", {}).get("applied", False)
        conservative = m.get("mode") == "paper"
        for split in ("clean", "triggered"):
            # the method name comes from a file: it may not lead outside the run directory
            path = safe_child(run_dir, f"certificates-{method}-{split}.csv", source=run_dir / "summary.json")
            if not path.exists():
                raise CertssbError(f"{path} is missing; rerun `certssb certify --out {run_dir}`")
            rows, _ = read_certificates_csv(path)
            if split == "triggered" and "target" not in rows:
                raise CheckpointError(f"{path} is damaged (no 'target' column); rerun "
                                      f"`certssb certify --out {run_dir}`")
            with_u, without, m[split] = update_variants(rows, radii, triggered=split == "triggered",
                                                        applied=applied, conservative=conservative)
            variants = m.setdefault("variants", {})
            variants.setdefault("storage_update", {})[split] = with_u
            variants.setdefault("no_update", {})[split] = without
    summary["config"]["radii"] = radii
    atomic_write_json(run_dir / "summary.json", json.loads(json.dumps(summary)))
    plot_certified_accuracy(summary, run_dir / "certified_accuracy.png")
    atomic_write_text(run_dir / "table.txt", format_table(summary) + "\n")
    return summary
