"""Bridge until the grid reruns: the fair-comparison sections and the README block from today's pages.

The run directories behind docs/results/{mnist,cifar10,digits}.md are not in the repository, so
`certssb pages` cannot regenerate them, and there is no kept copy (docs/results/cells) yet. This
script reads back, from the rendered pages, what RAB's envelope needs (the clean certified-accuracy
columns of every cell table, Cert-SSB's median clean sigma, M and the number of test inputs), marks
those cells `approximate` (1-decimal percentages), and writes with the generator's own functions
(certssb.results_pages):

- each experiment section's "Against RAB's envelope" section (inserted at its end, or replaced);
- the page intro and the notes, replaced by the generator's current text;
- the README results block (update_readme).

The next `certssb grid ... --pages docs/results` or `certssb pages` replaces all of it with exact
numbers and keeps the cells under docs/results/cells. Run from the repository root:
    python scripts/fair_from_pages.py [--readme README.md]
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from certssb.report import pages as rp
from certssb.report.cells import find_kept_cells, page_of
from certssb.experiments.grid import Experiment, cell_name
from certssb.report.metrics import radius_key

PAGES = ("mnist", "cifar10", "digits")
FORMAT1_NOTE = (
    "**Run format 1.** Every cell on this page ran before this version's soundness fixes: its Gaussian noise "
    "came from 32-bit uniforms (a total-variation gap of up to about 1.2e-3 for MNIST 1 vs 0 and 3.6e-3 for "
    "CIFAR-10 airplane vs bird over a model's noise, docs/THEORY.md 7), its conservative curve after the "
    "storage update took min(conservative, updated radius), which an `align` can break (docs/THEORY.md 6), "
    "and its poison budget used the largest training-trigger norm for every test input (docs/THEORY.md 1). "
    "The tables are kept as they were until the grid reruns in run format 2.")


def _value(v: str):
    if v in ("True", "False"):
        return v == "True"
    try:
        return float(v)
    except ValueError:
        return v


def _point(label: str) -> dict:
    if label == "default":
        return {}
    out = {}
    for part in label.split(", "):
        k, v = part.split(" ", 1)
        out[k] = _value(v)
    return out


def _table(lines: list[str]) -> dict[str, dict[str, float]]:
    """{column: {radius: fraction}} of a cell table, with its 'a to b' row expanded (all 0)."""
    head = [h.strip() for h in lines[0].strip("|").split("|")]
    cols: dict[str, dict[str, float]] = {h: {} for h in head[1:]}
    shown = []
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        r = cells[0]
        if " to " in r:
            a, b = (float(x) for x in r.split(" to "))
            step = float(shown[-1]) - float(shown[-2]) if len(shown) > 1 else a
            rs = [radius_key(a + i * step) for i in range(int(round((b - a) / step)) + 1)]
        else:
            rs = [r]
            shown.append(r)
        for h, c in zip(head[1:], cells[1:]):
            for rr in rs:
                cols[h][rr] = float(c) / 100
    return cols


def parse_page(text: str, titles: dict[str, str]) -> list[dict]:
    """The cells of one rendered page, with what the envelope and the README block need."""
    cells = []
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    for sec in sections:
        m = re.match(r"(.*): (\w+) scale", sec)
        exp_name, scale = titles[m.group(1)], m.group(2)
        n_test = int(re.search(r"training / (\d+) test images", sec).group(1))
        models = int(re.search(r"M = (\d+) models", sec).group(1))
        epochs = int(re.search(r"models per method, (\d+) epoch", sec).group(1))
        sigma0_default = float(re.search(r"for sigma0 = ([\d.]+)", sec).group(1))
        pub = {}
        pm = re.search(r"^\| radius \| published \|.*?\n((?:\|.*\n)+)", sec, flags=re.M)
        if pm:  # the published block's 2-decimal figures of ours, as the README line prints them
            for line in pm.group(1).splitlines()[1:]:
                c = [x.strip() for x in line.strip("|").split("|")]
                pub[radius_key(float(c[0]))] = float(c[2]) / 100
        by_name: dict[str, dict] = {}
        for sub in re.split(r"^### ", sec, flags=re.M)[1:]:
            hm = re.match(r"(.*); (hoeffding|clopper-pearson)\n", sub)
            if not hm:
                continue
            label, bound = hm.group(1), hm.group(2)
            lines = [ln for ln in sub.splitlines() if ln.startswith("|")]
            cols = _table(lines)
            point = _point(label)
            s0 = float(point.get("sigma0", sigma0_default))
            methods = {}
            if "RAB clean" in cols:
                methods["rab"] = {"clean": {"certified_accuracy": cols["RAB clean"]}}
            if "Cert-SSB clean" in cols:
                ssb = dict(cols["Cert-SSB clean"])
                if pub and bound == "hoeffding":
                    ssb.update({r: v for r, v in pub.items() if r in ssb})
                sm = re.search(r"clean min [\d.]+ / median ([\d.]+)", sub)
                methods["cert-ssb"] = {
                    "variants": {"storage_update": {"clean": {
                        "certified_accuracy": ssb,
                        "certified_accuracy_conservative": cols.get("Cert-SSB clean, conservative", {})}}},
                    "sigma": {"clean": {"median": float(sm.group(1))}} if sm else {}}
            tm = re.search(r"poisoned \((\w+),", sub)
            summary = {"config": {"sigma0": s0, "models": models, "epochs": epochs},
                       "dataset": {"n_test": n_test}, "attack": {"trigger": tm.group(1) if tm else None},
                       "methods": methods}
            name = cell_name(point)
            c = by_name.setdefault(name, {"experiment": exp_name, "scale": scale, "cell": name, "point": point,
                                          "config": {"sigma0": s0}, "summaries": {}, "approximate": True})
            c["summaries"][bound] = summary
        cells += by_name.values()
    return cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", default="docs/results")
    ap.add_argument("--readme", default=None)
    ap.add_argument("--pages", nargs="+", default=list(PAGES), choices=PAGES,
                    help="the pages to read back (a page regenerated from kept cells is left alone)")
    args = ap.parse_args()
    docs = Path(args.docs)
    titles = {Experiment.load(f).title: f.stem for f in sorted(Path("experiments").glob("*.json"))}
    all_cells = []
    for page in args.pages:
        path = docs / f"{page}.md"
        text = path.read_text()
        cells = parse_page(text, titles)
        all_cells += cells
        # the intro and the notes: the generator's current text
        lines = text.split("\n")
        for i, ln in enumerate(lines):
            if ln.startswith("Certified accuracy (%) of RAB (fixed sigma0)"):
                lines[i] = rp.INTRO
                if not any(x.startswith(FORMAT1_NOTE[:40]) for x in lines):
                    lines[i] += "\n\n" + FORMAT1_NOTE
            elif ln.startswith("Why ours can differ from the published figures"):
                lines[i] = rp.PUBLISHED_NOTE
            elif ln.startswith("Why: Cert-SSB's sigma search"):
                lines[i] = rp.SHORTFALL_NOTE
        text = "\n".join(lines)
        # each experiment section: drop an earlier fair section, append the new one at its end
        parts = re.split(r"(?=^## )", text, flags=re.M)
        out = [parts[0]]
        for sec in parts[1:]:
            sec = re.split(r"(?=^### Against RAB's envelope)", sec, flags=re.M)[0].rstrip("\n") + "\n\n"
            m = re.match(r"## (.*): (\w+) scale", sec)
            exp_cells = [c for c in cells if c["experiment"] == titles[m.group(1)] and c["scale"] == m.group(2)]
            bounds = sorted({b for c in exp_cells for b in c["summaries"]}, key=lambda b: b != "hoeffding")
            extra = rp.fair_section(exp_cells, m.group(1), m.group(2), bounds)
            out.append(sec + ("\n".join(extra).rstrip() + "\n\n" if extra else ""))
        path.write_text("".join(out).rstrip() + "\n")
        print(f"{path}: {len(cells)} cells read back")
    if args.readme:
        # pages regenerated by `certssb pages` contribute their exact kept cells instead
        kept = [c for c in find_kept_cells(docs) if page_of(c, None) not in args.pages]
        rp.update_readme(Path(args.readme), all_cells + kept, docs)
        print(f"{args.readme}: results block rewritten")


if __name__ == "__main__":
    main()
