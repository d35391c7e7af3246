"""benchmarks/gpu_checks.sh: its CPU dry run, and `certssb pages --gpu-checks` on a hand-made record."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from certssb.errors import CertssbError
from certssb.report.gpu_checks import import_gpu_checks
from certssb.report.pages import write_pages

ROOT = Path(__file__).resolve().parents[1]


def _curve(top: float) -> dict:
    return {"0.0": top, "0.25": top - 0.01, "0.5": 0.0}


def _method(top: float, sigma: float) -> dict:
    split = {"accuracy": top, "abstain_rate": 0.0, "attack_success_rate": 0.0, "robust_accuracy": top,
             "certified_accuracy": _curve(top)}
    return {"models": 1000, "bound": "hoeffding", "alpha": 0.001, "mode": "paper",
            "ceiling": {"pA_lower": 0.96, "radius": 0.21, "sigma": sigma},
            "sigma": {"clean": {"min": sigma, "median": sigma, "mean": sigma, "max": sigma}},
            "clean": split, "triggered": dict(split),
            "variants": {"storage_update": {"clean": {"certified_accuracy": _curve(top)},
                                            "triggered": {"certified_accuracy": _curve(top)}},
                         "no_update": {"clean": {"certified_accuracy": _curve(top)},
                                       "triggered": {"certified_accuracy": _curve(top)}}}}


def _summary(method: str, sigma0: float) -> dict:
    return {"config": {"dataset": "mnist", "models": 1000, "epochs": 20, "batch_size": 128, "lr": 0.001,
                       "sigma0": sigma0, "seed": 0, "alpha": 0.001, "method": method, "engine": "bf16"},
            "engine": {"name": "bf16"}, "arch": "mnist-cnn",
            "dataset": {"name": "mnist", "class_names": ["1", "0"], "n_train": 12665, "n_test": 2115,
                        "n_triggered": 980, "image_shape": [1, 28, 28]},
            "attack": {"trigger": "onepixel", "delta": 1.0, "n_poisoned": 253, "trigger_l2": {"max": 1.0},
                       "target": 0},
            "no_defense": {"clean_accuracy": 0.999, "attack_success_rate": 1.0},
            "methods": {method: _method(0.99 if method == "cert-ssb" else 0.98, 0.24 if method == "cert-ssb" else sigma0)}}


def hand_made(tmp_path: Path) -> Path:
    cells = []
    for name, method, point in (("default", "cert-ssb", {}),
                                ("method-rab_sigma0-0.12", "rab", {"method": "rab", "sigma0": 0.12})):
        s = _summary(method, 0.12)
        cells.append({"experiment": "mnist-1v0-published", "scale": "full", "cell": name, "seconds": 80.0,
                      "models": 1000, "epochs": 20, "summary": s,
                      "summaries": {"hoeffding": s, "clopper-pearson": s},
                      "record": {"format": 1, "status": "done", "experiment": "mnist-1v0-published",
                                 "scale": "full", "reduced": False, "cell": name, "point": point,
                                 "config": {"dataset": "mnist", "method": method, "engine": "bf16",
                                            "data_dir": "/machine/path"},
                                 "bounds": ["hoeffding", "clopper-pearson"],
                                 "seconds": {"train": 60.0, "certify_hoeffding": 10.0, "certify_clopper-pearson": 10.0},
                                 "hardware": {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11", "host": "gpu-7"},
                                 "finished": "2026-12-01 10:00:00 UTC"}})
    row = {"case": "train mnist-cnn: s per model (Mc=1000, incl. noise draw)", "fast_s": 0.004,
           "fast_spread": [0.004, 0.004], "baseline": "serial RAB-style loop", "baseline_s": 0.5,
           "baseline_spread": [0.5, 0.5], "speedup": 125.0, "throughput": "900000 models/h vs 7200"}
    bench = {"device": "NVIDIA H100 80GB HBM3", "device_type": "cuda", "torch": "2.11", "results": [row],
             "engine": {"name": "bf16"}, "fastest_engine": "bf16+graph",
             "engines": [{"engine": "bf16", "ok": True, "s_per_model": 0.004, "spread": [0.004, 0.004],
                          "speedup": 125.0, "agreement": 1.0},
                         {"engine": "bf16+graph", "ok": True, "s_per_model": 0.003, "spread": [0.003, 0.003],
                          "speedup": 166.7, "agreement": 0.99},
                         {"engine": "bf16+compile", "ok": False, "error": "RuntimeError: inductor"}],
             "settings": {"dataset": "mnist", "classes": "1,0", "arch": "mnist-cnn", "n_train": 12665,
                          "n_test": 1000, "epochs": 1, "batch_size": 128, "lr": 0.001, "group_size": 1000,
                          "chunk": 1000, "serial_models": 2, "repeats": 1, "noise_cache": False,
                          "noise_draw_s": 0.0, "threads": 16, "load_average_start": [1.0], "load_average_end": [2.0],
                          "noise_backend": "kernels"}}
    data = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11", "date": "2026-12-01 10:09:00 UTC",
            "steps": [{"name": "build", "seconds": 70.0, "ok": True},
                      {"name": "cell-mnist-1v0-published", "seconds": 170.0, "ok": True},
                      {"name": "cell-cifar10-airplane-bird", "seconds": 0.0, "ok": None}],
            "cells": cells, "benchmarks": {"training": bench}}
    path = tmp_path / "gpu-checks.json"
    path.write_text(json.dumps(data))
    return path


def test_pages_from_a_hand_made_gpu_checks_json(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the pages read experiments/<name>.json for titles and published figures
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "training.md").write_text("# Ensemble training\n\n<!-- bench_training:cpu -->\nCPU part\n"
                                      "<!-- /bench_training:cpu -->\n")
    written = import_gpu_checks(hand_made(tmp_path), docs)
    kept = docs / "cells" / "mnist-1v0-published" / "full" / "default"
    assert (kept / "cell.json").exists() and (kept / "clopper-pearson.json").exists()
    rec = json.loads((kept / "cell.json").read_text())
    assert "host" not in rec["hardware"] and "data_dir" not in rec["config"]  # machine details dropped
    training = (docs / "training.md").read_text()
    assert "CPU part" in training  # the CPU section is kept
    assert "## CUDA: NVIDIA H100" in training and "bf16+graph" in training and "125.00x" in training
    assert "cell-mnist-1v0-published 170 s" in training and "failed: RuntimeError" in training
    pages = write_pages(tmp_path / "no-runs", docs)
    mnist = (docs / "mnist.md").read_text()
    assert docs / "mnist.md" in pages and docs / "training.md" in written
    assert "full scale" in mnist and "REDUCED" not in mnist.split("## ")[1]
    assert "M = 1000 models per method, 20 epoch(s)" in mnist and "NVIDIA H100" in mnist
    assert "clopper-pearson" in mnist and "Published figures" in mnist


def test_a_dry_run_record_is_not_kept(tmp_path):
    path = hand_made(tmp_path)
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "dry_run": True}))
    with pytest.raises(CertssbError, match="dry-run"):
        import_gpu_checks(path, tmp_path / "docs")
    with pytest.raises(CertssbError, match="not a gpu-checks"):
        (tmp_path / "x.json").write_text("{}")
        import_gpu_checks(tmp_path / "x.json", tmp_path / "docs")


def test_gpu_checks_dry_run_on_the_cpu(tmp_path):
    """The CI step: the whole script, CPU stand-ins, well under a minute; a complete record."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_checks.sh"), "--dry-run", str(out)],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and "gpu-checks.json" in files
    data = json.loads((out / "gpu-checks.json").read_text())
    assert set(data) >= {"device", "torch", "date", "steps", "cells"} and data["dry_run"]
    assert all(s["ok"] in (True, None) for s in data["steps"]), data["steps"]
    assert {s["name"] for s in data["steps"]} >= {"build", "needs_cuda-tests", "bench_kernels", "bench_training",
                                                   "cell-mnist-1v0-published", "cell-cifar10-airplane-bird"}
    (cell,) = data["cells"]
    assert cell["experiment"] == "mnist-1v0-published" and set(cell["summaries"]) == {"hoeffding", "clopper-pearson"}
    assert cell["summary"]["engine"]["name"] == "fp32"
    assert data["benchmarks"]["training"]["fastest_engine"]
