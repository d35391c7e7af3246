"""Shared plumbing of the benchmark scripts: timing, the JSON record, the printed table, the docs page.

Every script times its fast path and its baselines side by side in one run and
writes {"device", "torch", "build", "results": [{"case", "fast_s", "baseline",
"baseline_s", "speedup", "throughput", ...}]}. Times are medians of repeats
(with min and max kept as the spread); CUDA work is synchronized around each
repeat.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds (CI)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (median reported)")
    return p


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 1) -> dict:
    """Median, min and max seconds of `repeats` calls of fn after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": len(times)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads ({os.cpu_count()} cores visible)"


def record(device: torch.device, results: list[dict], **extra) -> dict:
    from certssb._ops import build_info

    return {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
            "build": build_info(), "results": results, **extra}


def result(case: str, fast: dict, baseline: str, base: dict, throughput: str, **extra) -> dict:
    """One row: the fast path against one baseline."""
    return {"case": case, "fast_s": fast["median"], "fast_spread": [fast["min"], fast["max"]],
            "baseline": baseline, "baseline_s": base["median"], "baseline_spread": [base["min"], base["max"]],
            "speedup": base["median"] / fast["median"] if fast["median"] > 0 else float("inf"),
            "throughput": throughput, **extra}


def print_table(results: list[dict], *, unit: str = "ms", case_width: int = 44, baseline_width: int = 28) -> None:
    """The rows of `result` as a table; times in ms (9 columns with the unit) or s (10 columns)."""
    head = f"{'case':{case_width}s} {'fast':>10s} {'baseline':{baseline_width}s} {'base':>10s} {'speedup':>8s}  throughput"
    print(head)
    print("-" * len(head))

    def t(seconds: float) -> str:
        return f"{seconds * 1e3:8.2f}ms" if unit == "ms" else f"{seconds:9.3f}s"

    for r in results:
        print(f"{r['case']:{case_width}s} {t(r['fast_s'])} {r['baseline']:{baseline_width}s} "
              f"{t(r['baseline_s'])} {r['speedup']:7.2f}x  {r['throughput']}")


def write_json(path: str | None, data: dict) -> None:
    if path:
        from certssb.core.files import atomic_write_json

        atomic_write_json(path, data)
        print(f"wrote {path}")


def markdown_table(data: dict) -> str:
    lines = [f"Device: {data['device']}; torch {data['torch']}; build: CUDA "
             f"{'on' if data['build'].get('cuda') else 'off'}, OpenMP "
             f"{'on' if data['build'].get('openmp') else 'off'}.", "",
             "| case | fast (ms) | baseline | baseline (ms) | speedup | throughput |",
             "|---|---:|---|---:|---:|---|"]
    for r in data["results"]:
        lines.append(f"| {r['case']} | {r['fast_s'] * 1e3:.3f} | {r['baseline']} | "
                     f"{r['baseline_s'] * 1e3:.3f} | {r['speedup']:.2f}x | {r['throughput']} |")
    return "\n".join(lines)


def load_json(path: str | os.PathLike) -> dict:
    with open(path) as f:
        return json.load(f)
