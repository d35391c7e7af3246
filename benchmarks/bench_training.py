"""Ensemble training and certification throughput: vectorized groups against a serial RAB-style loop.

Training: the vectorized path (`certssb.smoothing.training.train_group`: one group of
Mc models, the group's fixed noisy inputs drawn through `noisy_copies`, one
fused Adam) against the original code's way (RAB, Weber et al.): one model at
a time, its noisy training set drawn with torch.randn and stored, its own
shuffling DataLoader, Adam. Same data, architecture, epochs, batch size and
hardware, in one run; reported as seconds per trained model and models per
hour. The one-time noise draw of the vectorized path is timed apart as well.

Certification: `certssb.certify.votes.collect_votes` with the Mc models as one group
(one forward of [Mc, b, ...] per batch of inputs) against the same models one
at a time; reported as inputs x models per second.

    python benchmarks/bench_training.py                       # CPU: MNIST 1-vs-0, mnist-cnn, Mc = 32
    python benchmarks/bench_training.py --device cuda         # GPU: Mc from free memory, full data
    python benchmarks/bench_training.py --smoke               # seconds (CI): embedded digits

Writes --json FILE ({"device", "torch", "build", "results": [...]}) and, except
with --smoke, the page docs/results/training.md (--md to change).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name as _device_name, print_table, result  # noqa: E402  (shared by all benchmarks)
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from certssb.certify.votes import collect_votes  # noqa: E402
from certssb.data import load_task  # noqa: E402
from certssb.smoothing.ensemble import EnsembleSpec, choose_group_size  # noqa: E402
from certssb.models import build_model, default_arch  # noqa: E402
from certssb.core.seeding import derive_seed  # noqa: E402
from certssb.smoothing.training import GroupNoise, Schedule, default_chunk, train_group  # noqa: E402
from certssb.models.grouped import GroupedModel  # noqa: E402
from certssb.report.training_page import engines_markdown, markdown, update_page  # noqa: E402
from certssb.smoothing.engine import (BENCH_VARIANTS_CPU, BENCH_VARIANTS_CUDA, Engine, parse_engine,  # noqa: E402
                                      resolve_engine)

SIGMA = 0.25


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds (CI)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--md", default=None, help="write the results page here (default docs/results/training.md; "
                                              "not with --smoke)")
    p.add_argument("--dataset", default=None, help="default mnist (digits with --smoke)")
    p.add_argument("--classes", default=None, help="default 1,0 (MNIST 1 vs 0)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--models", type=int, default=None,
                   help="group size Mc of the vectorized path (default: 32 on CPU, from free memory on GPU)")
    p.add_argument("--serial-models", type=int, default=None,
                   help="models trained by the serial loop (default 2; its time per model is what counts)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per model (default 20, the paper's)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the dataset's (MNIST 128)")
    p.add_argument("--max-train", type=int, default=None,
                   help="training samples (default: 2000 on CPU, all on GPU; 0 = all)")
    p.add_argument("--max-test", type=int, default=None, help="certified inputs (default 1000; 0 = all)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per path (median; default 3, GPU 1)")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="only rewrite the results page from a JSON file this script wrote (no timing)")
    p.add_argument("--engines", default=None,
                   help="also time these engines side by side (comma list, or 'all': the device's variants, "
                        "certssb.smoothing.engine); the first is the one the table's rows use (default: auto)")
    p.add_argument("--synthetic", action="store_true",
                   help="random images and labels of the task's shape and size instead of the real files "
                        "(same arithmetic; for machines without the dataset)")
    return p.parse_args(argv)


# (shape, train, test) of the class-pair tasks, for --synthetic
SYNTHETIC = {"mnist": ((1, 28, 28), 12665, 2115), "cifar10": ((3, 32, 32), 10000, 2000),
             "imagenette": ((3, 224, 224), 1900, 800), "digits": ((1, 8, 8), 288, 72)}


class _Synthetic:
    """A stand-in for TaskData: uniform random images, random labels of two classes."""

    def __init__(self, dataset: str, max_train: int, max_test: int):
        shape, n_train, n_test = SYNTHETIC[dataset]
        n_train = min(n_train, max_train) if max_train else n_train
        n_test = min(n_test, max_test) if max_test else n_test
        g = torch.Generator().manual_seed(0)
        self.x_train = torch.rand(n_train, *shape, generator=g)
        self.y_train = torch.randint(0, 2, (n_train,), generator=g)
        self.x_test = torch.rand(n_test, *shape, generator=g)
        self.image_shape = shape
        self.num_classes = 2


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fns: list, device: torch.device, repeats: int) -> list[tuple[dict, object]]:
    """For each fn: median/min/max seconds of `repeats` calls (CUDA synchronized) and its last result.

    The functions take turns (a, b, a, b, ...), so a change of machine load
    during the run weighs on both alike.
    """
    times: list[list[float]] = [[] for _ in fns]
    outs: list[object] = [None] * len(fns)
    for r in range(max(1, repeats)):
        for i, fn in enumerate(fns):
            sync(device)
            t0 = time.perf_counter()
            outs[i] = fn()
            sync(device)
            times[i].append(time.perf_counter() - t0)
            print(f"  repeat {r + 1}: {getattr(fn, '__name__', 'fn')} {times[i][-1]:.2f} s "
                  f"(load {os.getloadavg()[0]:.2f})", flush=True)
    return [({"median": statistics.median(t), "min": min(t), "max": max(t), "n": len(t)}, o)
            for t, o in zip(times, outs)]


# ----------------------------------------------------------------------------- the two training paths
def serial_rab_style(x, y, *, arch, shape, classes, schedule: Schedule, models: int, seed: int,
                     device: torch.device) -> list[torch.nn.Module]:
    """The original code's loop: per model, draw and store its noisy training set, own DataLoader, Adam."""
    out = []
    for k in range(models):
        torch.manual_seed(derive_seed(seed, "init", k))
        model = build_model(arch, shape[0], classes, shape[1:]).to(device).train()
        g = torch.Generator().manual_seed(derive_seed(seed, "serial-noise", k))
        noisy = x + SIGMA * torch.randn(x.shape, generator=g)  # stored for all epochs (RAB)
        loader = DataLoader(TensorDataset(noisy, y), batch_size=schedule.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(derive_seed(seed, "serial-order", k)))
        opt = torch.optim.Adam(model.parameters(), lr=schedule.lr)
        for _ in range(schedule.epochs):
            for xb, yb in loader:
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
        out.append(model.eval())
    return out


def vectorized(x, y, *, arch, shape, classes, schedule: Schedule, models: int, seed: int,
               device: torch.device, cache: bool, timings: dict, engine: Engine = Engine()) -> GroupedModel:
    """The ensemble's path: one group of `models` models, noise drawn once through noisy_copies."""
    plain = []
    for k in range(models):
        torch.manual_seed(derive_seed(seed, "init", k))
        plain.append(build_model(arch, shape[0], classes, shape[1:]))
    group = GroupedModel(plain)
    sigma = torch.full((x.shape[0],), SIGMA)
    sync(device)
    t0 = time.perf_counter()
    noise = GroupNoise(x, sigma, seed=seed, models=range(models), device=device, cache=cache)
    sync(device)
    timings["noise_s"] = time.perf_counter() - t0
    train_group(group, x, y, sigma, models=range(models), schedule=schedule, seed=seed, device=device,
                noise=noise, engine=engine)
    group.state_dicts()  # the weights as the checkpoints store them
    return group


# ----------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.render:
        data = json.loads(Path(args.render).read_text())
        md = Path(args.md) if args.md else ROOT / "docs" / "results" / "training.md"
        _write(md, update_page(md.read_text() if md.exists() else "", data["device_type"], markdown(data)))
        return data
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA GPU")
    gpu = device.type == "cuda"
    smoke = args.smoke
    dataset = args.dataset or ("digits" if smoke else "mnist")
    classes = args.classes or ("0,1" if dataset == "digits" else "1,0")
    max_train = args.max_train if args.max_train is not None else (200 if smoke else (0 if gpu else 2000))
    max_test = args.max_test if args.max_test is not None else (100 if smoke else 1000)
    if args.synthetic:
        task = _Synthetic(dataset, max_train, max_test)
    else:
        task = load_task(dataset, data_dir=args.data_dir, classes=classes, max_train=max_train or None,
                         max_test=max_test or None, seed=0)
    shape = tuple(task.image_shape)
    arch = default_arch(dataset, shape)
    batch = args.batch_size or (64 if dataset == "digits" else {"mnist": 128, "cifar10": 64}.get(dataset, 32))
    epochs = args.epochs or (1 if smoke else 20)
    schedule = Schedule(epochs, batch, 1e-3)
    x, y = task.x_train, task.y_train
    spec = EnsembleSpec(method="rab", arch=arch, in_channels=shape[0], num_classes=task.num_classes,
                        image_size=shape[1:], models=4096, schedule=schedule, seed=0, fingerprint="bench")
    mc = args.models or (4 if smoke else (choose_group_size(spec, x, device) if gpu else 32))
    serial_models = args.serial_models or (1 if smoke else 2)
    repeats = args.repeats or (1 if (smoke or gpu) else 3)
    cache = device.type == "cpu"
    chunk = default_chunk(build_model(arch, shape[0], task.num_classes, shape[1:]), mc, shape, batch, device)
    common = dict(arch=arch, shape=shape, classes=task.num_classes, schedule=schedule, seed=0, device=device)
    if args.engines == "all":
        engine_names = list(BENCH_VARIANTS_CUDA if gpu else BENCH_VARIANTS_CPU)
    elif args.engines:
        engine_names = args.engines.split(",")
    else:
        engine_names = [resolve_engine("auto", device, arch).name]
    engines = [parse_engine(e) for e in engine_names]
    primary = engines[0]
    load_start = list(os.getloadavg())
    print(f"[bench_training] {dataset} classes {classes}: {x.shape[0]} train / {task.x_test.shape[0]} test, "
          f"{arch}, {epochs} epochs, batch {batch}; vectorized Mc = {mc} (chunk {chunk}), serial "
          f"{serial_models} models; {repeats} repeat(s); device {device}, {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)

    # warm-up (kernel selection, JIT, allocator) on two batches, not timed
    # (2 full batches and one of the last batch's size: a compiled engine meets both shapes)
    warm = dict(common, schedule=Schedule(1, batch, 1e-3))
    n_warm = min(x.shape[0], 2 * batch + x.shape[0] % batch)
    serial_rab_style(x[:2 * batch], y[:2 * batch], models=1, **warm)
    vectorized(x[:n_warm], y[:n_warm], models=mc, cache=cache, timings={}, engine=primary, **warm)
    noise_times = []

    def vectorized_group():
        t = {}
        g = vectorized(x, y, models=mc, cache=cache, timings=t, engine=primary, **common)
        noise_times.append(t["noise_s"])
        return g

    def serial_loop():
        return serial_rab_style(x, y, models=serial_models, **common)

    (serial_t, _), (vec_t, group) = timed([serial_loop, vectorized_group], device, repeats)
    per_serial = _scale(serial_t, 1 / serial_models)
    per_vec = _scale(vec_t, 1 / mc)
    noise_s = statistics.median(noise_times)
    per_vec_no_noise = _scale(vec_t, 1 / mc, shift=-noise_s)
    results = [
        result(f"train {arch}: s per model (Mc={mc}, incl. noise draw)", per_vec, "serial RAB-style loop",
             per_serial, f"{3600 / per_vec['median']:.0f} models/h vs {3600 / per_serial['median']:.0f}",
             models_per_hour=3600 / per_vec["median"], baseline_models_per_hour=3600 / per_serial["median"]),
        result(f"train {arch}: s per model (Mc={mc}, excl. noise draw)", per_vec_no_noise, "serial RAB-style loop",
             per_serial, f"{3600 / per_vec_no_noise['median']:.0f} models/h",
             models_per_hour=3600 / per_vec_no_noise["median"]),
    ]

    engine_rows = [{"engine": primary.name, "ok": True, "s_per_model": per_vec["median"],
                    "spread": [per_vec["min"], per_vec["max"]], "speedup": per_serial["median"] / per_vec["median"],
                    "agreement": 1.0}]
    xt_clean = task.x_test[:128]
    ref_vote = _clean_votes(group, xt_clean, device)
    for eng in engines[1:]:  # every other engine: the same group, warmed up, timed alone
        print(f"[bench_training] engine {eng.name}", flush=True)
        try:
            vectorized(x[:n_warm], y[:n_warm], models=mc, cache=cache, timings={}, engine=eng, **warm)

            def run_engine(eng=eng):
                return vectorized(x, y, models=mc, cache=cache, timings={}, engine=eng, **common)
            run_engine.__name__ = f"engine {eng.name}"
            ((t_e, g_e),) = timed([run_engine], device, repeats)
            per = _scale(t_e, 1 / mc)
            engine_rows.append({"engine": eng.name, "ok": True, "s_per_model": per["median"],
                                "spread": [per["min"], per["max"]], "speedup": per_serial["median"] / per["median"],
                                "agreement": float((_clean_votes(g_e, xt_clean, device) == ref_vote)
                                                   .double().mean())})
        except Exception as e:  # a variant this device or torch cannot run: recorded, the others go on
            engine_rows.append({"engine": eng.name, "ok": False, "error": f"{type(e).__name__}: {e}"[:500]})
            print(f"[bench_training] engine {eng.name} failed: {e}", flush=True)
    ok_rows = [r for r in engine_rows if r["ok"] and r.get("agreement", 0) >= 0.9]
    fastest = min(ok_rows, key=lambda r: r["s_per_model"])["engine"] if ok_rows else primary.name

    # certification: the trained group at once against the same models one at a time
    xt = task.x_test.to(device)
    sig = torch.full((xt.shape[0],), SIGMA, device=device)
    group = group.to(device).eval()
    plain = [m.to(device).eval() for m in group.plain_models()]
    ks = list(range(mc))
    def certify_group():
        return collect_votes([(ks, group)], xt, sig, seed=0, num_classes=task.num_classes, batch_size=128,
                             device=device, engine=primary)

    def certify_one_by_one():
        return collect_votes(plain, xt, sig, seed=0, num_classes=task.num_classes, batch_size=128,
                             device=device)

    (cert_fast, v_fast), (cert_base, v_base) = timed([certify_group, certify_one_by_one], device, repeats)
    agree = float((v_fast.hard_count == v_base.hard_count).all(1).double().mean())
    work = xt.shape[0] * mc
    results.append(result(f"certify {xt.shape[0]} inputs x {mc} models", cert_fast, "one model at a time", cert_base,
                        f"{work / cert_fast['median']:.0f} vs {work / cert_base['median']:.0f} inputs*models/s",
                        inputs_models_per_s=work / cert_fast["median"],
                        baseline_inputs_models_per_s=work / cert_base["median"], vote_agreement=agree))

    data = {"device": _device_name(device), "device_type": device.type, "torch": torch.__version__,
            "build": _build_info(), "results": results, "engine": primary.as_dict(), "engines": engine_rows,
            "fastest_engine": fastest,
            "settings": {"dataset": dataset + (" (synthetic)" if args.synthetic else ""), "classes": classes,
                         "arch": arch, "n_train": int(x.shape[0]),
                         "n_test": int(xt.shape[0]), "epochs": epochs, "batch_size": batch, "lr": schedule.lr,
                         "group_size": mc, "chunk": chunk, "serial_models": serial_models,
                         "repeats": repeats, "noise_cache": cache, "noise_draw_s": noise_s,
                         "threads": torch.get_num_threads(), "load_average_start": load_start,
                         "load_average_end": list(os.getloadavg()),
                         "noise_backend": _noise_backend()}}
    print_table(results, unit="s", case_width=58, baseline_width=24)
    if len(engine_rows) > 1:
        print(engines_markdown(data))
    if args.json:
        _write(args.json, json.dumps(data, indent=2) + "\n")
    if not smoke or args.md:
        md = Path(args.md) if args.md else ROOT / "docs" / "results" / "training.md"
        old = md.read_text() if md.exists() else ""
        _write(md, update_page(old, device.type, markdown(data)))
    return data


@torch.no_grad()
def _clean_votes(group: GroupedModel, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The ensemble's majority class on clean inputs (a sanity check that an engine trained models)."""
    group = group.to(device).eval()
    logits = group(x.to(device).unsqueeze(0).expand(group.models, *x.shape))  # [Mc, B, K]
    return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).sum(0).argmax(-1).cpu()


def _scale(t: dict, factor: float, shift: float = 0.0) -> dict:
    return {k: ((v + shift) * factor if k != "n" else v) for k, v in t.items()}


def _build_info() -> dict:
    try:
        from certssb._ops import build_info
        return build_info()
    except Exception as e:  # the benchmark still runs on the reference paths
        return {"error": str(e)}


def _noise_backend() -> str:
    try:
        from certssb.kernels import current_backend  # present once the native kernels are merged
        return str(current_backend())
    except Exception:
        return "reference (pure PyTorch)"


def _write(path, text: str) -> None:
    from certssb.core.files import atomic_write_text
    atomic_write_text(path, text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
