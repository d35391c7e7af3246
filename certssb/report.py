"""Metrics, certificate CSVs, the printed table and the plot (DESIGN.md 1.6 and 8).

Definitions (docs/THEORY.md):
- certified accuracy at radius r: share of inputs not abstained, correctly
  classified, with radius > r (at r = 0: not abstained and correct);
- clean accuracy: share of clean inputs not abstained and correct;
- robust accuracy (triggered inputs, true labels, as RAB) and attack success
  rate (triggered inputs predicted as the attacker's label, not abstained).
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .fileio import atomic_write_bytes, atomic_write_text

CSV_COLUMNS = ("idx", "label", "predict", "radius", "correct", "sigma", "pA_lower", "pB_upper",
               "abstain", "radius_conservative", "poison_budget", "region_update", "query_order",
               "predict_raw", "radius_raw", "target")


def csv_cell(v):
    """A certificate CSV cell: bools as 0/1, floats to 6 significant digits (shared by every writer,
    so a streamed certificate file is byte-identical to the pipeline's)."""
    return int(v) if isinstance(v, bool) else (f"{v:.6g}" if isinstance(v, float) else v)


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
        cons = rows["radius_conservative"]
        # after the update the conservative radius is capped by the updated radius (a trim shrinks it;
        # an align replaces label and radius by an earlier ball's, which this cap does not make sound)
        if use_update:
            cons = torch.minimum(cons, radius)
        out["certified_accuracy_conservative"] = certified_accuracy(correct, abstain, cons, radii)
    out["mean_radius"] = float(torch.where(correct & ~abstain, radius, torch.zeros_like(radius)).sum()) / n
    return out


def write_certificates_csv(path: str | Path, rows: Mapping[str, torch.Tensor],
                           region_update: Sequence[str]) -> None:
    """One row per test input, columns CSV_COLUMNS, written atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    n = int(rows["idx"].numel())
    cols = {k: rows[k].tolist() for k in CSV_COLUMNS if k != "region_update" and k in rows}
    for j in range(n):
        out = []
        for k in CSV_COLUMNS:
            if k == "region_update":
                out.append(region_update[j])
            elif k == "correct":
                out.append(int(cols["predict"][j] == cols["label"][j] and not cols["abstain"][j]))
            elif k not in cols:
                out.append("")
            else:
                out.append(csv_cell(cols[k][j]))
        w.writerow(out)
    atomic_write_text(path, buf.getvalue())


# Columns every certificate CSV must fill; "target" only on triggered splits.
REQUIRED_COLUMNS = ("idx", "label", "predict", "radius", "abstain", "predict_raw", "radius_raw",
                    "radius_conservative", "region_update")


def read_certificates_csv(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Inverse of write_certificates_csv (float columns as float64, the rest int64/bool).

    A file that lacks a required column, holds a cell that is not a number, or a
    non-finite or negative radius raises CheckpointError (rerun `certssb certify`)."""
    from .errors import CheckpointError

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path} is damaged ({why}); rerun `certssb certify --out "
                               f"{Path(path).parent}` to rewrite it")

    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            records = list(reader)
            header = reader.fieldnames or []
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; rerun `certssb certify --out {Path(path).parent}`") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise bad(f"not a readable CSV: {e}") from None
    missing = [k for k in REQUIRED_COLUMNS if k not in header]
    if missing:
        raise bad(f"columns {missing} are missing")
    floats = ("radius", "sigma", "pA_lower", "pB_upper", "radius_conservative", "radius_raw")
    rows: dict[str, torch.Tensor] = {}
    for k in CSV_COLUMNS:
        if k in ("region_update", "correct"):
            continue
        vals = [r.get(k) or "" for r in records]
        if any(v == "" for v in vals):
            if k == "label" and all(v == "" for v in vals):
                continue  # unlabeled inputs (`certssb certify-stream` without labels)
            if k in REQUIRED_COLUMNS:
                raise bad(f"column {k!r} has empty cells (a truncated row?)")
            continue
        try:
            if k in floats:
                rows[k] = torch.tensor([float(v) for v in vals], dtype=torch.float64)
            elif k == "abstain":
                rows[k] = torch.tensor([int(v) for v in vals], dtype=torch.bool)
            else:
                rows[k] = torch.tensor([int(v) for v in vals], dtype=torch.int64)
        except ValueError:
            raise bad(f"column {k!r} holds a value that is not a number") from None
    for k in ("radius", "radius_raw", "radius_conservative"):
        if k in rows and rows[k].numel() and not bool((torch.isfinite(rows[k]) & (rows[k] >= 0)).all()):
            raise bad(f"column {k!r} holds a radius that is not finite and >= 0")
    return rows, [r["region_update"] for r in records]


def _pct(x) -> str:
    return "   -  " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:5.1f}%"


def format_table(summary: Mapping) -> str:
    """Certified accuracy by radius for each method, clean and triggered, as a text table."""
    methods = summary.get("methods", {})
    if not methods:
        return "(no methods certified)"
    radii = None
    cols = []
    for name, m in methods.items():
        for split in ("clean", "triggered"):
            curve = m.get(split, {}).get("certified_accuracy", {})
            radii = radii or list(curve)
            cols.append((f"{name} {split}", curve))
    # the same votes under the other bound (summary "other_bound", no storage update), clean inputs
    other = {}
    for name, m in methods.items():
        ob = m.get("other_bound") or {}
        curve = ob.get("clean", {}).get("certified_accuracy")
        if curve:
            cols.append((f"{name} clean [{ob['bound']}]", curve))
            other[name] = ob
    head = ["radius"] + [c[0] for c in cols]
    widths = [max(8, len(h)) for h in head]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for r in radii or []:
        cells = [r] + [_pct(curve.get(r)) for _, curve in cols]
        lines.append("  ".join(str(c).rjust(w) for c, w in zip(cells, widths)))
    foot = []
    for name, m in methods.items():
        c, t = m.get("clean", {}), m.get("triggered", {})
        foot.append(f"{name}: M={m.get('models')} bound={m.get('bound')} mode={m.get('mode')} "
                    f"storage update={'on' if m.get('storage_update', {}).get('applied') else 'off'}; "
                    f"clean acc {_pct(c.get('accuracy')).strip()}, abstain {_pct(c.get('abstain_rate')).strip()}; "
                    f"triggered: robust acc {_pct(t.get('robust_accuracy')).strip()}, "
                    f"attack success {_pct(t.get('attack_success_rate')).strip()}")
        if name in other:
            oc = other[name]["clean"]
            foot.append(f"  [{other[name]['bound']}]: the same votes bounded with {other[name]['bound']} instead "
                        f"of {m.get('bound')}, without the storage update: clean acc "
                        f"{_pct(oc.get('accuracy')).strip()}, abstain {_pct(oc.get('abstain_rate')).strip()}")
        ceil = m.get("ceiling")
        if ceil:
            line = (f"  ceiling: with M={m.get('models')} and {m.get('bound')} at alpha={m.get('alpha')}, "
                    f"pA_lower <= {ceil['pA_lower']:.3f}, so no radius exceeds {ceil['radius']:.3f} "
                    f"(sigma {ceil['sigma']:.3f})")
            radii = sorted(float(r) for r in c.get("certified_accuracy", {}))
            if len(radii) > 1 and ceil["radius"] < radii[1]:
                line += ("; more models (--models) raise it" if m.get("bound") == "clopper-pearson"
                         else "; more models (--models) or --bound clopper-pearson raise it")
            foot.append(line)
    nd = summary.get("no_defense")
    if nd:
        foot.append(f"no defense: clean acc {_pct(nd.get('clean_accuracy')).strip()}, "
                    f"attack success {_pct(nd.get('attack_success_rate')).strip()}")
    att = summary.get("attack", {})
    if att:
        foot.append(f"attack: {att.get('trigger')} delta={att.get('delta')} (measured L2 "
                    f"{att.get('trigger_l2', {}).get('mean', float('nan')):.3f}), "
                    f"{att.get('n_poisoned')} poisoned of {summary.get('dataset', {}).get('n_train')}")
    return "\n".join(lines + [""] + foot)


def plot_certified_accuracy(summary: Mapping, path: str | Path) -> None:
    """PNG: certified accuracy against radius, one line per method, clean and triggered panels.

    Points are the measured radii of the table, joined by lines (between two radii the
    curve is only known to lie between its neighbours' values)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    colors = {"rab": "tab:blue", "cert-ssb": "tab:red"}
    for ax, split, title in ((axes[0], "clean", "clean test set"),
                             (axes[1], "triggered", "triggered test set (true labels)")):
        for name, m in summary.get("methods", {}).items():
            color = colors.get(name)
            for key, style, label in (("certified_accuracy", "-", name),
                                      ("certified_accuracy_conservative", ":", f"{name} (conservative)")):
                curve = m.get(split, {}).get(key)
                if curve:
                    xs = [float(r) for r in curve]
                    ax.plot(xs, list(curve.values()), marker=".", linestyle=style, color=color, label=label)
            other = m.get("variants", {}).get("no_update" if m.get("storage_update", {}).get("applied")
                                              else "storage_update", {}).get(split, {})
            if other.get("certified_accuracy"):
                curve = other["certified_accuracy"]
                ax.plot([float(r) for r in curve], list(curve.values()), marker=".", linestyle="--",
                        alpha=0.5, color=color,
                        label=f"{name} ({'without' if m.get('storage_update', {}).get('applied') else 'with'} storage update)")
        ax.set_title(title)
        ax.set_xlabel("L2 radius")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("certified accuracy")
    if axes[1].get_legend_handles_labels()[0]:  # a summary without methods has no lines
        axes[1].legend(fontsize=7, loc="upper right")
    ds = summary.get("dataset", {})
    att = summary.get("attack", {})
    fig.suptitle(f"{ds.get('name')} {ds.get('class_names') or ''}, trigger {att.get('trigger')} "
                 f"delta={att.get('delta')}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def regenerate(run_dir: str | Path, radii: Sequence[float] | None = None) -> dict:
    """Recompute metrics from a run's certificate CSVs (optionally at new radii); rewrite
    summary.json, table.txt and the plot. Returns the updated summary.

    Holds the run directory's lock (`certssb.runlock`) and refuses a directory of another
    format (`certssb.rundir`); damaged CSVs or summary raise CheckpointError."""
    from .errors import CertssbError
    from .rundir import check_compatible
    from .runlock import run_lock

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
    import json

    from .errors import CheckpointError, CertssbError
    from .fileio import atomic_write_json, read_json, safe_child

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
            kw = dict(triggered=split == "triggered", conservative=conservative)
            with_u = split_metrics(rows, radii, use_update=True, **kw)
            without = split_metrics(rows, radii, use_update=False, **kw)
            variants = m.setdefault("variants", {})
            variants.setdefault("storage_update", {})[split] = with_u
            variants.setdefault("no_update", {})[split] = without
            m[split] = with_u if applied else without
    summary["config"]["radii"] = radii
    atomic_write_json(run_dir / "summary.json", json.loads(json.dumps(summary)))
    plot_certified_accuracy(summary, run_dir / "certified_accuracy.png")
    atomic_write_text(run_dir / "table.txt", format_table(summary) + "\n")
    return summary
