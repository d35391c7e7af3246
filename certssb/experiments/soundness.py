"""Empirical soundness checks: do certified predictions survive perturbations below their radius?

This file's one job is the empirical soundness experiment, built from the
package's own pipeline pieces (`data.load_task`, `training.train_group`,
`certify.collect_votes` / `certify_votes`) with one global sigma (RAB, the mode
whose radius is a theorem, docs/THEORY.md 4.2):

1. Train an ensemble of M smoothed models on clean data with fixed seeds and
   certify every test input: prediction c_i, radius R_i.
2. Test-time perturbations: move every certified input by `inside * R_i`
   (default 0.999 R_i) in a random direction and in the gradient direction
   (descent of the ensemble's soft-vote margin, averaged over the M models and
   their own test noise), re-vote with the SAME noise and count the inputs
   whose smoothed prediction changed. Controls at multiples of R_i outside the
   ball show that the check sees changes where the certificate claims nothing.
3. Backdoor: with eps = a quantile of the radii, perturb `poisoned` training
   samples of the target class toward the mean of the other classes (labels
   unchanged: the certificate covers feature perturbations, THEORY 1) and add
   a test trigger to every test input, so that the JOINT L2 norm
   sqrt(sum_i ||d_i||^2 + ||d||^2) = (1 - margin) * eps; retrain with the SAME
   seeds (same init, batch order and noise per (model, sample): noise is a pure
   function of (seed, stream, model, sample)) and compare the prediction of
   every input certified beyond eps.

The certificate holds for the smoothed classifier (an expectation); the
ensemble's vote estimates it with M models. So a changed vote is counted as
"changed", and as "contradicted" when the new vote even certifies another
class (two certificates that cannot both hold). Each certificate may fail with
probability alpha, so about alpha * tried failures are allowed (THEORY 3.4).
Example::

    report = run_soundness(SoundnessConfig(dataset="digits", models=8, epochs=1))
    print(format_markdown(report))
"""
from __future__ import annotations

import dataclasses
import math
import os
import platform
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..certify.bounds import BOUNDS
from ..certify.votes import Certificates, certify_votes, collect_votes
from ..runner.config import DATASET_DEFAULTS
from ..data import TaskData, load_task
from ..smoothing.ensemble import CPU_GROUP_CAP, EnsembleSpec, group_ranges
from ..errors import CertssbError
from ..models import default_arch
from ..smoothing.noise import Stream, noisy_copies
from ..core.seeding import generator
from ..smoothing.training import GroupNoise, Schedule, train_group
from ..models.grouped import GroupedModel

__all__ = ["SoundnessConfig", "Ensemble", "train_ensemble", "certify_inputs", "margin_gradient",
           "unit_directions", "perturbation_check", "plant_backdoor", "backdoor_check", "run_soundness",
           "check_report", "format_markdown", "SOUNDNESS_DATASETS"]

SOUNDNESS_DATASETS = ("digits", "mnist")
_DEFAULT_CLASSES = {"digits": None, "mnist": [1, 0]}  # MNIST 1-vs-0, the paper's task
# Keep a group's noisy training set in memory (faster) only while it is this small.
_NOISE_CACHE_BYTES = 256 << 20


@dataclass
class SoundnessConfig:
    """Every knob of the experiment (the JSON report records all of them)."""

    dataset: str = "digits"
    data_dir: Optional[str] = None
    classes: Optional[list[int]] = None  # None: every digit (digits), 1-vs-0 (mnist)
    max_train: Optional[int] = None
    max_test: Optional[int] = None
    models: int = 50
    epochs: int = 5
    batch_size: Optional[int] = None  # None: the dataset's default
    lr: Optional[float] = None
    sigma: float = 0.25
    bound: str = "clopper-pearson"
    alpha: float = 0.001
    seed: int = 0
    group_size: Optional[int] = None  # None: min(models, 32); the same for both trainings
    eval_batch_size: int = 256
    inside: float = 0.999  # test-time perturbation norm / R_i (< 1: inside the certified ball)
    control_scales: tuple[float, ...] = (2.0, 4.0, 8.0, 16.0, 32.0)  # outside the ball: controls
    eps_quantile: float = 0.5  # eps = this quantile of the certified radii
    poisoned: int = 16  # training samples the backdoor perturbs
    train_share: float = 0.5  # share of the joint squared norm spent on the training samples
    margin: float = 1e-3  # joint norm = (1 - margin) * eps
    target: int = 0  # task label the training perturbation pushes toward (labels unchanged)

    def validate(self) -> None:
        """Raise CertssbError naming the first bad setting and what to do."""
        if self.dataset not in SOUNDNESS_DATASETS:
            raise CertssbError(f"dataset must be one of {', '.join(SOUNDNESS_DATASETS)}, got {self.dataset!r}")
        if self.bound not in BOUNDS:
            raise CertssbError(f"unknown bound {self.bound!r}; choose one of {', '.join(BOUNDS)}")
        for name in ("models", "epochs", "eval_batch_size", "poisoned"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise CertssbError(f"{name} must be an integer >= 1, got {v!r}")
        if not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma) and self.sigma > 0):
            raise CertssbError(f"sigma must be a finite number > 0, got {self.sigma!r}")
        for name, lo, hi in (("alpha", 0.0, 1.0), ("inside", 0.0, 1.0), ("eps_quantile", 0.0, 1.0),
                             ("train_share", 0.0, 1.0), ("margin", 0.0, 1.0)):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and lo < v < hi):
                raise CertssbError(f"{name} must lie strictly between {lo} and {hi}, got {v!r}")
        if any(not (isinstance(s, (int, float)) and s > 1) for s in self.control_scales):
            raise CertssbError(f"control_scales must all be > 1 (outside the ball), got {self.control_scales}")

    def resolved(self) -> "SoundnessConfig":
        """A copy with the dataset defaults filled in (classes, batch size, lr), validated."""
        c = dataclasses.replace(self)
        c.validate()
        if c.classes is None:
            c.classes = _DEFAULT_CLASSES[c.dataset]
        dflt = DATASET_DEFAULTS[c.dataset]
        c.batch_size = dflt["batch_size"] if c.batch_size is None else c.batch_size
        c.lr = dflt["lr"] if c.lr is None else c.lr
        c.group_size = min(c.models, CPU_GROUP_CAP) if c.group_size is None else c.group_size
        return c


@dataclass
class Ensemble:
    """M trained smoothed models as (model indices, GroupedModel) groups, plus what built them."""

    groups: list[tuple[list[int], GroupedModel]]
    num_classes: int
    seed: int
    seconds: float = 0.0

    @property
    def models(self) -> int:
        return sum(len(ks) for ks, _ in self.groups)


# ----------------------------------------------------------------------------- ensemble
def train_ensemble(x: torch.Tensor, y: torch.Tensor, cfg: SoundnessConfig, *, num_classes: int,
                   arch: str, progress: Optional[Callable[[str], None]] = None) -> Ensemble:
    """Train cfg.models smoothed models (RAB: one sigma for every sample) on x [N, C, H, W], y [N].

    Model k starts from `EnsembleSpec.new_model(k)` (its init seed) and trains on
    x_i + sigma * eps(seed, TRAIN, k, i), the noise fixed per (model, sample) for all
    epochs, in groups of cfg.group_size consecutive models sharing the mini-batch order
    (`training.train_group`). Everything is a pure function of cfg and (x, y): training
    again on a perturbed x changes the models only through the perturbation.
    """
    t0 = time.perf_counter()
    c, h, w = (int(v) for v in x.shape[1:])
    schedule = Schedule(cfg.epochs, cfg.batch_size, cfg.lr)
    spec = EnsembleSpec(method="rab", arch=arch, in_channels=c, num_classes=num_classes, image_size=(h, w),
                        models=cfg.models, schedule=schedule, seed=cfg.seed, fingerprint="soundness",
                        group_size=cfg.group_size)
    sigma = torch.full((x.shape[0],), float(cfg.sigma))
    groups = []
    for ks in group_ranges(cfg.models, cfg.group_size):
        group = GroupedModel([spec.new_model(k) for k in ks])
        cache = GroupNoise.nbytes(x, len(ks)) <= _NOISE_CACHE_BYTES
        train_group(group, x, y, sigma, models=ks, schedule=schedule, seed=cfg.seed, device="cpu",
                    cache_noise=cache)
        groups.append((list(ks), group.eval()))
        if progress is not None:
            progress(f"trained models {ks.start}..{ks.stop - 1} ({time.perf_counter() - t0:.0f} s)")
    return Ensemble(groups, num_classes, cfg.seed, time.perf_counter() - t0)


def certify_inputs(ens: Ensemble, x: torch.Tensor, cfg: SoundnessConfig) -> Certificates:
    """Certificates of x [B, C, H, W] under the ensemble: model k votes on x + sigma * eps(seed, TEST, k).

    The same test noise for every call (a pure function of seed and k), so re-voting a
    perturbed x compares the two inputs under the very same models and noise.
    """
    sigma = torch.full((x.shape[0],), float(cfg.sigma))
    votes = collect_votes(ens.groups, x, sigma, seed=ens.seed, num_classes=ens.num_classes,
                          batch_size=cfg.eval_batch_size)
    return certify_votes(votes, sigma.double(), bound=cfg.bound, alpha=cfg.alpha)


def margin_gradient(ens: Ensemble, x: torch.Tensor, label: torch.Tensor, cfg: SoundnessConfig) -> torch.Tensor:
    """Gradient of the ensemble's soft-vote margin with respect to the inputs, [B, C, H, W] float32.

    margin(x) = (1 / M) sum_k [softmax_k(x + sigma eps_k)[label] - max_{c != label} softmax_k(...)[c]],
    with eps_k the model's own TEST noise: the average over the noise draws of the models.
    The softmax is taken in float64 so that saturated models still give a (tiny) gradient.
    """
    grad = torch.zeros_like(x)
    m = ens.models
    for ks, group in ens.groups:
        group.eval()
        for start in range(0, x.shape[0], cfg.eval_batch_size):
            xb = x[start:start + cfg.eval_batch_size].clone().requires_grad_(True)
            yb = label[start:start + cfg.eval_batch_size]
            sb = torch.full((xb.shape[0],), float(cfg.sigma))
            noisy = noisy_copies(xb, sb, seed=ens.seed, stream=int(Stream.TEST), models=ks, ids=None)
            probs = F.softmax(group(noisy).double(), dim=-1)  # [Mc, b, C]
            own = probs.gather(-1, yb.view(1, -1, 1).expand(len(ks), -1, 1)).squeeze(-1)
            other = probs.scatter(-1, yb.view(1, -1, 1).expand(len(ks), -1, 1), -1.0).max(-1).values
            (g,) = torch.autograd.grad((own - other).sum(), xb)
            grad[start:start + xb.shape[0]] += g.to(grad.dtype)
    return grad / m


def unit_directions(v: torch.Tensor, fallback: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Rows of v [B, ...] scaled to unit L2 norm; rows with norm 0 take fallback's (also normalized).

    Returns (directions float64, number of rows that fell back).
    """
    flat = v.reshape(v.shape[0], -1).double()
    norms = flat.norm(dim=1, keepdim=True)
    zero = (norms == 0) | ~torch.isfinite(norms)
    fb = fallback.reshape(fallback.shape[0], -1).double()
    flat = torch.where(zero, fb, flat)
    flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return flat.reshape(v.shape), int(zero.sum())


def _toward(means: torch.Tensor, x: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """means[cls] - x: the (unnormalized) direction from each input to a class mean, float64."""
    return (means[cls] - x.double()).reshape(x.shape)


def class_means(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[K, C, H, W] float64 mean image of each class."""
    return torch.stack([x[y == c].double().mean(0) for c in range(num_classes)])


def other_class(cert: Certificates, x: torch.Tensor, means: torch.Tensor, target: int) -> torch.Tensor:
    """The class a perturbation of each input aims at: the target for inputs predicted otherwise,
    else the nearest other class mean (for two classes: the other class)."""
    d = torch.cdist(x.reshape(x.shape[0], -1).double(), means.reshape(means.shape[0], -1))
    d.scatter_(1, cert.predict[:, None], math.inf)
    nearest = d.argmin(1)
    return torch.where(cert.predict != target, torch.full_like(nearest, target), nearest)


# ----------------------------------------------------------------------------- checks
def perturbation_check(ens: Ensemble, x: torch.Tensor, cert: Certificates, directions: torch.Tensor,
                       norms: torch.Tensor, cfg: SoundnessConfig, *, rows: Optional[torch.Tensor] = None) -> dict:
    """Move the inputs by norms[i] * directions[i], re-vote with the same models and noise, compare.

    Args:
        x: [B, C, H, W] inputs; cert: their certificates; directions: [B, C, H, W] unit vectors;
        norms: [B] float64 perturbation norms; rows: bool [B] of the inputs to try (default: not
        abstained).
    Returns:
        {"tried", "changed", "contradicted", "max_norm_over_radius", "changed_idx",
        "contradicted_idx"}: inputs moved, whose prediction changed, whose new vote certifies
        another class (and their indices); the largest applied norm / R_i among the tried inputs
        with R_i > 0 (None if there is none).
    """
    if rows is None:
        rows = ~cert.abstain
    idx = rows.nonzero().flatten()
    if idx.numel() == 0:
        return {"tried": 0, "changed": 0, "contradicted": 0, "max_norm_over_radius": None,
                "changed_idx": [], "contradicted_idx": []}
    moved = (x[idx].double() + norms[idx].view(-1, *([1] * (x.dim() - 1))) * directions[idx].double())
    new = certify_inputs(ens, moved.to(x.dtype), cfg)
    changed = new.predict != cert.predict[idx]
    contradicted = changed & ~new.abstain
    # the norm actually applied (float32 rounding of x + delta included)
    applied = (moved.to(x.dtype).double() - x[idx].double()).reshape(idx.numel(), -1).norm(dim=1)
    pos = cert.radius[idx] > 0
    ratio = float((applied[pos] / cert.radius[idx][pos]).max()) if pos.any() else None
    return {"tried": int(idx.numel()), "changed": int(changed.sum()), "contradicted": int(contradicted.sum()),
            "max_norm_over_radius": ratio, "changed_idx": idx[changed].tolist(),
            "contradicted_idx": idx[contradicted].tolist()}


def plant_backdoor(x_train: torch.Tensor, y_train: torch.Tensor, *, train_norm: float, poisoned: int,
                   target: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Perturb `poisoned` training samples of class `target` toward the mean of the other classes.

    The samples are those of the target class nearest to the other classes' mean (the most
    influential ones), each moved by train_norm / sqrt(poisoned) straight toward that mean, so
    that sqrt(sum_i ||d_i||^2) = train_norm. Labels are kept: the certificate covers feature
    perturbations with the labels as the attacker left them (THEORY 1).
    Returns (perturbed x_train, indices of the poisoned samples, measured joint training norm).
    """
    cand = (y_train == target).nonzero().flatten()
    if cand.numel() == 0:
        raise CertssbError(f"no training sample has the target label {target}; pick another target")
    poisoned = min(poisoned, int(cand.numel()))
    rest = x_train[y_train != target].double().mean(0)
    flat = x_train[cand].double().reshape(cand.numel(), -1)
    dist = (flat - rest.reshape(1, -1)).norm(dim=1)
    pick = cand[dist.argsort()[:poisoned]]
    fallback = torch.randn((poisoned, *x_train.shape[1:]), generator=torch.Generator().manual_seed(0))
    u, _ = unit_directions(rest.unsqueeze(0) - x_train[pick].double(), fallback)
    delta = u * (train_norm / math.sqrt(poisoned))
    out = x_train.clone()
    out[pick] = (x_train[pick].double() + delta).to(x_train.dtype)
    measured = float((out[pick].double() - x_train[pick].double()).norm())
    return out, pick, measured


def backdoor_check(clean: Ensemble, task: TaskData, cert: Certificates, cfg: SoundnessConfig, *,
                   eps: float, arch: str, log: Optional[Callable[[str], None]] = None) -> dict:
    """Plant a backdoor of joint L2 norm (1 - margin) * eps, retrain with the same seeds, compare.

    Training side: `plant_backdoor` with norm eps_train = (1 - margin) eps sqrt(train_share).
    Test side: every test input gets its own trigger of norm eps_test = (1 - margin) eps
    sqrt(1 - train_share), toward the mean of the class it should flip to ("mean") or along
    the poisoned ensemble's margin gradient ("gradient"); sqrt(eps_train^2 + eps_test^2) < eps.
    Counted: the inputs certified with R_i >= eps (> the joint norm). Returns the report's
    "backdoor" block.
    """
    log = log or (lambda s: None)
    scale = 1.0 - cfg.margin
    train_norm = scale * eps * math.sqrt(cfg.train_share)
    test_norm = scale * eps * math.sqrt(1.0 - cfg.train_share)
    x_p, pick, measured_train = plant_backdoor(task.x_train, task.y_train, train_norm=train_norm,
                                               poisoned=cfg.poisoned, target=cfg.target)
    t0 = time.perf_counter()
    poisoned_ens = train_ensemble(x_p, task.y_train, cfg, num_classes=task.num_classes, arch=arch)
    log(f"backdoor: retrained {poisoned_ens.models} models on {len(pick)} perturbed samples "
        f"({poisoned_ens.seconds:.0f} s)")
    x = task.x_test
    means = class_means(task.x_train, task.y_train, task.num_classes)
    aim = other_class(cert, x, means, cfg.target)
    rnd = torch.randn(x.shape, generator=generator(cfg.seed, "soundness", "fallback"))
    # joint norm < eps <= R_i: covered by the certificate (>= keeps the inputs tied at the quantile)
    counted = (~cert.abstain) & (cert.radius >= eps)
    triggers = {}
    triggers["mean"], _ = unit_directions(_toward(means, x, aim), rnd)
    grad = margin_gradient(poisoned_ens, x, cert.predict, cfg)
    triggers["gradient"], fallback = unit_directions(-grad, triggers["mean"])
    out = {"eps": eps, "eps_quantile": cfg.eps_quantile, "poisoned": int(len(pick)), "target": cfg.target,
           "train_norm": measured_train, "per_sample_norm": train_norm / math.sqrt(len(pick)),
           "test_norm": test_norm, "labels_changed": 0, "retrain_seconds": round(poisoned_ens.seconds, 1),
           "gradient_fallbacks": fallback, "triggers": {}}
    norms = torch.full((x.shape[0],), test_norm, dtype=torch.float64)
    everyone = torch.ones(x.shape[0], dtype=torch.bool)
    for name, direction in triggers.items():
        res = perturbation_check(poisoned_ens, x, cert, direction, norms, cfg, rows=everyone)
        moved = x.double() + test_norm * direction
        applied = (moved.to(x.dtype).double() - x.double()).reshape(x.shape[0], -1).norm(dim=1)
        joint = torch.sqrt(measured_train ** 2 + applied ** 2)  # float64, the norms actually applied
        changed = torch.zeros(x.shape[0], dtype=torch.bool)
        changed[res["changed_idx"]] = True
        contradicted = torch.zeros(x.shape[0], dtype=torch.bool)
        contradicted[res["contradicted_idx"]] = True
        out["triggers"][name] = {
            "tried": int(counted.sum()), "changed": int((changed & counted).sum()),
            "contradicted": int((contradicted & counted).sum()),
            "tried_all": int(x.shape[0]), "changed_all": int(changed.sum()),
            "max_joint_norm": float(joint.max()),
            "min_radius_counted": float(cert.radius[counted].min()) if counted.any() else None,
            "changed_idx": [int(i) for i in (changed & counted).nonzero().flatten()]}
        log(f"backdoor ({name} trigger): {out['triggers'][name]['changed']} of "
            f"{out['triggers'][name]['tried']} inputs certified beyond eps changed "
            f"({out['triggers'][name]['changed_all']} of {x.shape[0]} over all inputs)")
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


# ----------------------------------------------------------------------------- the experiment
def run_soundness(cfg: SoundnessConfig, log: Optional[Callable[[str], None]] = None) -> dict:
    """Run the whole experiment (module docstring) and return the JSON-ready report."""
    log = log or (lambda s: None)
    cfg = cfg.resolved()
    t_start = time.perf_counter()
    load_start = _load_average()
    task = load_task(cfg.dataset, data_dir=cfg.data_dir, classes=cfg.classes, max_train=cfg.max_train,
                     max_test=cfg.max_test, seed=cfg.seed)
    if not 0 <= cfg.target < task.num_classes:
        raise CertssbError(f"target must be a task label in [0, {task.num_classes}), got {cfg.target}")
    arch = default_arch(cfg.dataset, task.image_shape)
    log(f"data: {task.name} classes {task.class_names}, {task.x_train.shape[0]} train / "
        f"{task.x_test.shape[0]} test, {arch}; M = {cfg.models}, epochs {cfg.epochs}, sigma {cfg.sigma}")
    clean = train_ensemble(task.x_train, task.y_train, cfg, num_classes=task.num_classes, arch=arch,
                           progress=log)
    t0 = time.perf_counter()
    x, y = task.x_test, task.y_test
    cert = certify_inputs(clean, x, cfg)
    certified = ~cert.abstain
    radii = cert.radius[certified]
    report: dict = {
        "config": dataclasses.asdict(cfg),
        "data": {**task.describe(), "arch": arch},
        "torch": torch.__version__, "machine": platform.machine(),
        "models": clean.models, "bound": cfg.bound, "alpha": cfg.alpha, "sigma": cfg.sigma,
        "clean": {"inputs": int(x.shape[0]), "accuracy": float((cert.predict == y).double().mean()),
                  "certified": int(certified.sum()),
                  "certified_correct": int((certified & (cert.predict == y)).sum()),
                  "radius_min": float(radii.min()) if radii.numel() else None,
                  "radius_median": float(radii.median()) if radii.numel() else None,
                  "radius_max": float(radii.max()) if radii.numel() else None},
        "seconds": {"train": round(clean.seconds, 1), "certify": round(time.perf_counter() - t0, 1)},
    }
    log(f"clean: accuracy {report['clean']['accuracy']:.3f}, {int(certified.sum())} of {x.shape[0]} certified, "
        f"median radius {report['clean']['radius_median']}")

    # test-time perturbations, inside the certified ball and (controls) outside it
    t0 = time.perf_counter()
    rnd = torch.randn(x.shape, generator=generator(cfg.seed, "soundness", "random-direction"))
    directions = {"random": unit_directions(rnd, rnd)[0]}
    means = class_means(task.x_train, task.y_train, task.num_classes)
    toward = _toward(means, x, other_class(cert, x, means, cfg.target))
    directions["gradient"], fallback = unit_directions(-margin_gradient(clean, x, cert.predict, cfg), toward)
    rows = []
    for name, u in directions.items():
        for scale in (cfg.inside, *cfg.control_scales):
            res = perturbation_check(clean, x, cert, u, scale * cert.radius, cfg)
            rows.append({"direction": name, "scale": scale, "inside_certificate": scale < 1, **res})
            log(f"test-time {name} x{scale:g} R: {res['changed']} of {res['tried']} changed "
                f"({res['contradicted']} certify another class)")
    report["test_time"] = {"rows": rows, "gradient_fallbacks": fallback}
    report["seconds"]["test_time"] = round(time.perf_counter() - t0, 1)

    if radii.numel() == 0:
        report["backdoor"] = {"skipped": "no test input was certified: nothing to compare"}
    else:
        eps = float(torch.quantile(radii, cfg.eps_quantile))
        report["backdoor"] = backdoor_check(clean, task, cert, cfg, eps=eps, arch=arch, log=log)
        report["seconds"]["backdoor"] = report["backdoor"]["seconds"]
    report["seconds"]["total"] = round(time.perf_counter() - t_start, 1)
    report["load_average"] = {"start": load_start, "end": _load_average(), "cpus": os.cpu_count()}
    report["expected_failures"] = {
        "per_input": cfg.alpha,
        "note": "each certificate may fail with probability alpha (over the draw of the models), so "
                "about alpha * tried failures are allowed; the counts below should stay near that"}
    return report


# ----------------------------------------------------------------------------- report
def check_report(report: dict) -> None:
    """Raise AssertionError unless the report's numbers are consistent with each other.

    tried >= changed >= contradicted >= 0 everywhere; perturbations counted as inside the
    certificate have norm / radius < 1; every input counted by the backdoor check has radius
    >= eps > the joint norm; controls are outside the ball.
    """
    assert report["clean"]["certified"] <= report["clean"]["inputs"]
    for row in report["test_time"]["rows"]:
        assert row["tried"] == report["clean"]["certified"]
        assert 0 <= row["contradicted"] <= row["changed"] <= row["tried"]
        if row["inside_certificate"]:
            assert row["tried"] == 0 or row["max_norm_over_radius"] < 1.0, row
        else:
            assert row["scale"] > 1.0
    bd = report["backdoor"]
    if "skipped" in bd:
        return
    assert bd["labels_changed"] == 0 and bd["poisoned"] >= 1
    assert bd["train_norm"] < bd["eps"] and bd["test_norm"] < bd["eps"]
    for trig in bd["triggers"].values():
        assert 0 <= trig["contradicted"] <= trig["changed"] <= trig["tried"] <= trig["tried_all"]
        assert trig["changed"] <= trig["changed_all"] <= trig["tried_all"]
        assert trig["max_joint_norm"] < bd["eps"], (trig["max_joint_norm"], bd["eps"])
        if trig["tried"]:
            assert trig["min_radius_counted"] >= bd["eps"] > trig["max_joint_norm"]


def format_markdown(report: dict, json_path: Optional[str] = None) -> str:
    """The report as a Markdown page (docs/results/soundness.md); json_path: where the full report is."""
    cfg, data, clean = report["config"], report["data"], report["clean"]
    lines = [
        "# Empirical soundness of the certificates",
        "",
        "Generated by `python scripts/empirical_soundness.py` (certssb.experiments.soundness); do not edit by hand.",
        "",
        f"Task: {data['name']} classes {', '.join(map(str, data['class_names']))} "
        f"({data['n_train']} training / {data['n_test']} test images, {data['arch']}). "
        f"Ensemble: M = {report['models']} models (RAB, one sigma = {cfg['sigma']} for training and test "
        f"noise), {cfg['epochs']} epoch{'s' if cfg['epochs'] != 1 else ''}, batch {cfg['batch_size']}, Adam lr {cfg['lr']}, seed {cfg['seed']}. "
        f"Certificates: bound {report['bound']}, alpha = {report['alpha']}. torch {report['torch']}.",
        "",
        f"Clean test set: accuracy {clean['accuracy']:.4f}; {clean['certified']} of {clean['inputs']} inputs "
        f"certified ({clean['certified_correct']} of them correct); radius min / median / max "
        f"{_num(clean['radius_min'])} / {_num(clean['radius_median'])} / {_num(clean['radius_max'])}.",
        "",
        "Each certificate may be wrong with probability alpha over the draw of the models, so about "
        f"alpha x tried failures are allowed (here {report['alpha']} x {clean['certified']} = "
        f"{report['alpha'] * clean['certified']:.2g} per test-time row). A *changed* prediction is the "
        "ensemble's vote (the same M models, the same noise) differing from the clean one. The certificate "
        "is about the smoothed classifier, which the vote estimates; *certifies another class* means the "
        "new vote even certifies a different class. Inside the certified ball that is a contradiction (two "
        "certificates that cannot both hold); in the controls outside it, it is not.",
        "",
        "## Test-time perturbations",
        "",
        "Every certified input x_i (radius R_i) is moved to x_i + s R_i u_i, with u_i a random unit "
        "direction or the direction that decreases the ensemble's soft-vote margin fastest (its gradient, "
        "averaged over the M models and their own test noise), and re-voted with the same models and "
        "noise. s < 1 is inside the certified ball: the certificate says nothing changes. s > 1 are "
        "controls outside it, which show that the check does see changes.",
        "",
        "| direction | s = norm / R_i | inside the certificate | inputs tried | prediction changed | "
        "certifies another class |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for row in report["test_time"]["rows"]:
        lines.append(f"| {row['direction']} | {row['scale']:g} | {'yes' if row['inside_certificate'] else 'no (control)'} "
                     f"| {row['tried']} | {row['changed']} | {row['contradicted']} |")
    if report["test_time"]["gradient_fallbacks"]:
        lines += ["", f"({report['test_time']['gradient_fallbacks']} inputs had a zero margin gradient and "
                      "used the direction toward the other class mean instead.)"]
    bd = report["backdoor"]
    lines += ["", "## Backdoor (training and test perturbations together), retrained with the same seeds", ""]
    if "skipped" in bd:
        lines.append(f"Skipped: {bd['skipped']}.")
    else:
        lines += [
            f"eps = {_num(bd['eps'])} (the {bd['eps_quantile']:g} quantile of the certified radii). "
            f"{bd['poisoned']} training images of class {bd['target']} (task label), those nearest to the "
            f"mean of the other classes, are moved toward that mean by {_num(bd['per_sample_norm'])} each "
            f"(joint training norm {_num(bd['train_norm'])}; labels unchanged, as the certificate "
            "assumes). The ensemble is retrained with the same seeds: same initialisations, mini-batch "
            "order and noise per (model, sample). Every test input then gets its own trigger of norm "
            f"{_num(bd['test_norm'])}, toward the mean of the class it should flip to (the target, or for "
            "inputs predicted as the target the nearest other class) or along the retrained ensemble's "
            "margin gradient. The joint norm sqrt(sum ||d_i||^2 + ||d||^2) stays below eps; the inputs "
            "certified with R_i >= eps are compared.",
            "",
            "| test trigger | max joint norm | inputs certified beyond eps | prediction changed | "
            "certifies another class | all inputs | changed among all |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, t in bd["triggers"].items():
            lines.append(f"| {name} | {_num(t['max_joint_norm'])} | {t['tried']} | {t['changed']} | "
                         f"{t['contradicted']} | {t['tried_all']} | {t['changed_all']} |")
        lines += ["", "The last two columns include inputs that were abstained or certified below eps, where "
                      "the certificate claims nothing."]
    sec = report["seconds"]
    load = report.get("load_average") or {}
    load_text = (f" Machine load (1-minute load average) {load['start']} at the start, {load['end']} at the "
                 f"end, on {load['cpus']} CPUs: other jobs shared the machine, so the seconds are not "
                 "benchmark figures." if load.get("start") is not None else "")
    lines += ["", "## Run", "",
              f"OMP_NUM_THREADS={report.get('omp_num_threads')}. Seconds: "
              + ", ".join(f"{k} {v}" for k, v in sec.items()) + "." + load_text,
              "", f"Full numbers: {json_path} (same run)." if json_path else "", ""]
    return "\n".join(lines)


def _load_average() -> Optional[float]:
    """The 1-minute load average (None where the OS does not say): how busy the machine was."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.4g}"
