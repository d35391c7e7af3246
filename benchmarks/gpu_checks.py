"""The Python half of benchmarks/gpu_checks.sh: data copy, full-scale cells, the gpu-checks.json record.

    python benchmarks/gpu_checks.py prepare-data [--from /work/shared/data] [--to .gpu-data] [--no-cifar]
        copy just the files the GPU checks read (MNIST: the four IDX files, 12 MB; CIFAR-10: the
        airplane and bird folders of the JPEG copy, about 10 MB) into an ignored folder of the
        checkout, so a GPU machine with nothing but the repository and that folder runs them
    python benchmarks/gpu_checks.py cells --experiment mnist-1v0-published --scale full --runs DIR ...
        train and certify cells of an experiment file (every bound listed with --bounds), resumable
    python benchmarks/gpu_checks.py assemble --out OUTDIR --steps STEPS.tsv --runs DIR ...
        write OUTDIR/gpu-checks.json: {"device", "torch", "date", "steps", "cells", "benchmarks"}

`certssb pages --gpu-checks FILE` turns a gpu-checks.json back into results pages
(certssb.report.gpu_checks).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

CIFAR_CLASSES = ("airplane", "bird")  # the cifar10-airplane-bird task (classes 0, 2)
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
               "t10k-labels-idx1-ubyte.gz")


def prepare_data(src: Path, dst: Path, cifar: bool = True) -> int:
    """Copy MNIST (and CIFAR-10 airplane + bird) from `src` (laid out as /work/shared/data) to `dst`."""
    total = 0
    (dst / "mnist").mkdir(parents=True, exist_ok=True)
    for name in MNIST_FILES:
        f = src / "mnist" / name
        if not f.is_file():
            raise SystemExit(f"{f} is missing: pass --from the folder that holds mnist/ (and cifar10-jpeg/)")
        shutil.copy2(f, dst / "mnist" / name)
        total += f.stat().st_size
    if cifar:
        for split in ("train", "test"):
            for c in CIFAR_CLASSES:
                s = src / "cifar10-jpeg" / split / c
                if not s.is_dir():
                    raise SystemExit(f"{s} is missing (or pass --no-cifar)")
                d = dst / "cifar10-jpeg" / split / c
                if d.exists():
                    shutil.rmtree(d)
                shutil.copytree(s, d)
                total += sum(p.stat().st_size for p in d.iterdir())
    print(f"copied {total / 1e6:.1f} MB into {dst}")
    return total


def run_cells(args: argparse.Namespace) -> int:
    from certssb.experiments.grid import Experiment, parse_only, run_cell, _cell_done

    exp = Experiment.load(ROOT / "experiments" / f"{args.experiment}.json")
    if args.bounds:
        exp = dataclasses.replace(exp, bounds=args.bounds.split(","))
    cells = exp.cells(args.scale, parse_only(args.only))
    if args.cells:
        want = args.cells.split(",")
        cells = [c for c in cells if c.name in want]
    if not cells:
        raise SystemExit(f"no cell of {args.experiment} ({args.scale}) matches")
    overrides = json.loads(args.set) if args.set else {}
    for c in cells:
        # settings that change the models (engine, a CPU dataset stand-in) are part of the cell's config
        c.config.update({k: v for k, v in overrides.items() if k not in ("device", "data_dir", "group_size")})
    neutral = {k: v for k, v in overrides.items() if k in ("device", "data_dir", "group_size")}
    for c in cells:
        t0 = time.perf_counter()
        if _cell_done(c, c.dir(args.runs)):
            print(f"[gpu_checks] {c.experiment.name}/{c.scale}/{c.name}: finished earlier", flush=True)
            continue
        print(f"[gpu_checks] {c.experiment.name}/{c.scale}/{c.name}: {c.config}", flush=True)
        run_cell(c, args.runs, overrides=neutral, progress=False,
                 log=lambda s: print(f"  {s}", flush=True))
        print(f"[gpu_checks] {c.name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


def assemble(args: argparse.Namespace) -> dict:
    import torch

    from certssb.report.cells import find_cells

    steps = []
    if args.steps and Path(args.steps).is_file():
        for line in Path(args.steps).read_text().splitlines():
            name, seconds, rc = line.split("\t")[:3]
            steps.append({"name": name, "seconds": float(seconds),
                          "ok": None if rc == "skip" else rc == "0", **({"rc": rc} if rc not in ("0", "skip") else {})})
    cells = []
    runs = Path(args.runs)
    for rec in (find_cells(runs) if runs.is_dir() else []):
        summaries = rec.pop("summaries")
        rec.pop("dir", None)
        rec.get("hardware", {}).pop("host", None)
        first = summaries.get(rec["bounds"][0]) if rec.get("bounds") else None
        cfg = (first or {}).get("config", {})
        cells.append({"experiment": rec["experiment"], "scale": rec["scale"], "cell": rec["cell"],
                      "seconds": round(sum(rec.get("seconds", {}).values()), 3),
                      "models": cfg.get("models"), "epochs": cfg.get("epochs"),
                      "summary": first, "summaries": summaries, "record": rec})
    benchmarks = {}
    for name, path in (("training", args.bench_training), ("kernels", args.bench_kernels)):
        if path and Path(path).is_file():
            benchmarks[name] = json.loads(Path(path).read_text())
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (dry run)"
    data = {"device": device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "dry_run": bool(args.dry_run), "steps": steps, "cells": cells, "benchmarks": benchmarks}
    out = Path(args.out) / "gpu-checks.json"
    out.write_text(json.dumps(data, indent=1) + "\n")
    bad = [s["name"] for s in steps if s["ok"] is False]
    print(f"wrote {out}: {len(steps)} steps ({', '.join(bad) + ' failed' if bad else 'none failed'}), "
          f"{len(cells)} cells")
    return data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare-data")
    a.add_argument("--from", dest="src", default=str(ROOT.parent / "shared" / "data"))
    a.add_argument("--to", dest="dst", default=str(ROOT / ".gpu-data"))
    a.add_argument("--no-cifar", action="store_true")
    c = sub.add_parser("cells")
    c.add_argument("--experiment", required=True)
    c.add_argument("--scale", default="full")
    c.add_argument("--runs", required=True)
    c.add_argument("--only", action="append", default=[])
    c.add_argument("--cells", default=None, help="comma list of cell names (default: all that --only keeps)")
    c.add_argument("--bounds", default=None, help="comma list (default: the experiment's)")
    c.add_argument("--set", default=None, help="JSON object of RunConfig settings for every cell")
    s = sub.add_parser("assemble")
    s.add_argument("--out", required=True)
    s.add_argument("--steps", default=None)
    s.add_argument("--runs", required=True)
    s.add_argument("--bench-training", default=None)
    s.add_argument("--bench-kernels", default=None)
    s.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    if args.cmd == "prepare-data":
        prepare_data(Path(args.src), Path(args.dst), cifar=not args.no_cifar)
        return 0
    if args.cmd == "cells":
        return run_cells(args)
    assemble(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
