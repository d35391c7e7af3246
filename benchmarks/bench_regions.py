"""Benchmark of the storage-update certifier's candidate search (docs/THEORY.md section 6).

One job: time RegionStore backends side by side on the same synthetic certification
stream and check that they take the same decisions.

- stream: N inputs certified end to end (certify_stream, chunks of inputs, the store
  continuing across chunks) with the fast backend: faiss on the CPU, the GPU backend with
  --device cuda (where the FAISS CPU backend runs the same stream as the baseline).
- decide: Q further inputs decided against the N stored regions (decide_batch) by the fast
  backend, the brute-force PyTorch reference, and a per-query Python loop over the stored
  entries (how the original data-dependent smoothing code does it); with --device cuda also
  the FAISS CPU backend.
- decide-batch: up to 1024 such inputs at once (where a blocked search pays off): the fast
  backend alone on the CPU; the GPU backend against FAISS on the CPU with --device cuda.
- precision: the torch search's two filters side by side at the ImageNette size (D = 3 x 224 x 224)
  on images-like rows in [0, 1] (smooth class templates plus pixel noise, near-duplicates): the
  centred float32 filter (the default) against the float64 one, Q inputs decided against N stored
  regions on --device, and (smoke, or N <= 2000) the brute-force reference; the float32 filter
  must never fall back to float64 here.
All decisions must agree (exactly between backends; the Python loop sums in another order, so
its radii agree to 1e-9): the script exits with status 1 otherwise.

The stream: 10 classes with cluster means in [0.3, 0.7]^D and within-class distances about 6
(MNIST-like in [0, 1] pixel units), 30 % "twins" (an earlier input plus a perturbation of
norm 0.05..1.5, like a triggered copy; half of them predicted as another class), radii
uniform in [0, 1.2] (2 % exactly 0), 10 % abstentions.

Usage:
    python benchmarks/bench_regions.py --smoke                      # seconds; CI
    python benchmarks/bench_regions.py --json cpu.json              # full CPU run (minutes)
    python benchmarks/bench_regions.py --device cuda --json gpu.json
    python benchmarks/bench_regions.py --write-docs docs/results/regions.md --inputs cpu.json gpu.json
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's certssb, installed or not
from certssb.core.files import atomic_write_json, atomic_write_text, read_json
from certssb.certify.region_search import faiss_available
from certssb.certify.regions import RegionDecision, RegionStore

FULL_CASES = [(784, 10_000), (784, 100_000), (3072, 10_000), (3072, 100_000), (150_528, 10_000)]
SMOKE_CASES = [(64, 600), (784, 300)]
IMAGENETTE_DIM = 3 * 224 * 224
# (N stored, Q decided) of the precision case
PRECISION_FULL = (2000, 256)
PRECISION_SMOKE = (48, 16)
CLASSES = 10


# ----------------------------------------------------------------------------- data
def stream_chunk(seed: int, dim: int, start: int, count: int) -> tuple[torch.Tensor, ...]:
    """Inputs start..start+count-1 of the synthetic stream: x float32 [count, dim], labels
    int64, radii float64, abstain bool. Twins copy an earlier input of the same chunk."""
    means = np.random.default_rng([seed, dim]).uniform(0.3, 0.7, (CLASSES, dim)).astype(np.float32)
    rng = np.random.default_rng([seed, dim, start])
    k = rng.integers(0, CLASSES, count)
    x = np.empty((count, dim), dtype=np.float32)
    step = max(1, (1 << 24) // dim)  # bound the float64 noise temporaries
    for a in range(0, count, step):
        e = min(count, a + step)
        x[a:e] = means[k[a:e]] + (6.0 / math.sqrt(2 * dim)) * rng.standard_normal((e - a, dim))
    labels = k.copy()
    twin = rng.random(count) < 0.3
    twin[0] = False
    src = (rng.random(count) * np.arange(count)).astype(np.int64)
    for i in np.flatnonzero(twin):
        d = rng.standard_normal(dim)
        x[i] = x[src[i]] + d * (rng.uniform(0.05, 1.5) / np.linalg.norm(d))
        labels[i] = labels[src[i]] if rng.random() < 0.5 else rng.integers(0, CLASSES)
    radii = rng.uniform(0.0, 1.2, count)
    radii[rng.random(count) < 0.02] = 0.0
    abstain = rng.random(count) < 0.1
    return torch.from_numpy(x), torch.from_numpy(labels), torch.from_numpy(radii), torch.from_numpy(abstain)


def chunk_rows(dim: int) -> int:
    return max(100, min(10_000, (1 << 29) // (4 * dim)))  # about 128 MiB of inputs per chunk


# ----------------------------------------------------------------------------- baselines
def python_loop_decide(centres: np.ndarray, labels: np.ndarray, radii: np.ndarray, x: np.ndarray,
                       label: int, radius: float) -> RegionDecision:
    """The decision by a plain per-query loop over the stored entries (float64 numpy)."""
    x64 = x.astype(np.float64)
    best_m, best_i, best_d = math.inf, -1, 0.0
    for i in range(centres.shape[0]):
        diff = x64 - centres[i].astype(np.float64)
        d = math.sqrt(float(diff @ diff))
        if labels[i] != label and d < radii[i] + radius and d - radii[i] < best_m:
            best_m, best_i, best_d = d - radii[i], i, d
    if best_i < 0:
        return RegionDecision(label, radius, "none", -1)
    if best_m >= 0:
        return RegionDecision(label, best_m, "trim", best_i)
    return RegionDecision(int(labels[best_i]), float(radii[best_i]) - best_d, "align", best_i)


# ----------------------------------------------------------------------------- timing
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int, quick_s: float = 2.0):
    """(median seconds, all seconds, last result): repeats only while one run is quick."""
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
        if times[-1] > quick_s:
            break
    return statistics.median(times), times, out


def same_decisions(a: list[RegionDecision], b: list[RegionDecision], approx: bool = False) -> bool:
    if len(a) != len(b):
        return False
    for u, v in zip(a, b):
        if (u.label, u.kind, u.conflict) != (v.label, v.kind, v.conflict):
            return False
        if approx:
            if not math.isclose(u.radius, v.radius, rel_tol=1e-9, abs_tol=1e-12):
                return False
        elif u.radius != v.radius:
            return False
    return True


# ----------------------------------------------------------------------------- one case
def fill(store: RegionStore, seed: int, dim: int, n: int, progress: bool) -> tuple[float, list[str]]:
    """Certify inputs 0..n-1 into store, chunk by chunk; (seconds, kinds)."""
    store.reserve(n)
    kinds: list[str] = []
    seconds = 0.0
    rows = chunk_rows(dim)
    for a in range(0, n, rows):
        args = stream_chunk(seed, dim, a, min(rows, n - a))  # generation is not timed
        sync(str(store.device))
        t = time.perf_counter()
        kinds += store.certify_stream(*args, progress=progress)[2]
        sync(str(store.device))
        seconds += time.perf_counter() - t
    return seconds, kinds


def twins(x: torch.Tensor, store: RegionStore, seed: int) -> None:
    """Make every other query a near copy (distance about 0.3) of a stored input, in place."""
    k = len(x[::2])
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(store), (k,), generator=g)
    x[::2] = store.centres[pick] + 0.3 * torch.randn(k, x.shape[1], generator=g) / math.sqrt(x.shape[1])


def queries_for(dim: int, n: int, smoke: bool) -> int:
    """Queries for the slow baselines: about 2 s of brute force (4.6 ns per element)."""
    return 16 if smoke else max(2, min(100, int(2e9 / (n * dim))))


def row(case: str, dim: int, n: int, q: int, fast: str, fast_s: float, baseline: str | None,
        baseline_s: float | None, unit: str, count: int, agree: bool, **extra) -> dict:
    return {"case": case, "dim": dim, "n": n, "queries": q, "fast": fast, "fast_s": fast_s,
            "baseline": baseline, "baseline_s": baseline_s,
            "speedup": (baseline_s / fast_s) if baseline_s is not None and fast_s > 0 else None,
            "throughput": count / fast_s if fast_s > 0 else None, "throughput_unit": unit,
            "agree": agree, **extra}


def run_case(dim: int, n: int, device: str, smoke: bool, seed: int, repeats: int, progress: bool) -> list[dict]:
    cuda = device.startswith("cuda")
    has_faiss = faiss_available()
    rows: list[dict] = []
    store = RegionStore(dim, backend="auto", device=device)
    fast_name = store.backend
    t_fill, kinds = fill(store, seed, dim, n, progress)
    counts = {k: kinds.count(k) for k in ("none", "trim", "align", "abstain")}
    agree = True
    base_name, base_s = None, None
    if cuda or smoke:
        # the same stream through the FAISS CPU backend (and the reference when small)
        others = (["faiss"] if cuda and has_faiss else []) + (["reference"] if smoke else [])
        others += ["torch-gpu"] if smoke and not cuda and store.backend != "torch-gpu" else []
        for other in others:
            s2 = RegionStore(dim, backend=other, device="cpu")
            t2, kinds2 = fill(s2, seed, dim, n, progress)
            ok = (kinds2 == kinds and torch.equal(s2.labels, store.labels) and torch.equal(s2.radii, store.radii)
                  and torch.equal(s2.queries, store.queries))
            if not ok:
                print(f"DISAGREEMENT: stream d={dim} n={n}: {other} differs from {fast_name}", file=sys.stderr)
            agree &= ok
            if other == "faiss" and cuda:
                base_name, base_s = "faiss", t2
            del s2
    rows.append(row(f"stream d={dim} n={n}", dim, n, n, fast_name, t_fill, base_name, base_s, "inputs/s", n, agree,
                    counts=counts, stored=len(store)))

    # decide: Q new inputs against the n stored regions
    q = queries_for(dim, n, smoke)
    x, lab, rad, _ = stream_chunk(seed + 1, dim, n, q)
    twins(x, store, seed)
    results: dict[str, tuple[float, list[RegionDecision]]] = {}
    backends = [(fast_name, device)] if cuda else []
    backends += ([("faiss", "cpu")] if has_faiss else []) + [("reference", "cpu")]
    for name, dev in backends:
        store.set_backend(name, dev)
        med, _, decs = timed(lambda: store.decide_batch(x, lab, rad), dev, repeats)
        results[name] = (med, decs)
    cen, labs, rads = store.centres.numpy(), store.labels.numpy(), store.radii.numpy()
    xn, ln, rn = x.numpy(), lab.numpy(), rad.numpy()
    med, _, decs = timed(lambda: [python_loop_decide(cen, labs, rads, xn[i], int(ln[i]), float(rn[i]))
                                  for i in range(q)], "cpu", repeats)
    results["python-loop"] = (med, decs)
    fast_dec = results[fast_name][1]
    kinds_q = {k: sum(d.kind == k for d in fast_dec) for k in ("none", "trim", "align")}
    for name, (secs, decs) in results.items():
        if name == fast_name:
            continue
        ok = same_decisions(decs, fast_dec, approx=name == "python-loop")
        if not ok:
            print(f"DISAGREEMENT: decide d={dim} n={n}: {name} differs from {fast_name}", file=sys.stderr)
        rows.append(row(f"decide d={dim} n={n}", dim, n, q, fast_name, results[fast_name][0], name, secs,
                        "queries/s", q, ok, kinds=kinds_q))
    # a large batch, where the search amortizes: the fast backend alone on the CPU, the GPU
    # backend against FAISS on the CPU with --device cuda
    qb = 4 if smoke else min(1024, max(64, int(4e11 / (n * dim))))
    xb, lb, rb, _ = stream_chunk(seed + 2, dim, n, qb)
    twins(xb, store, seed)
    got = {}
    for name, dev in [(fast_name, device)] + ([("faiss", "cpu")] if cuda and has_faiss else []):
        store.set_backend(name, dev)
        got[name] = timed(lambda: store.decide_batch(xb, lb, rb), dev, repeats)
    base = "faiss" if "faiss" in got and fast_name != "faiss" else None
    ok = base is None or same_decisions(got[base][2], got[fast_name][2])
    if not ok:
        print(f"DISAGREEMENT: decide-batch d={dim} n={n}: faiss differs from {fast_name}", file=sys.stderr)
    rows.append(row(f"decide-batch d={dim} n={n}", dim, n, qb, fast_name, got[fast_name][0], base,
                    got[base][0] if base else None, "queries/s", qb, ok))
    return rows


def image_rows(seed: int, n: int, side: int = 224) -> torch.Tensor:
    """n images-like rows [n, 3 * side^2] in [0, 1]: 10 smooth class templates plus pixel noise, every
    fourth row a near copy (distance about 1) of an earlier one."""
    g = torch.Generator().manual_seed(seed)
    templ = torch.nn.functional.interpolate(torch.rand(CLASSES, 3, 14, 14, generator=torch.Generator().manual_seed(0)),
                                            size=(side, side), mode="bilinear", align_corners=False)
    out = torch.empty(n, 3 * side * side)
    k = torch.randint(0, CLASSES, (n,), generator=g)
    for a in range(0, n, 64):
        e = min(n, a + 64)
        x = templ[k[a:e]] + 0.1 * torch.randn(e - a, 3, side, side, generator=g)
        out[a:e] = x.clamp_(0, 1).reshape(e - a, -1)
    for i in range(3, n, 4):
        d = torch.randn(out.shape[1], generator=g)
        out[i] = (out[i // 2] + d / d.norm()).clamp_(0, 1)
    return out


def precision_case(n: int, q: int, device: str, seed: int, repeats: int, reference: bool) -> list[dict]:
    """The torch search's centred float32 filter against its float64 filter at D = 150,528."""
    from certssb.certify.region_search import TorchDenseIndex

    dim = IMAGENETTE_DIM
    x = image_rows(seed, n)
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, 2, (n,), generator=g)
    radii = torch.rand(n, generator=g, dtype=torch.float64) * 3.0
    store = RegionStore(dim, backend="torch-gpu")  # exact like every backend
    store.certify_stream(x, labels, radii, torch.zeros(n, dtype=torch.bool))  # the stored regions
    xq = image_rows(seed + 2, q)
    xq[::2] = store.centres[torch.randint(0, n, (len(xq[::2]),), generator=g)] + 0.5 * xq[::2] / xq[::2].norm(
        dim=1, keepdim=True)  # half the queries near a stored input
    xq.clamp_(0, 1)
    lq = torch.randint(0, 2, (q,), generator=g)
    rq = torch.rand(q, generator=g, dtype=torch.float64) * 3.0
    got = {}
    stats = {}
    for prec in ("float32", "float64"):
        store._index = TorchDenseIndex(device, precision=prec)
        got[prec] = timed(lambda: store.decide_batch(xq, lq, rq), device, repeats)
        stats[prec] = dict(store._index.stats)
    rows = []
    ok = same_decisions(got["float32"][2], got["float64"][2]) and stats["float32"]["float64"] == 0
    if not ok:
        print(f"DISAGREEMENT (or a float64 fallback): precision d={dim} n={n}: {stats}", file=sys.stderr)
    rows.append(row(f"precision d={dim} n={n}", dim, n, q, "torch f32-centred", got["float32"][0],
                    "torch f64", got["float64"][0], "queries/s", q, ok, stats=stats["float32"]))
    if reference:
        store.set_backend("reference", "cpu")
        med, _, decs = timed(lambda: store.decide_batch(xq, lq, rq), "cpu", repeats)
        ok = same_decisions(decs, got["float32"][2])
        if not ok:
            print(f"DISAGREEMENT: precision d={dim} n={n}: reference differs", file=sys.stderr)
        rows.append(row(f"precision d={dim} n={n}", dim, n, q, "torch f32-centred", got["float32"][0],
                        "reference", med, "queries/s", q, ok))
    return rows


# ----------------------------------------------------------------------------- report
def environment(device: str) -> dict:
    try:
        import faiss
    except ImportError:
        faiss = None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    env = {"device": device, "torch": torch.__version__, "faiss": faiss.__version__ if faiss else None,
           "python": platform.python_version(), "cpu": cpu, "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads() if faiss else None,
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
           "loadavg_start": list(os.getloadavg())}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def print_table(rows: list[dict]) -> None:
    print(f"{'case':<26} {'fast':<10} {'fast s':>9} {'baseline':<12} {'base s':>9} {'speedup':>8} "
          f"{'throughput':>14} agree")
    for r in rows:
        b = r["baseline"] or "-"
        sp = f"{r['speedup']:.1f}x" if r["speedup"] is not None else "-"
        print(f"{r['case']:<26} {r['fast']:<10} {_sec(r['fast_s']):>9} {b:<12} {_sec(r['baseline_s']):>9} {sp:>8} "
              f"{_rate(r['throughput']):>9} {r['throughput_unit'].split('/')[0][:5]:<5} {r['agree']}")


def _targets(run: dict) -> list[str]:
    """The issue's targets, judged from one run's rows (only those the run measured)."""
    out = []
    rows = run["results"]

    def find(case, baseline):
        return next((r for r in rows if r["case"] == case and r["baseline"] == baseline), None)

    if not run["device"].startswith("cuda"):
        loop = find("decide d=784 n=10000", "python-loop")
        ref = find("decide d=784 n=10000", "reference")
        if loop:
            out.append(f"FAISS >= 10x the per-query Python loop at 10,000 x 784: {loop['speedup']:.1f}x "
                       f"({'met' if loop['speedup'] >= 10 else 'NOT met'})")
        if ref:
            out.append(f"FAISS faster than the brute-force reference at 10,000 x 784: {ref['speedup']:.1f}x "
                       f"({'met' if ref['speedup'] > 1 else 'NOT met'})")
        st = find("stream d=784 n=100000", None)
        if st:
            out.append(f"100,000 x 784 certified end to end in under 2 minutes: {st['fast_s']:.1f} s "
                       f"({'met' if st['fast_s'] < 120 else 'NOT met'})")
    else:
        for r in rows:
            if r["n"] == 100_000 and r["baseline"] == "faiss":
                out.append(f"GPU >= 10x CPU FAISS, {r['case']}: {r['speedup']:.1f}x "
                           f"({'met' if r['speedup'] >= 10 else 'NOT met'})")
        if not run["env"].get("faiss"):
            out.append("GPU >= 10x CPU FAISS: not measured, faiss is not installed on this machine")
    return out


def _sec(x: float | None) -> str:
    return "-" if x is None else (f"{x:.3g}" if x < 10 else f"{x:.1f}")


def _rate(x: float | None) -> str:
    return "-" if x is None else (f"{x:.3g}" if x < 100 else f"{x:,.0f}")


def render_markdown(runs: list[dict], sources: list[str]) -> str:
    lines = ["# Storage-update certifier: region search benchmark", "",
             f"Generated by `python benchmarks/bench_regions.py --write-docs ... --inputs {' '.join(sources)}`"
             " from the JSON of each run; do not edit by hand.", "",
             "Each run certifies a synthetic stream (10 classes, within-class distances about 6, 30 % "
             "near-duplicate twins, radii in [0, 1.2], 10 % abstentions; see the script's docstring). "
             "`stream`: N inputs certified end to end by the fast backend, the store kept across "
             "chunks. `decide`: Q more inputs decided against the N stored regions. `decide-batch`: "
             "a larger batch of such inputs (up to 1024). Times are medians (repeated while a run takes "
             "under 2 s); `agree`: the script checked that both took identical decisions. At 150,528 "
             "features the FAISS backend hands blocks of more than 16 inputs to the torch search (FAISS's "
             "float32 error bound grows with D ||x||^2 and would let nearly every pair through), whose "
             "centred float32 filter bounds the error by gamma_1024 ||x - c||^2 (docs/THEORY.md section 6; "
             "the runs below were measured before it, with the float64 filter). `precision`: the torch "
             "search's centred float32 filter against its float64 filter on images-like rows at "
             "D = 150,528.", ""]
    for run in runs:
        env = run["env"]
        lines += [f"## {env['device']}: {env.get('gpu', env['cpu'])}", "",
                  f"torch {env['torch']}, faiss {env['faiss']}, Python {env['python']}; CPU {env['cpu']} "
                  f"({env['cpu_count']} cores), threads torch {env['torch_threads']} / faiss "
                  f"{env['faiss_threads']} (OMP_NUM_THREADS={env['OMP_NUM_THREADS']}); load average at "
                  f"start {env['loadavg_start'][0]:.2f}, at end {env.get('loadavg_end', [float('nan')])[0]:.2f}."
                  + (" Smoke run (tiny sizes)." if run.get("smoke") else ""), "",
                  "| case | Q | fast | fast s | baseline | baseline s | speedup | throughput | agree |",
                  "| --- | ---: | --- | ---: | --- | ---: | ---: | ---: | --- |"]
        for r in run["results"]:
            sp = f"{r['speedup']:.1f}x" if r["speedup"] is not None else "-"
            lines.append(f"| {r['case']} | {r['queries']} | {r['fast']} | {_sec(r['fast_s'])} | "
                         f"{r['baseline'] or '-'} | {_sec(r['baseline_s'])} | {sp} | "
                         f"{_rate(r['throughput'])} {r['throughput_unit']} | {'yes' if r['agree'] else 'NO'} |")
        targets = _targets(run)
        if targets:
            lines += ["", "Targets of the issue:", ""] + [f"- {t}" for t in targets]
        lines.append("")
    if not any(run["device"].startswith("cuda") for run in runs):
        lines += ["## GPU", "", "Not measured yet: run `python benchmarks/bench_regions.py --device cuda --json "
                  "docs/results/regions-cuda.json` on a GPU machine (with faiss-cpu installed for the FAISS "
                  "baseline), then regenerate this page with both JSON files as --inputs.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (seconds), for CI")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--cases", help="override sizes: DIMxN,DIMxN (e.g. 784x10000)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs while each takes under 2 s (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--progress", action="store_true", help="progress bars")
    ap.add_argument("--write-docs", metavar="MD", help="write the results page MD from --inputs (or this run)")
    ap.add_argument("--inputs", nargs="+", default=None, help="JSON files of earlier runs for --write-docs")
    ap.add_argument("--precision", metavar="NxQ", default=None,
                    help="the precision case: N stored, Q decided at D = 150,528 (default 2000x256; smoke 48x16; "
                         "0x0 skips it)")
    args = ap.parse_args(argv)

    if args.write_docs and args.inputs:
        runs = [read_json(p) for p in args.inputs]
        atomic_write_text(args.write_docs, render_markdown(runs, list(args.inputs)))
        print(f"wrote {args.write_docs}")
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.cases:
        cases = [tuple(int(v) for v in c.lower().split("x")) for c in args.cases.split(",")]
    else:
        cases = SMOKE_CASES if args.smoke else FULL_CASES
    env = environment(args.device)
    results: list[dict] = []
    t0 = time.perf_counter()
    for dim, n in cases:
        rows = run_case(dim, n, args.device, args.smoke, args.seed, args.repeats, args.progress)
        results += rows
        print_table(rows)
        sys.stdout.flush()
    pn, pq = ((int(v) for v in args.precision.lower().split("x")) if args.precision
              else PRECISION_SMOKE if args.smoke else PRECISION_FULL)
    if pn and pq:
        rows = precision_case(pn, pq, args.device, args.seed, args.repeats, reference=args.smoke or pn <= 2000)
        results += rows
        print_table(rows)
    env["loadavg_end"] = list(os.getloadavg())
    env["seconds"] = time.perf_counter() - t0
    run = {"device": args.device, "torch": torch.__version__, "smoke": args.smoke, "env": env, "results": results}
    print()
    print_table(results)
    if args.json:
        atomic_write_json(args.json, run)
    if args.write_docs:
        atomic_write_text(args.write_docs, render_markdown([run], [args.json or "(this run)"]))
    if not all(r["agree"] for r in results):
        print("backends disagree (see DISAGREEMENT above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
