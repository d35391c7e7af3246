"""Streaming certification under load: memory stays flat in the number of inputs.

One job: certify N synthetic MNIST-shaped inputs (1 x 28 x 28, two classes: bright left or
right half plus noise) with a small trained run (mnist-cnn, M = 16 models trained one epoch
on 512 synthetic images, RAB sigma 0.25, Clopper-Pearson at alpha 0.001), and record the
peak resident memory and the throughput of three ways, each in a fresh subprocess that
reports its own peak RSS (VmHWM, the high-water mark that resource.getrusage's ru_maxrss
also reports, except that Linux carries ru_maxrss over from the parent at exec) and wall time:

- stream: `certssb.runner.stream.certify_stream` over a generator of 1,000-input batches, chunks of
  1,000, with the storage update (checkpoint files, final CSV, store and summary included).
  The store keeps every certified ball (4 D + 32 bytes each, D = 784), by design;
- stream, no storage update: the same without the store: this memory must be flat;
- baseline: all N inputs at once, pipeline-style: one [N, 1, 28, 28] tensor,
  `collect_votes` over the ensemble, `certify_votes`, one `RegionStore.certify_stream` over
  all of them, nothing written.
A fourth subprocess only loads the run (the floor: Python, torch, the models). The flatness
figure is peak(N max) / peak(N min) of each way.

    python benchmarks/bench_stream.py --smoke                       # seconds (CI)
    OMP_NUM_THREADS=1 python benchmarks/bench_stream.py --json docs/results/stream-cpu.json \\
        --md docs/results/stream.md                                 # N = 1k, 10k, 100k (tens of minutes)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))  # this checkout's certssb, installed or not
from common import markdown_table, print_table, record, write_json  # noqa: E402

FULL_SIZES = (1_000, 10_000, 100_000)
SMOKE_SIZES = (200, 600)
BATCH = 1_000  # inputs per generated batch (and per chunk)
SHAPE = (1, 28, 28)


# ----------------------------------------------------------------------------- data and run
def synth(start: int, count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs start..start+count-1 of the synthetic stream (a pure function of seed and start)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + start)
    y = torch.randint(0, 2, (count,), generator=g)
    x = torch.rand((count, *SHAPE), generator=g) * 0.4
    x[y == 0, :, :, :14] += 0.5
    x[y == 1, :, :, 14:] += 0.5
    return x.clamp_(0, 1), y


def batches(n: int, batch: int):
    """The stream as a generator: never more than one batch in memory."""
    for start in range(0, n, batch):
        yield synth(start, min(batch, n - start))


def make_run(work: Path, smoke: bool) -> Path:
    """A small trained run directory (pipeline on a synthetic .npz), reused when it exists."""
    from certssb.runner import pipeline
    from certssb.runner.config import RunConfig

    run = work / ("run-smoke" if smoke else "run")
    if (run / "summary.json").is_file():
        return run
    xtr, ytr = synth(0, 128 if smoke else 512, seed=1)
    xte, yte = synth(0, 64 if smoke else 128, seed=2)
    npz = work / "synthetic.npz"
    np.savez(npz, x_train=xtr.numpy(), y_train=ytr.numpy(), x_test=xte.numpy(), y_test=yte.numpy())
    cfg = RunConfig(dataset="numpy", data_dir=str(npz), arch="mnist-cnn", method="rab", models=4 if smoke else 16,
                    epochs=1, bound="clopper-pearson", alpha=0.001, seed=0, device="cpu", out=str(run))
    pipeline.run(cfg, progress=False, log=lambda m: None)
    return run


# ----------------------------------------------------------------------------- one measured case
def child(mode: str, n: int, run: str, out: str, chunk: int) -> dict:
    """Run one case in this (fresh) process; returns seconds, peak RSS and counts."""
    from certssb.certify.votes import certify_votes, collect_votes
    from certssb.certify.regions import RegionStore
    from certssb.runner.stream import RunCertifier, certify_stream

    rc = RunCertifier(run, method="rab")
    t0 = time.perf_counter()
    info: dict = {}
    if mode == "floor":
        pass
    elif mode in ("stream", "stream-noupdate"):
        s = certify_stream(rc, batches(n, BATCH), out, chunk_size=chunk, storage_update=mode == "stream",
                           total=n)
        info = {"abstain_rate": s["abstain_rate"], "accuracy": s["accuracy"],
                "stored": n - s["region_update"]["abstain"] if mode == "stream" else 0,
                "region_update": s["region_update"]}
    elif mode == "baseline":
        x = torch.empty((n, *SHAPE))
        y = torch.empty(n, dtype=torch.int64)
        for start in range(0, n, BATCH):
            x[start:start + BATCH], y[start:start + BATCH] = synth(start, min(BATCH, n - start))
        sigma = torch.full((n,), float(rc.cfg.sigma0))
        votes = collect_votes(rc._groups, x, sigma, seed=rc.cfg.seed, num_classes=rc.num_classes,
                              batch_size=rc.cfg.eval_batch_size)
        cert = certify_votes(votes, sigma, bound=rc.cfg.bound, alpha=rc.cfg.alpha, mode="rab")
        store = RegionStore(dim=x[0].numel())
        labels, radii, kinds = store.certify_stream(x.reshape(n, -1), cert.predict, cert.radius, cert.abstain,
                                                    progress=False)
        info = {"abstain_rate": float(cert.abstain.double().mean()),
                "accuracy": float(((labels == y) & ~cert.abstain).double().mean()), "stored": len(store)}
    else:
        raise SystemExit(f"unknown mode {mode}")
    seconds = time.perf_counter() - t0
    return {"mode": mode, "n": n, "seconds": seconds, "peak_rss_mb": peak_rss_mb(),
            "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **info}


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB: VmHWM of /proc/self/status (the high-water mark of
    this process image), else ru_maxrss. Linux carries ru_maxrss over an exec, so a child started by a
    large parent would report at least the parent's size; VmHWM starts afresh."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(mode: str, n: int, run: Path, work: Path, chunk: int) -> dict:
    out = work / f"out-{mode}-{n}"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, "--child", mode, "--n", str(n), "--run", str(run),
                           "--out", str(out), "--chunk", str(chunk)], env=env, capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"case {mode} N={n} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median_case(mode: str, n: int, run: Path, work: Path, chunk: int, repeats: int) -> dict:
    """Median seconds (and max peak RSS) over repeats fresh processes."""
    runs = [measure(mode, n, run, work, chunk) for _ in range(repeats)]
    best = dict(runs[0])
    best["seconds"] = statistics.median(r["seconds"] for r in runs)
    best["spread"] = [min(r["seconds"] for r in runs), max(r["seconds"] for r in runs)]
    best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    best["repeats"] = repeats
    return best


# ----------------------------------------------------------------------------- report
def write_page(data: dict, path: Path) -> None:
    from certssb.core.files import atomic_write_text

    mem = data["memory"]
    rows = ["| N | stream s | stream inputs/s | stream peak MB | no-update s | no-update peak MB | "
            "baseline s | baseline peak MB | store MB |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["results"]:
        rows.append(f"| {r['n']:,} | {r['fast_s']:.1f} | {r['n'] / r['fast_s']:,.0f} | {r['peak_rss_mb']:.0f} | "
                    f"{r['no_update_s']:.1f} | {r['no_update_peak_rss_mb']:.0f} | {r['baseline_s']:.1f} | "
                    f"{r['baseline_peak_rss_mb']:.0f} | {r['store_mb']:.0f} |")
    text = f"""# Streaming certification: memory and throughput

Generated by `python benchmarks/bench_stream.py --json docs/results/stream-cpu.json --md {path}`
(`--from-json` rewrites this page from the JSON); do not edit by hand.

Setup: {data['setup']}. Each case ran once per repeat in a fresh process (peak RSS = that
process's VmHWM, Python + torch + the {data['models']} models included; the floor, a process
that only loads the run, peaks at {data['floor_rss_mb']:.0f} MB). `stream`: `certssb.runner.stream.certify_stream`
(chunks of {data['chunk']}, checkpoint files, CSV, summary, and the storage update's store);
`no-update`: the same without the storage update; `baseline`: all inputs at once as the pipeline
does (one input tensor, `collect_votes`, `certify_votes`, one storage update over all). Times are
medians of {data['repeats_small']} runs for N <= 10,000 and single runs above; load average at start
{data['load'][0]:.2f}, at end {data['load'][1]:.2f} (2 shared cores).

{chr(10).join(rows)}

Memory, peak(N = {mem['n_max']:,}) / peak(N = {mem['n_min']:,}):

- stream without the storage update: **{mem['no_update_ratio']:.2f}x** (flat: chunks, votes and certificates
  never grow with N);
- stream with the storage update: {mem['stream_ratio']:.2f}x. The growth is the storage-update certifier's
  own state, not the stream's: the store keeps every certified ball ({mem['store_mb_max']:.0f} MB at
  N = {mem['n_max']:,}, 4 D + 32 bytes each), and its candidate search needs working memory that grows
  with the store up to a bound (peak minus store bytes: {mem['stream_minus_store_ratio']:.2f}x). Here every
  radius is below 0.08, too small for FAISS's float32 filter to be provably safe in 784 dimensions, so
  the search runs in float64 tiles (`certssb.certify.region_search.TorchDenseIndex` on the CPU: a float64 copy of up
  to 21,399 stored rows and [256, 21,399] distance tiles, about 0.3 GB in all), which stops growing once
  the store holds 21,399 rows; beyond that the peak grows with the store (plus allocator slack). The
  final `regions.safetensors` is written streaming, without a second copy of the store;
- baseline (all at once): {mem['baseline_ratio']:.2f}x (the N inputs, plus the same store and search).

Time: without the storage update the stream certifies at the rate of the ensemble's forward passes
(N = {mem['n_max']:,}: {mem['no_update_s_max']:.0f} s). The storage update's exact search costs O(N^2 D) over a
stream (each input against every stored ball; float64 here, see above), which dominates at N = {mem['n_max']:,}
for the stream and the baseline alike; `docs/results/regions.md` has the search's own benchmark (FAISS
float32 filtering at larger radii: 100,000 x 784 in 74 s).

Results table in the shared benchmark format (fast = stream, baseline = all at once):

{markdown_table(data)}
"""
    atomic_write_text(path, text)
    print(f"wrote {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu only (the stream job's device is the run's)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds (CI)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--md", default=None, help="write the results page (docs/results/stream.md)")
    p.add_argument("--sizes", default=None, help="comma list of N (default 1000,10000,100000)")
    p.add_argument("--repeats", type=int, default=None, help="runs per case for N <= 10,000 (default 3; smoke 1)")
    p.add_argument("--work", default=None, help="folder for the run and outputs (default: a temporary one)")
    p.add_argument("--from-json", default=None, help="only rewrite the --md page from this JSON of an earlier run")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--run", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=BATCH, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child == "make-run":
        print(json.dumps({"run": str(make_run(Path(args.out), args.smoke))}))
        return 0
    if args.child:
        print(json.dumps(child(args.child, args.n, args.run, args.out, args.chunk)))
        return 0
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        data["memory"].setdefault("no_update_s_max", max(r["no_update_s"] for r in data["results"]))
        write_page(data, Path(args.md or ROOT / "docs" / "results" / "stream.md"))
        return 0
    if args.device != "cpu":
        raise SystemExit("bench_stream measures CPU memory; run it with --device cpu")
    sizes = tuple(int(v) for v in args.sizes.split(",")) if args.sizes else (SMOKE_SIZES if args.smoke else FULL_SIZES)
    chunk = 100 if args.smoke else BATCH
    repeats = args.repeats or (1 if args.smoke else 3)
    load0 = os.getloadavg()[0]
    tmp = None
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-stream-")
        work = Path(tmp.name)
    try:
        # in a child too: this process stays small, so nothing it holds can inflate a child's peak
        made = subprocess.run([sys.executable, __file__, "--child", "make-run", "--out", str(work)]
                              + (["--smoke"] if args.smoke else []), capture_output=True, text=True)
        if made.returncode != 0:
            raise SystemExit(f"could not make the run:\n{made.stderr[-3000:]}")
        run = Path(json.loads(made.stdout.strip().splitlines()[-1])["run"])
        floor = measure("floor", 0, run, work, chunk)
        results = []
        cases = {}
        for n in sizes:
            reps = repeats if n <= 10_000 else 1
            st = median_case("stream", n, run, work, chunk, reps)
            nu = median_case("stream-noupdate", n, run, work, chunk, reps)
            bl = median_case("baseline", n, run, work, chunk, reps)
            cases[n] = (st, nu, bl)
            store_mb = st["stored"] * (4 * int(np.prod(SHAPE)) + 32) / 2**20
            results.append({
                "case": f"certify N={n}", "n": n, "fast_s": st["seconds"], "fast_spread": st["spread"],
                "baseline": "all at once (collect_votes)", "baseline_s": bl["seconds"],
                "baseline_spread": bl["spread"], "speedup": bl["seconds"] / st["seconds"],
                "throughput": f"{n / st['seconds']:,.0f} inputs/s", "peak_rss_mb": st["peak_rss_mb"],
                "no_update_s": nu["seconds"], "no_update_peak_rss_mb": nu["peak_rss_mb"],
                "baseline_peak_rss_mb": bl["peak_rss_mb"], "store_mb": store_mb, "stored": st["stored"],
                "abstain_rate": st["abstain_rate"], "accuracy": st["accuracy"],
                "region_update": st.get("region_update"), "repeats": reps,
                "agree": abs(st["accuracy"] - bl["accuracy"]) < 1e-12 and st["stored"] == bl["stored"]})
            print(f"N={n}: stream {st['seconds']:.1f}s {st['peak_rss_mb']:.0f}MB, no-update {nu['seconds']:.1f}s "
                  f"{nu['peak_rss_mb']:.0f}MB, baseline {bl['seconds']:.1f}s {bl['peak_rss_mb']:.0f}MB", flush=True)
        lo, hi = min(sizes), max(sizes)
        st_lo, nu_lo, bl_lo = cases[lo]
        st_hi, nu_hi, bl_hi = cases[hi]
        store_hi = next(r["store_mb"] for r in results if r["n"] == hi)
        store_lo = next(r["store_mb"] for r in results if r["n"] == lo)
        memory = {"n_min": lo, "n_max": hi,
                  "stream_ratio": st_hi["peak_rss_mb"] / st_lo["peak_rss_mb"],
                  "no_update_ratio": nu_hi["peak_rss_mb"] / nu_lo["peak_rss_mb"],
                  "baseline_ratio": bl_hi["peak_rss_mb"] / bl_lo["peak_rss_mb"],
                  "stream_minus_store_ratio": (st_hi["peak_rss_mb"] - store_hi) / (st_lo["peak_rss_mb"] - store_lo),
                  "store_mb_max": store_hi, "no_update_s_max": nu_hi["seconds"]}
        data = record(torch.device("cpu"), results, memory=memory, floor_rss_mb=floor["peak_rss_mb"],
                      models=16 if not args.smoke else 4, chunk=chunk, repeats_small=repeats,
                      load=[load0, os.getloadavg()[0]], omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                      setup=("synthetic 1x28x28 inputs, mnist-cnn, M = " + ("4" if args.smoke else "16")
                             + " (RAB, sigma 0.25, Clopper-Pearson alpha 0.001), CPU"))
        print_table(results)
        print(f"memory peak ratio N={hi:,}/N={lo:,}: stream {memory['stream_ratio']:.2f}x, no storage update "
              f"{memory['no_update_ratio']:.2f}x, baseline {memory['baseline_ratio']:.2f}x")
        write_json(args.json, data)
        if args.md:
            write_page(data, Path(args.md))
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
