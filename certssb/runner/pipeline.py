"""The whole run (docs/ARCHITECTURE.md section 1): data -> attack -> sigma -> ensemble -> certify -> report.

Each stage writes what it produced into the run directory, keyed by a
fingerprint of everything upstream, so a rerun with the same config reuses
finished work (no-defense model, sigma vectors, every finished ensemble model)
and a changed config never silently reuses stale work.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from ..attacks import input_trigger_norms, make_trigger, training_trigger_norm, poison_training_set, triggered_test_set
from ..certify.bounds import certified_radius, pa_lower, poison_budget
from ..certify.votes import VoteCheckpoint, certify_votes, collect_votes
from .config import RunConfig, resolve_device
from ..data import load_task
from ..core.distributed import Dist, all_reduce_votes
from ..smoothing.ensemble import EnsembleDir, EnsembleSpec
from ..smoothing.engine import Engine, resolve_engine
from ..smoothing.pretrained import PretrainedInit
from ..errors import CertssbError
from ..core.files import atomic_write_json, atomic_write_text, read_json, save_tensors
from ..kernels import using_backend
from ..models import build_model, default_arch
from ..smoothing.noise import Stream, normal, sample_ids
from ..certify.regions import RegionStore
from .rundir import RUN_FORMAT, RunDir, check_compatible, load_sigma, package_version
from .lock import run_lock
from ..report.certificates import write_certificates_csv
from ..report.metrics import split_metrics, update_variants
from ..report.table import format_table, plot_certified_accuracy
from ..core.seeding import derive_seed, generator
from ..smoothing.sigma import SigmaSearch, optimize_sigma, sigma_stats
from ..smoothing.training import Schedule, predict, train_classifier


def _hash(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


@dataclass
class Prepared:
    """Everything the stages after the attack need."""

    cfg: RunConfig
    task: object
    trigger: object
    poisoned: object
    triggered: object
    target_label: Optional[int]
    arch: str
    schedule: Schedule
    data_fp: str
    device: torch.device
    dist: Dist = field(default_factory=Dist)  # this process's rank under torchrun
    init: Optional[PretrainedInit] = None  # --init-weights: the pretrained backbone of every model

    def init_fp(self) -> tuple:
        """Fingerprint parts of --init-weights (none without it: fingerprints as before)."""
        return () if self.init is None else self.init.fingerprint()


def prepare(cfg: RunConfig, log: Callable[[str], None]) -> Prepared:
    """Stages 1-2: load the task, build the trigger, poison the training set, build test sets."""
    # decoded image files are cached in $CERTSSB_CACHE, else in the run directory (certssb.data.images)
    task = load_task(cfg.dataset, data_dir=cfg.data_dir, classes=cfg.classes, image_size=cfg.image_size,
                     max_train=cfg.max_train, max_test=cfg.max_test, seed=cfg.seed,
                     cache_dir=os.environ.get("CERTSSB_CACHE") or Path(cfg.out) / "cache")
    log(f"data: {task.name} classes {task.class_names} ({task.num_classes} classes), "
        f"{task.x_train.shape[0]} train / {task.x_test.shape[0]} test, image {tuple(task.image_shape)}; "
        f"{task.source}")
    target_label = None
    if not cfg.all_to_all:
        target = cfg.target
        if target is None:
            target = 0 if 0 in task.classes else task.classes[0]
        if target not in task.classes:
            raise CertssbError(f"--target {target} is not one of the task's classes {task.classes}; "
                               f"pick one of them")
        target_label = task.classes.index(target)
    trigger = build_trigger(cfg, tuple(task.image_shape))
    poisoned = poison_training_set(task.x_train, task.y_train, trigger, rate=cfg.poison_rate,
                                   target=target_label, all_to_all=cfg.all_to_all,
                                   num_classes=task.num_classes, seed=derive_seed(cfg.seed, "poison"))
    triggered = triggered_test_set(task.x_test, task.y_test, trigger, target=target_label,
                                   all_to_all=cfg.all_to_all, num_classes=task.num_classes)
    l2 = poisoned.trigger_l2
    log(f"attack: {cfg.trigger} delta={cfg.delta} (measured L2 mean {l2['mean']:.4f}, "
        f"max {l2['max']:.4f}), {len(poisoned.poison_idx)} poisoned training samples, "
        f"{'all-to-all' if cfg.all_to_all else f'target {task.class_names[target_label]}'}; "
        f"{triggered.x.shape[0]} triggered test inputs")
    arch = cfg.arch or default_arch(cfg.dataset, tuple(task.image_shape))
    schedule = Schedule(cfg.epochs, cfg.batch_size, cfg.lr)
    data_fp = _hash("data", RUN_FORMAT, task.describe(), trigger.describe(), cfg.poison_rate,
                    target_label, cfg.all_to_all, cfg.seed, poisoned.x, poisoned.y)
    init = None
    if cfg.init_weights is not None:
        c, h, w = task.image_shape
        init = PretrainedInit.load(cfg.init_weights, arch, c, task.num_classes, (h, w))
        log(f"init: every model starts from {cfg.init_weights} (sha256 {init.sha256[:16]}), heads re-initialised")
    return Prepared(cfg, task, trigger, poisoned, triggered, target_label, arch, schedule, data_fp,
                    resolve_device(cfg.device), init=init)


def build_trigger(cfg: RunConfig, image_shape: tuple[int, int, int]):
    """The run's trigger (its random parts seeded from the run's seed): the same in every command."""
    return make_trigger(cfg.trigger, cfg.delta, image_shape, seed=derive_seed(cfg.seed, "trigger") % (2 ** 31),
                        pixel=tuple(cfg.trigger_pixel) if cfg.trigger_pixel else None, options=cfg.trigger_options)


def _new_model(p: Prepared, purpose: str) -> torch.nn.Module:
    torch.manual_seed(derive_seed(p.cfg.seed, "init", purpose))
    c, h, w = p.task.image_shape
    model = build_model(p.arch, c, p.task.num_classes, (h, w))
    return model if p.init is None else p.init.apply(model)


def stage_no_defense(p: Prepared, out: Path, progress: bool, log) -> dict:
    """A plain model on the poisoned set: shows that the attack works without a defense."""
    fp = _hash("no-defense", p.data_fp, p.arch, p.schedule.as_dict(), *p.init_fp())
    path = out / "no_defense.json"
    if path.exists():
        saved = read_json(path)
        if saved.get("fingerprint") == fp:
            log("no-defense baseline: reused")
            return saved["metrics"]
    t0 = time.perf_counter()
    model = _new_model(p, "no-defense")
    with tqdm(total=p.schedule.epochs, desc="train no-defense model", unit="epoch",
              disable=not progress, leave=False) as bar:
        train_classifier(model, p.poisoned.x, p.poisoned.y, schedule=p.schedule,
                         seed=derive_seed(p.cfg.seed, "no-defense"), device=p.device, progress=bar)
    clean_pred = predict(model, p.task.x_test, device=p.device)
    trig_pred = predict(model, p.triggered.x, device=p.device)
    metrics = {"clean_accuracy": float((clean_pred == p.task.y_test).double().mean()),
               "attack_success_rate": float((trig_pred == p.triggered.y_target).double().mean()),
               "triggered_accuracy": float((trig_pred == p.triggered.y_true).double().mean()),
               "seconds": round(time.perf_counter() - t0, 3)}
    save_tensors(out / "models" / "no-defense.safetensors", model.state_dict())
    atomic_write_json(path, {"fingerprint": fp, "metrics": metrics})
    log(f"no-defense baseline: clean accuracy {metrics['clean_accuracy']:.3f}, "
        f"attack success rate {metrics['attack_success_rate']:.3f}")
    return metrics


def sigma_search(cfg: RunConfig) -> SigmaSearch:
    return SigmaSearch(sigma0=cfg.sigma0, steps=cfg.sigma_steps, draws=cfg.sigma_draws, lr=cfg.sigma_lr,
                       sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max)


def stage_sigma(p: Prepared, out: Path, progress: bool, log) -> tuple[dict[str, torch.Tensor], float]:
    """Base model with sigma0, then per-sample sigma for train, clean test and triggered test."""
    cfg = p.cfg
    search = sigma_search(cfg)
    fp = _hash("sigma", p.data_fp, p.arch, search.as_dict(), cfg.base_epochs, p.schedule.as_dict(), *p.init_fp())
    path = out / "sigma.safetensors"
    if path.exists():
        from safetensors import safe_open
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            if meta.get("fingerprint") == fp:
                sig = load_sigma(path, _sigma_sizes(p))  # checksum and values verified
                log("sigma: reused")
                return sig, float(meta.get("seconds", 0.0))
        except Exception as e:  # unreadable, damaged or invalid: never used, recomputed
            log(f"sigma: {path} is unusable ({e}); recomputing it")
    t0 = time.perf_counter()
    base = _new_model(p, "base")
    x, y = p.poisoned.x, p.poisoned.y
    d = x[0].numel()
    shape = x.shape[1:]
    base_seed = cfg.seed

    def base_noise(xb, idx, epoch):  # fresh BASE-stream noise every epoch
        eps = normal(base_seed, int(Stream.BASE), epoch, idx, d, device=xb.device)
        return xb + cfg.sigma0 * eps.view(-1, *shape)

    base_schedule = Schedule(cfg.base_epochs, cfg.batch_size, cfg.lr)
    with tqdm(total=base_schedule.epochs, desc="train base model (sigma0)", unit="epoch",
              disable=not progress, leave=False) as bar:
        train_classifier(base, x, y, schedule=base_schedule, seed=derive_seed(cfg.seed, "base"),
                         noise_fn=base_noise, device=p.device, progress=bar)
    save_tensors(out / "models" / "base.safetensors", base.state_dict())
    sets = {"train": x, "clean": p.task.x_test, "triggered": p.triggered.x}
    total = sum(v.shape[0] for v in sets.values())
    sig = {}
    with tqdm(total=total, desc="optimise sigma", unit="sample", disable=not progress, leave=False) as bar:
        for split, xs in sets.items():
            # eval_batch_size counts noisy images per pass: each sample brings `draws` of them
            sig[split] = optimize_sigma(base, xs, sample_ids(split, xs.shape[0]), search, seed=cfg.seed,
                                        batch_size=max(1, cfg.eval_batch_size // search.draws),
                                        device=p.device, progress=bar, engine=_engine(p))
    seconds = time.perf_counter() - t0
    save_tensors(path, sig, metadata={"certssb": "sigma", "fingerprint": fp, "seconds": f"{seconds:.3f}",
                                      "search": json.dumps(search.as_dict())})
    st = sigma_stats(sig["train"])
    log(f"sigma: train min {st['min']:.3f} median {st['median']:.3f} max {st['max']:.3f} "
        f"({seconds:.1f} s)")
    return sig, seconds


def _engine(p: Prepared) -> Engine:
    """The run's engine on its device (RunConfig.engine, 'auto' resolved per device and architecture)."""
    return resolve_engine(p.cfg.engine, p.device, p.arch)


def _ensemble(p: Prepared, out: Path, method: str, sigma_train: torch.Tensor) -> EnsembleDir:
    c, h, w = p.task.image_shape
    fp = _hash("ensemble", p.data_fp, method, sigma_train, *p.init_fp())
    spec = EnsembleSpec(method=method, arch=p.arch, in_channels=c, num_classes=p.task.num_classes,
                        image_size=(h, w), models=p.cfg.models, schedule=p.schedule, seed=p.cfg.seed,
                        fingerprint=fp, group_size=p.cfg.group_size, engine=_engine(p),
                        init=p.init)
    return EnsembleDir(out / "models" / method, spec)


def _storage_update(x: torch.Tensor, rows: dict, order: torch.Tensor, path: Path,
                    regions: Optional[RegionStore] = None, progress: bool = False,
                    device: Optional[torch.device] = None) -> tuple[list[str], dict]:
    """Storage update of one split in the recorded order, continuing a copy of `regions` if given
    (the continued store goes to path); query_order becomes the store's query number. The
    search runs on the run's GPU if it has one (same decisions on every backend)."""
    dev = device if device is not None and device.type == "cuda" else torch.device("cpu")
    if regions is None:
        store = RegionStore(dim=x[0].numel(), device=dev)
    else:
        store = regions.copy(backend="auto", device=dev)
    if store.dim is not None and store.dim != x[0].numel():
        raise CertssbError(f"--regions {(regions.source or {}).get('path', '')} holds inputs with {store.dim} "
                           f"features but this run's have {x[0].numel()}; pass a store written for the same "
                           "dataset and image size")
    rows["query_order"] = rows["query_order"] + store.n_queries
    labels, radii, kinds = store.certify_stream(x.reshape(x.shape[0], -1), rows["predict_raw"],
                                                rows["radius_raw"], rows["abstain"], order=order,
                                                progress=None if progress else False)
    rows["predict"] = labels.long()
    rows["radius"] = radii.double()
    store.save(path)
    counts = {"trimmed": kinds.count("trim"), "aligned": kinds.count("align"),
              "unchanged": kinds.count("none"), "abstained": kinds.count("abstain"),
              "backend": store.backend, "inputs_per_s": round(store.last_stream["inputs_per_s"], 1)}
    return kinds, counts


def stage_certify(p: Prepared, out: Path, method: str, ens: EnsembleDir, sigma: dict[str, torch.Tensor],
                  sigma_train_min: float, progress: bool, log, regions: Optional[RegionStore] = None) -> dict:
    """Votes of every model on clean + triggered inputs, certificates, storage update, CSVs, metrics.

    regions: a loaded region store (RegionStore.load) that the storage update of every split
    continues (each split a copy of it) instead of starting empty."""
    cfg = p.cfg
    t0 = time.perf_counter()
    splits = {"clean": (p.task.x_test, p.task.y_test, None, torch.arange(p.task.x_test.shape[0])),
              "triggered": (p.triggered.x, p.triggered.y_true, p.triggered.y_target, p.triggered.idx)}
    # the trigger each test input carries, for the poison budget (None: the nominal norm of an
    # additive trigger); a triggered input carries exactly the trigger of its clean original
    test_norms = input_trigger_norms(p.trigger, p.task.x_test)
    test_norms = {"clean": test_norms, "triggered": None if test_norms is None else test_norms[p.triggered.idx]}
    x_all = torch.cat([s[0] for s in splits.values()])
    sigma_all = torch.cat([sigma[name] for name in splits])
    # A killed certification continues voting where it stopped (single process: under torchrun
    # each rank holds other groups' votes). The key names everything the votes depend on.
    ckpt = None if p.dist.enabled else VoteCheckpoint(
        out / f"votes-{method}.partial.safetensors",
        _hash("votes", ens.spec.fingerprint, x_all, sigma_all, cfg.seed, cfg.eval_batch_size, cfg.backend,
              torch.device(p.device).type, *([] if _engine(p).is_default else [_engine(p).name])))
    start_votes, done = ckpt.load(x_all.shape[0], p.task.num_classes) if ckpt else (None, set())
    if done:
        log(f"{method}: continuing the votes of an interrupted certification ({len(done)} models counted)")
    with tqdm(total=cfg.models, initial=len(done), desc=f"certify {method}", unit="model",
              disable=not progress, leave=False) as bar:
        groups = (g for g in ens.iter_groups(device=p.device, dist=p.dist) if not set(g[0]) <= done)
        votes = collect_votes(groups, x_all, sigma_all, seed=cfg.seed,
                              num_classes=p.task.num_classes, batch_size=cfg.eval_batch_size,
                              device=p.device, progress=bar, votes=start_votes,
                              on_group=ckpt.saver(done) if ckpt else None, engine=_engine(p))
    all_reduce_votes(votes, p.dist)  # each rank voted with its own groups
    t_votes = time.perf_counter() - t0
    if not p.dist.is_main:
        return {}
    mode = "rab" if method == "rab" else "paper"
    norm = training_trigger_norm(cfg.trigger, cfg.delta, p.poisoned.trigger_l2["max"])
    result = {"clean": {}, "triggered": {}, "variants": {"no_update": {}, "storage_update": {}},
              "storage_update": {"applied": bool(cfg.storage_update and method == "cert-ssb")}}
    t_update = 0.0
    start = 0
    for split, (xs, ys, yt, idx) in splits.items():
        n = xs.shape[0]
        sub = votes.rows(start, start + n)
        start += n
        cert = certify_votes(sub, sigma[split], bound=cfg.bound, alpha=cfg.alpha, mode=mode,
                             sigma_train_min=sigma_train_min)
        if cfg.region_order == "random":
            order = torch.randperm(n, generator=generator(cfg.seed, "region-order", split))
        else:
            order = torch.arange(n)
        rows = {"idx": idx, "label": ys, "predict_raw": cert.predict, "radius_raw": cert.radius,
                "sigma": cert.sigma, "pA_lower": cert.pa_lower, "pB_upper": cert.pb_upper,
                "abstain": cert.abstain, "radius_conservative": cert.radius_conservative,
                "query_order": torch.empty(n, dtype=torch.int64).scatter_(0, order, torch.arange(n))}
        if yt is not None:
            rows["target"] = yt
        t1 = time.perf_counter()
        kinds, counts = _storage_update(xs, rows, order, out / f"regions-{method}-{split}.safetensors",
                                        regions, progress, torch.device(p.device))
        t_update += time.perf_counter() - t1
        applied = result["storage_update"]["applied"]
        # The CSV always holds both: predict/radius after the storage update, *_raw before it;
        # summary["methods"][m]["storage_update"]["applied"] says which one the headline uses.
        rows["poison_budget"] = poison_budget(rows["radius"], norm, test_norms[split])
        write_certificates_csv(out / f"certificates-{method}-{split}.csv", rows, kinds)
        with_update, no_update, result[split] = update_variants(
            rows, cfg.radii, triggered=yt is not None, applied=applied, conservative=mode == "paper")
        result["variants"]["storage_update"][split] = with_update
        result["variants"]["no_update"][split] = no_update
        # The same votes under the other bound (arithmetic on them, no new model call), without the
        # storage update: a new summary key beside the headline, which it leaves unchanged.
        other = "clopper-pearson" if cfg.bound != "clopper-pearson" else "hoeffding"
        oc = certify_votes(sub, sigma[split], bound=other, alpha=cfg.alpha, mode=mode,
                           sigma_train_min=sigma_train_min)
        other_rows = {"predict_raw": oc.predict, "radius_raw": oc.radius, "label": ys, "abstain": oc.abstain}
        if yt is not None:
            other_rows["target"] = yt
        result.setdefault("other_bound", {"bound": other, "storage_update": False})[split] = split_metrics(
            other_rows, cfg.radii, triggered=yt is not None, use_update=False, conservative=False)
        result["storage_update"][split] = counts
    su = result["storage_update"]
    su["trimmed"] = su["clean"]["trimmed"] + su["triggered"]["trimmed"]
    su["aligned"] = su["clean"]["aligned"] + su["triggered"]["aligned"]
    if regions is not None:
        su["continued"] = {"n": len(regions), "queries": regions.n_queries, **(regions.source or {})}
    result["seconds"] = {"votes": round(t_votes, 3), "storage_update": round(t_update, 3)}
    if ckpt is not None:
        ckpt.clear()  # every certificate of this method is written
    return result


def run(config: RunConfig | dict, *, train: bool = True, certify: bool = True, progress: bool = True,
        log: Optional[Callable[[str], None]] = None, regions: Optional[RegionStore] = None,
        results_dir: Optional[str | Path] = None) -> dict:
    """Run the whole pipeline and return the summary (also written to `<out>/summary.json`).

    config: a RunConfig or a dict of its fields. train=False certifies an existing
    run directory without training anything that is missing (`certssb certify`);
    certify=False stops after training (`certssb train`) and returns a summary
    without certificates. regions: a loaded RegionStore that the storage update of every
    split continues (`certssb certify --regions FILE`). results_dir: write the certification
    outputs (certificates, region stores, summary, table, plot) there instead of into the run
    directory, so one trained run can be certified under several settings side by side
    (`certssb grid` certifies each bound into its own folder).
    """
    cfg = RunConfig.from_dict(config) if isinstance(config, dict) else config
    if not isinstance(cfg, RunConfig):
        raise CertssbError(f"config must be a RunConfig or a dict of its fields, got {type(cfg).__name__}")
    cfg = cfg.resolve()
    dist = Dist.from_env()  # under torchrun: rank 0 writes the results, every rank trains and votes
    if not dist.is_main:
        log, progress = (lambda s: None), False
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    command = "certssb " + ("certify" if not train else "run" if certify else "train")
    # one writer per run directory (rank 0 under torchrun), and never one of another format
    with run_lock(cfg.out, command, enabled=dist.is_main):
        check_compatible(cfg.out)
        with using_backend(cfg.backend):  # every noise draw, vote and radius of this run
            return _run(cfg, dist, train=train, certify=certify, progress=progress, log=log, regions=regions,
                        results=Path(results_dir) if results_dir is not None else Path(cfg.out))


def _run(cfg: RunConfig, dist: Dist, *, train: bool, certify: bool, progress: bool,
         log: Callable[[str], None], regions: Optional[RegionStore], results: Path) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if dist.is_main:
        header = {"format": RUN_FORMAT, "certssb": package_version(), "torch": torch.__version__,
                  "python": platform.python_version(), "config": cfg.to_dict()}
        write_run_config = train or not (out / "config.json").exists() or results == out
        if write_run_config:
            atomic_write_json(out / "config.json", header)
        if results != out:  # certification settings of this results folder, beside its summary
            results.mkdir(parents=True, exist_ok=True)
            atomic_write_json(results / "config.json", {**header, "run_dir": str(out)})
    p = prepare(cfg, log)
    _warn_if_nothing_can_be_certified(cfg, p.task.num_classes, log)
    p.device = dist.device(p.device)
    p.dist = dist.init(p.device)
    engine = _engine(p)
    log(f"engine: {engine.name}" + (" (auto)" if cfg.engine == "auto" else ""))
    if dist.is_main:  # the resolved engine beside the setting, in config.json (and summary.json below)
        header["engine"] = engine.as_dict()
        if write_run_config:
            atomic_write_json(out / "config.json", header)
        if results != out:
            atomic_write_json(results / "config.json", {**header, "run_dir": str(out)})
    summary: dict = {
        "config": cfg.to_dict(),
        "versions": {"certssb": package_version(), "torch": torch.__version__, "python": platform.python_version()},
        "device": str(p.device),
        "engine": engine.as_dict(),
        "dataset": {"name": p.task.name, "classes": p.task.classes, "class_names": p.task.class_names,
                    "n_train": int(p.task.x_train.shape[0]), "n_test": int(p.task.x_test.shape[0]),
                    "n_triggered": int(p.triggered.x.shape[0]), "image_shape": list(p.task.image_shape),
                    "source": p.task.source},
        "attack": {"trigger": cfg.trigger, "delta": cfg.delta, "trigger_l2": p.poisoned.trigger_l2,
                   "poison_rate": cfg.poison_rate, "n_poisoned": int(len(p.poisoned.poison_idx)),
                   "target": None if p.target_label is None else p.task.classes[p.target_label],
                   "target_label": p.target_label, "all_to_all": cfg.all_to_all,
                   "trigger_params": p.trigger.describe()},
        "arch": p.arch,
        "no_defense": None if not dist.is_main else (
            stage_no_defense(p, out, progress, log) if train else RunDir(out, cfg).no_defense()),
        "methods": {},
    }
    sigma = None
    sigma_seconds = 0.0
    if "cert-ssb" in cfg.methods:
        if train and dist.is_main:
            sigma, sigma_seconds = stage_sigma(p, out, progress, log)
        elif dist.is_main:
            sigma = RunDir(out, cfg).sigma(_sigma_sizes(p))
        sigma = dist.broadcast_tensors(sigma, ("train", "clean", "triggered"))  # rank 0's, everywhere
    n_train = p.poisoned.x.shape[0]
    for method in cfg.methods:
        if method == "rab":
            sig = {"train": torch.full((n_train,), cfg.sigma0),
                   "clean": torch.full((p.task.x_test.shape[0],), cfg.sigma0),
                   "triggered": torch.full((p.triggered.x.shape[0],), cfg.sigma0)}
        else:
            sig = sigma
        ens = _ensemble(p, out, method, sig["train"])
        t0 = time.perf_counter()
        if train:
            stats = ens.train(p.poisoned.x, p.poisoned.y, sig["train"], device=p.device, progress=progress,
                              dist=p.dist)
            log(f"{method}: {stats['trained']} models trained, {stats['reused']} reused "
                f"({stats['seconds']:.1f} s)")
        t_train = time.perf_counter() - t0
        if not certify:
            summary["methods"][method] = {"models": cfg.models, "trained": True,
                                          "seconds": {"train": round(t_train, 3)}}
            continue
        res = stage_certify(p, results, method, ens, sig, float(sig["train"].min()), progress, log,
                            regions=regions)
        if not dist.is_main:
            continue
        m = {"models": cfg.models, "bound": cfg.bound, "alpha": cfg.alpha,
             "mode": "rab" if method == "rab" else "paper",
             "ceiling": radius_ceiling(cfg.bound, cfg.models, cfg.alpha, p.task.num_classes,
                                       float(torch.cat([sig["clean"], sig["triggered"]]).max())),
             "sigma": {k: sigma_stats(v) for k, v in sig.items()}, **res}
        m["sigma"].update(sigma_stats(sig["train"]))  # top level min/median/max = training sigmas
        m["seconds"].update({"sigma": round(sigma_seconds if method == "cert-ssb" else 0.0, 3),
                             "train": round(t_train, 3)})
        summary["methods"][method] = m
        c, t = m["clean"], m["triggered"]
        log(f"{method}: clean accuracy {c['accuracy']:.3f} (abstain {c['abstain_rate']:.3f}), "
            f"triggered robust accuracy {t['robust_accuracy']:.3f}, attack success {t['attack_success_rate']:.3f}")
    summary["seconds"] = round(time.perf_counter() - t_start, 3)
    dist.close()
    if not certify or not dist.is_main:
        return summary
    atomic_write_json(results / "summary.json", summary)
    plot_certified_accuracy(summary, results / "certified_accuracy.png")
    atomic_write_text(results / "table.txt", format_table(summary) + "\n")
    return summary


def radius_ceiling(bound: str, models: int, alpha: float, num_classes: int, sigma_max: float) -> dict:
    """The best certificate M models can give: pA_lower when every model agrees, and its radius."""
    pa = float(pa_lower(bound, top_score=torch.ones(1, dtype=torch.float64),
                        top_count=torch.full((1,), models), m=models, alpha=alpha,
                        num_classes=num_classes)[0])
    radius, _, _ = certified_radius(torch.tensor([pa], dtype=torch.float64), sigma_max)
    return {"pA_lower": pa, "radius": float(radius[0]), "sigma": sigma_max}


def min_models_to_certify(bound: str, alpha: float, num_classes: int, limit: int = 1 << 22) -> Optional[int]:
    """The smallest M whose unanimous vote gives pA_lower > 1/2 (a radius above 0), or None up to `limit`."""
    def certifies(m: int) -> bool:
        return radius_ceiling(bound, m, alpha, num_classes, 1.0)["pA_lower"] > 0.5

    hi = 1
    while not certifies(hi):
        if hi >= limit:
            return None
        hi *= 2
    lo = hi // 2  # certifies(lo) is False (or lo == 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if certifies(mid) else (mid, hi)
    return hi


def _warn_if_nothing_can_be_certified(cfg: RunConfig, num_classes: int, log: Callable[[str], None]) -> None:
    """Say before training when M is too small for the bound to certify any input at all."""
    if radius_ceiling(cfg.bound, cfg.models, cfg.alpha, num_classes, 1.0)["pA_lower"] > 0.5:
        return
    need = {b: min_models_to_certify(b, cfg.alpha, num_classes) for b in (cfg.bound, "clopper-pearson")}

    def fix(b: str) -> str:
        return f"--models {need[b]} or more" if need[b] else "a larger --alpha"

    log(f"warning: with M={cfg.models} models the {cfg.bound} bound at alpha={cfg.alpha} cannot certify any "
        f"input (even a unanimous vote gives pA_lower <= 1/2), so every prediction will abstain; use "
        f"{fix(cfg.bound)}" + (f" (clopper-pearson: {fix('clopper-pearson')})" if cfg.bound != "clopper-pearson" else ""))


def _sigma_sizes(p: Prepared) -> dict[str, int]:
    return {"train": int(p.poisoned.x.shape[0]), "clean": int(p.task.x_test.shape[0]),
            "triggered": int(p.triggered.x.shape[0])}
