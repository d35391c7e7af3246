"""The printed table and the plot of a run's summary (`table.txt`, `certified_accuracy.png`)."""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Mapping

from ..core.files import atomic_write_bytes


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
