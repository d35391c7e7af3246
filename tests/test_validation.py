"""Validation at every boundary: bad input -> one clear CertssbError, CLI exit 2, no traceback.

Three tables:
- API_CASES: Python API calls (pipeline.run / RunConfig, load_task, certify_models, certify_votes,
  collect_votes, noisy_copies, the kernel wrappers, RegionStore, bounds, attacks, sigma search)
  with a bad argument each, and a fragment of the message that must name the problem;
- FILE_CASES: truncated or corrupt files in every format a loader reads (MNIST IDX, CIFAR-10
  batches, .npz, image files, safetensors sigma/region files, run-directory JSON/CSV), tiny
  files made in tmp_path;
- CLI_CASES: `certssb.cli.main([...])` for every subcommand (run, train, certify, report) and
  argparse-level errors: exit status 2, the message, and no "Traceback".
Plus run directories of an incompatible version, and --debug for every subcommand.
"""
from __future__ import annotations

import gzip
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from certssb.runner import pipeline, rundir
from certssb import RegionStore, RunConfig, certify_models, load_task
from certssb.attacks import make_trigger, poison_training_set
from certssb.certify.bounds import certified_radius, clopper_pearson_lower, hoeffding_lower, radius_proxy
from certssb.certify.votes import Votes, certify_votes, collect_votes
from certssb.cli import main
from certssb.runner.config import resolve_device
from certssb.errors import CertssbError, CheckpointError, DataError
from certssb.core.files import atomic_write_json, save_tensors
from certssb.kernels import using_backend
from certssb.kernels.noise import noise as kernel_noise
from certssb.kernels.radius import certify_radius, radius_proxy as kernel_radius_proxy
from certssb.kernels.vote import vote_accumulate, vote_top2
from certssb.smoothing.noise import noisy_copies
from certssb.runner.rundir import RUN_FORMAT, check_compatible
from certssb.smoothing.sigma import SigmaSearch, optimize_sigma

NAN, INF = float("nan"), float("inf")


@pytest.fixture(autouse=True)
def _no_user_env(monkeypatch):
    monkeypatch.delenv("CERTSSB_DATA", raising=False)
    monkeypatch.delenv("CERTSSB_DEBUG", raising=False)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 2))


def _x(b: int = 3) -> torch.Tensor:
    return torch.rand(b, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _votes(models: int = 5, b: int = 3) -> Votes:
    v = Votes.zeros(b, 2)
    v.add_logits(torch.randn(models, b, 2, generator=torch.Generator().manual_seed(1)))
    return v


def _poison(rate: float, n: int = 200):
    x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(n) % 2
    trig = make_trigger("blending", 1.0, (1, 8, 8))
    return poison_training_set(x, y, trig, rate=rate, target=0, all_to_all=False, num_classes=2, seed=0)


def _run(**kw):
    return lambda tmp: pipeline.run({"out": str(tmp / "o"), "models": 2, "epochs": 1, **kw}, progress=False,
                                    log=lambda s: None)


# ----------------------------------------------------------------------------- the Python API
# (id, callable taking tmp_path, expected message fragment)
API_CASES = [
    # pipeline.run / RunConfig: every knob, unknown names, bad numbers
    ("run-sigma0-zero", _run(sigma0=0.0), "--sigma0 must be a finite number > 0"),
    ("run-sigma0-negative", _run(sigma0=-0.5), "--sigma0 must be a finite number > 0"),
    ("run-sigma0-nan", _run(sigma0=NAN), "--sigma0 must be a finite number > 0"),
    ("run-sigma0-inf", _run(sigma0=INF), "--sigma0 must be a finite number > 0"),
    ("run-alpha-zero", _run(alpha=0.0), "--alpha must lie in (0, 1)"),
    ("run-alpha-one", _run(alpha=1.0), "--alpha must lie in (0, 1)"),
    ("run-alpha-nan", _run(alpha=NAN), "--alpha must lie in (0, 1)"),
    ("run-models-zero", _run(models=0), "--models must be an integer >= 1"),
    ("run-models-float", _run(models=2.5), "--models must be an integer >= 1"),
    ("run-unknown-dataset", _run(dataset="svhn"), "unknown dataset 'svhn'"),
    ("run-unknown-trigger", _run(trigger="laser"), "unknown trigger 'laser'"),
    ("run-unknown-bound", _run(bound="wilson"), "unknown bound 'wilson'"),
    ("run-unknown-backend", _run(backend="cuda"), "unknown backend 'cuda'"),
    ("run-unknown-device", _run(device="tpu"), "unknown device 'tpu'"),
    ("run-unknown-arch", _run(arch="vgg"), "unknown architecture 'vgg'"),
    ("run-unknown-method", _run(method="cohen"), "unknown method 'cohen'"),
    ("run-unknown-key", lambda tmp: pipeline.run({"modles": 3}), "unknown config keys ['modles']"),
    ("run-not-a-config", lambda tmp: pipeline.run(["digits"]), "config must be a RunConfig or a dict"),
    ("run-classes-repeated", _run(classes=[1, 1]), "--classes repeats a class"),
    ("run-classes-one", _run(classes=[3]), "needs at least two classes"),
    ("run-classes-not-ints", _run(classes=["a", 1]), "--classes must be a list of class ids"),
    ("run-classes-missing", _run(classes=[3, 42]), "class id(s) [42] not in digits"),
    ("run-poison-rate-zero", _run(poison_rate=0.0), "--poison-rate must lie in (0, 1)"),
    ("run-poison-rate-nan", _run(poison_rate=NAN), "--poison-rate must lie in (0, 1)"),
    ("run-poison-selects-none", _run(poison_rate=0.0001, max_train=200),
     "poison rate 0.0001 of 200 training samples selects no sample"),
    ("run-delta-zero", _run(delta=0.0), "--delta must be a finite number > 0"),
    ("run-sigma-range", _run(sigma_min=0.5), "need sigma-min <= sigma0 <= sigma-max"),
    ("run-target-not-in-task", _run(classes=[1, 2], target=7), "--target 7 is not one of the task's classes"),
    ("run-target-negative", _run(target=-1), "--target must be a class id"),
    ("run-radii-negative", _run(radii=[-0.1]), "--radii must be non-negative finite numbers"),
    ("run-eval-batch-zero", _run(eval_batch_size=0), "--eval-batch-size must be an integer >= 1"),
    ("run-seed-negative", _run(seed=-1), "--seed must be an integer in [0, 2^63)"),
    ("run-trigger-pixel-outside", _run(trigger="onepixel", trigger_pixel=[9, 9]), "does not fit an image of 8x8"),
    ("device-cuda-without-gpu", lambda tmp: resolve_device("cuda:0") if not torch.cuda.is_available()
     else (_ for _ in ()).throw(CertssbError("no CUDA GPU (skipped: a GPU exists)")), "no CUDA GPU"),
    ("backend-unknown", lambda tmp: using_backend("fast").__enter__(), "unknown backend 'fast'"),
    # load_task
    ("data-unknown-dataset", lambda tmp: load_task("svhn"), "unknown dataset 'svhn'"),
    ("data-classes-repeated", lambda tmp: load_task("digits", classes=[2, 2]), "class 2 is repeated"),
    ("data-classes-missing", lambda tmp: load_task("digits", classes=[0, 10]), "class id(s) [10] not in digits"),
    ("data-classes-text", lambda tmp: load_task("digits", classes="one,zero"), "not a comma-separated list"),
    ("data-max-train-zero", lambda tmp: load_task("digits", max_train=0), "max_train must be a positive integer"),
    ("data-image-size-negative", lambda tmp: load_task("digits", image_size=-8), "image_size must be a positive"),
    ("data-seed-negative", lambda tmp: load_task("digits", seed=-1), "seed must be a non-negative integer"),
    ("data-dir-missing", lambda tmp: load_task("mnist", data_dir=tmp / "nowhere"), "does not exist"),
    ("data-digits-with-dir", lambda tmp: load_task("digits", data_dir=tmp), "embedded"),
    # attacks
    ("poison-rate-selects-none", lambda tmp: _poison(0.0001),
     "smallest rate that works is just above 0.5/200 = 0.0025"),
    ("poison-rate-one", lambda tmp: _poison(1.0), "poison rate must be in (0, 1)"),
    ("trigger-unknown", lambda tmp: make_trigger("laser", 1.0, (1, 8, 8)), "unknown trigger 'laser'"),
    ("trigger-delta-negative", lambda tmp: make_trigger("blending", -1.0, (1, 8, 8)), "delta"),
    ("trigger-input-above-one", lambda tmp: make_trigger("blending", 1.0, (1, 8, 8)).apply(_x() * 255),
     "images in [0, 1]"),
    ("trigger-input-nan", lambda tmp: make_trigger("blending", 1.0, (1, 8, 8)).apply(_x().fill_(NAN)),
     "without NaN/Inf"),
    ("trigger-input-shape", lambda tmp: make_trigger("blending", 1.0, (1, 8, 8)).apply(torch.rand(2, 3, 8, 8)),
     "trigger was made for images of shape"),
    # certify_models
    ("certify-x-3d", lambda tmp: certify_models([_model()], _x()[:, 0], 0.25, num_classes=2),
     "x must be a float tensor of shape [B, C, H, W]"),
    ("certify-x-int", lambda tmp: certify_models([_model()], (_x() * 255).to(torch.uint8), 0.25, num_classes=2),
     "x must be a float tensor"),
    ("certify-x-nan", lambda tmp: certify_models([_model()], _x().index_fill_(0, torch.tensor([1]), NAN),
                                                 0.25, num_classes=2), "NaN or Inf"),
    ("certify-x-inf", lambda tmp: certify_models([_model()], _x().index_fill_(0, torch.tensor([0]), INF),
                                                 0.25, num_classes=2), "NaN or Inf"),
    ("certify-x-above-one", lambda tmp: certify_models([_model()], _x() * 255, 0.25, num_classes=2),
     "inputs must be images in [0, 1]"),
    ("certify-x-normalized", lambda tmp: certify_models([_model()], (_x() - 0.5) / 0.2, 0.25, num_classes=2),
     "inputs must be images in [0, 1]"),
    ("certify-sigma-zero", lambda tmp: certify_models([_model()], _x(), 0.0, num_classes=2), "finite and > 0"),
    ("certify-sigma-negative", lambda tmp: certify_models([_model()], _x(), -0.25, num_classes=2),
     "finite and > 0"),
    ("certify-sigma-nan", lambda tmp: certify_models([_model()], _x(), NAN, num_classes=2), "finite and > 0"),
    ("certify-sigma-inf-entry", lambda tmp: certify_models([_model()], _x(), torch.tensor([0.2, INF, 0.2]),
                                                           num_classes=2), "finite and > 0"),
    ("certify-sigma-shape", lambda tmp: certify_models([_model()], _x(), torch.full((4,), 0.2), num_classes=2),
     "sigma must be a tensor of shape [3]"),
    ("certify-alpha-zero", lambda tmp: certify_models([_model()], _x(), 0.25, num_classes=2, alpha=0.0),
     "alpha must be a number in (0, 1)"),
    ("certify-alpha-one", lambda tmp: certify_models([_model()], _x(), 0.25, num_classes=2, alpha=1.0),
     "alpha must be a number in (0, 1)"),
    ("certify-no-models", lambda tmp: certify_models([], _x(), 0.25, num_classes=2), "at least one model (M >= 1)"),
    ("certify-one-module", lambda tmp: certify_models(_model(), _x(), 0.25, num_classes=2), "not one module"),
    ("certify-num-classes", lambda tmp: certify_models([_model()], _x(), 0.25, num_classes=1),
     "num_classes must be an integer >= 2"),
    ("certify-wrong-classes", lambda tmp: certify_models([_model()], _x(), 0.25, num_classes=3),
     "outputs 2 classes, expected 3"),
    ("certify-unknown-bound", lambda tmp: certify_models([_model()], _x(), 0.25, num_classes=2, bound="wilson"),
     "unknown bound 'wilson'"),
    ("certify-unknown-mode", lambda tmp: certify_models([_model()], _x(), 0.25, num_classes=2, mode="loose"),
     "unknown mode 'loose'"),
    ("certify-batch-size", lambda tmp: certify_models([_model()], _x(), 0.25, num_classes=2, batch_size=0),
     "batch_size must be an integer >= 1"),
    ("collect-sigma-shape", lambda tmp: collect_votes([_model()], _x(), torch.full((2,), 0.2), seed=0,
                                                      num_classes=2), "sigma must be a tensor of shape [3]"),
    ("collect-sigma-zero", lambda tmp: collect_votes([_model()], _x(), torch.zeros(3), seed=0, num_classes=2),
     "finite and > 0"),
    ("certify-votes-alpha", lambda tmp: certify_votes(_votes(), torch.full((3,), 0.2), alpha=1.5),
     "alpha must be a number in (0, 1)"),
    ("certify-votes-no-models", lambda tmp: certify_votes(Votes.zeros(3, 2), torch.full((3,), 0.2)),
     "at least one model (M >= 1)"),
    ("certify-votes-sigma-shape", lambda tmp: certify_votes(_votes(), torch.full((5,), 0.2)),
     "sigma must be a tensor of shape [3]"),
    ("certify-votes-sigma-nan", lambda tmp: certify_votes(_votes(), torch.tensor([0.2, NAN, 0.2])),
     "finite and > 0"),
    ("certify-votes-not-votes", lambda tmp: certify_votes(torch.zeros(3, 2), torch.full((3,), 0.2)),
     "votes must be a Votes"),
    ("votes-logits-shape", lambda tmp: Votes.zeros(3, 2).add_logits(torch.randn(2, 4, 2)),
     "logits must have shape [Mc, 3, 2]"),
    # noisy_copies and the kernel wrappers
    ("noise-sigma-zero", lambda tmp: noisy_copies(_x(), 0.0, seed=0, stream=1, models=[0], ids=None),
     "sigma must be finite and > 0"),
    ("noise-sigma-negative", lambda tmp: noisy_copies(_x(), torch.tensor([0.1, -0.1, 0.1]), seed=0, stream=1,
                                                      models=[0], ids=None), "sigma must be finite and > 0"),
    ("noise-sigma-nan", lambda tmp: noisy_copies(_x(), NAN, seed=0, stream=1, models=[0], ids=None),
     "sigma must be finite and > 0"),
    ("noise-sigma-shape", lambda tmp: noisy_copies(_x(), torch.full((2,), 0.1), seed=0, stream=1, models=[0],
                                                   ids=None), "sigma must be a number or have shape [3]"),
    ("noise-x-nan", lambda tmp: noisy_copies(_x().fill_(NAN), 0.1, seed=0, stream=1, models=[0], ids=None),
     "x contains NaN or Inf"),
    ("noise-x-int", lambda tmp: noisy_copies(torch.ones(3, 4, dtype=torch.int64), 0.1, seed=0, stream=1,
                                             models=[0], ids=None), "x must be a floating tensor"),
    ("noise-seed-negative", lambda tmp: noisy_copies(_x(), 0.1, seed=-1, stream=1, models=[0], ids=None),
     "seed must be an integer in [0, 2^64)"),
    ("noise-reference-sigma-zero", lambda tmp: noisy_copies(_x(), 0.0, seed=0, stream=1, models=[0], ids=None,
                                                            backend="reference"), "sigma must be finite and > 0"),
    ("kernel-noise-sigma-zero", lambda tmp: kernel_noise(_x(), torch.zeros(3), torch.arange(3), seed=0, stream=1,
                                                         k0=0, models=1), "sigma must be finite and > 0"),
    ("kernel-noise-sigma-inf", lambda tmp: kernel_noise(_x(), torch.full((3,), INF), torch.arange(3), seed=0,
                                                        stream=1, k0=0, models=1), "sigma must be finite and > 0"),
    ("kernel-noise-x-inf", lambda tmp: kernel_noise(_x().fill_(INF), torch.full((3,), 0.1), torch.arange(3), seed=0,
                                                    stream=1, k0=0, models=1), "x contains NaN or Inf"),
    ("kernel-noise-ids-dtype", lambda tmp: kernel_noise(_x(), torch.full((3,), 0.1), torch.arange(3).int(), seed=0,
                                                        stream=1, k0=0, models=1), "ids must be an int64 tensor"),
    ("kernel-vote-nan", lambda tmp: vote_accumulate(torch.full((2, 3, 2), NAN), torch.zeros(3, 2, dtype=torch.int64),
                                                    torch.zeros(3, 2, dtype=torch.int64)), "logits contain NaN or Inf"),
    ("kernel-vote-shape", lambda tmp: vote_accumulate(torch.zeros(2, 3), torch.zeros(3, 2, dtype=torch.int64),
                                                      torch.zeros(3, 2, dtype=torch.int64)), "shape [Mc, B, C]"),
    ("kernel-vote-top2-one-class", lambda tmp: vote_top2(torch.zeros(3, 1, dtype=torch.int64),
                                                         torch.zeros(3, 1, dtype=torch.int64), by_count=True),
     "C >= 2"),
    ("kernel-radius-alpha", lambda tmp: certify_radius(torch.tensor([0.9]), None, 0.25, models=10, alpha=0.0,
                                                       num_classes=2, bound="hoeffding"), "alpha must be a number"),
    ("kernel-radius-models", lambda tmp: certify_radius(torch.tensor([0.9]), None, 0.25, models=0, alpha=0.01,
                                                        num_classes=2, bound="hoeffding"), "integer >= 1"),
    ("kernel-radius-sigma", lambda tmp: certify_radius(torch.tensor([0.9]), None, -0.25, models=10, alpha=0.01,
                                                       num_classes=2, bound="hoeffding"), "sigma must be finite"),
    ("kernel-radius-score-nan", lambda tmp: certify_radius(torch.tensor([NAN]), None, 0.25, models=10, alpha=0.01,
                                                           num_classes=2, bound="hoeffding"), "in [0, 1] (no NaN)"),
    ("kernel-radius-score-above-one", lambda tmp: certify_radius(torch.tensor([1.5]), None, 0.25, models=10,
                                                                 alpha=0.01, num_classes=2, bound="hoeffding"),
     "in [0, 1] (no NaN)"),
    ("kernel-radius-count", lambda tmp: certify_radius(None, torch.tensor([11]), 0.25, models=10, alpha=0.01,
                                                       num_classes=2, bound="clopper-pearson"), "[0, m=10]"),
    ("kernel-radius-bound", lambda tmp: certify_radius(torch.tensor([0.9]), None, 0.25, models=10, alpha=0.01,
                                                       num_classes=2, bound="wilson"), "unknown bound 'wilson'"),
    ("kernel-radius-classes", lambda tmp: certify_radius(torch.tensor([0.9]), None, 0.25, models=10, alpha=0.01,
                                                         num_classes=1, bound="hoeffding"), "num_classes"),
    ("kernel-proxy-sigma", lambda tmp: kernel_radius_proxy(torch.tensor([[0.7, 0.3]]), 0.0), "sigma must be finite"),
    ("kernel-proxy-nan", lambda tmp: kernel_radius_proxy(torch.tensor([[NAN, 0.3]]), 0.2), "mean_probs contain NaN"),
    ("kernel-proxy-clamp", lambda tmp: kernel_radius_proxy(torch.tensor([[0.7, 0.3]]), 0.2, clamp=(0.9, 0.1)),
     "clamp must satisfy"),
    # bounds (the reference path)
    ("hoeffding-alpha", lambda tmp: hoeffding_lower(torch.tensor([0.9]), 10, 1.0), "alpha must be a number"),
    ("hoeffding-m", lambda tmp: hoeffding_lower(torch.tensor([0.9]), 0, 0.01), "integer >= 1"),
    ("clopper-pearson-m", lambda tmp: clopper_pearson_lower(torch.tensor([3]), 0, 0.01), "integer >= 1"),
    ("radius-sigma-nan", lambda tmp: certified_radius(torch.tensor([0.9], dtype=torch.float64), NAN),
     "finite and > 0"),
    ("proxy-sigma-negative", lambda tmp: radius_proxy(torch.tensor([[0.7, 0.3]]), -1.0), "sigma"),
    # sigma search
    ("sigma-search-range", lambda tmp: SigmaSearch(sigma0=0.25, sigma_min=0.3, sigma_max=0.5).validate(),
     "0 < sigma_min <= sigma0 <= sigma_max"),
    ("sigma-search-lr-nan", lambda tmp: SigmaSearch(sigma0=0.25, lr=NAN, sigma_min=0.1, sigma_max=0.5).validate(),
     "lr must be a finite number > 0"),
    ("sigma-search-sigma0-inf", lambda tmp: SigmaSearch(sigma0=INF).validate(), "sigma0 must be a finite number"),
    ("sigma-optimize-x-nan", lambda tmp: optimize_sigma(_model(), _x().fill_(NAN), torch.arange(3),
                                                        SigmaSearch(sigma0=0.25, sigma_min=0.1, sigma_max=0.5),
                                                        seed=0), "x contains NaN or Inf"),
    # the region store
    ("regions-dim-zero", lambda tmp: RegionStore(0), "dim must be a positive integer"),
    ("regions-x-nan", lambda tmp: RegionStore(4).update(torch.tensor([0.0, NAN, 0.0, 0.0]), 0, 0.5),
     "NaN or inf"),
    ("regions-radius-negative", lambda tmp: RegionStore(4).update(torch.zeros(4), 0, -0.5),
     "radius must be finite and >= 0"),
    ("regions-radius-nan", lambda tmp: RegionStore(4).update(torch.zeros(4), 0, NAN), "radius must be finite"),
    ("regions-label-negative", lambda tmp: RegionStore(4).update(torch.zeros(4), -1, 0.5), "label must be >= 0"),
    ("regions-wrong-dim", lambda tmp: RegionStore(4).update(torch.zeros(5), 0, 0.5), "elements but the store holds"),
    ("regions-stream-lengths", lambda tmp: RegionStore(4).certify_stream(torch.zeros(3, 4), torch.zeros(2).long(),
                                                                         torch.ones(3), torch.zeros(3).bool()),
     "entries but x has N=3"),
    ("regions-unknown-backend", lambda tmp: RegionStore(4, backend="annoy"), "annoy"),
]


def test_certify_models_accepts_triggered_and_perturbed_images():
    # an unclipped blending trigger or a test-time perturbation leaves [0, 1] a little: still certified
    x = _x() + 0.3 * torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    assert float(x.min()) < 0 and float(x.max()) > 1
    cert = certify_models([_model(), _model()], x, 0.25, num_classes=2)
    assert cert.radius.shape == (3,) and bool(torch.isfinite(cert.radius).all())


@pytest.mark.parametrize("call,fragment", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_rejects_bad_input(call, fragment, tmp_path):
    with pytest.raises(CertssbError) as info:
        call(tmp_path)
    assert fragment in str(info.value), str(info.value)


# ----------------------------------------------------------------------------- files
def _idx(path: Path, arr: np.ndarray, magic: int, cut: int = 0, gz: bool = False) -> None:
    raw = struct.pack(">I", magic) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()
    raw = raw[:len(raw) - cut]
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def _mnist(d: Path, cut: int = 0, magic: int = 2051, gz: bool = False) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 20), ("t10k", 10)):
        _idx(d / f"{split}-images-idx3-ubyte", np.zeros((n, 4, 4), np.uint8), magic, cut, gz)
        _idx(d / f"{split}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8), 2049, 0, gz)
    return d


def _mnist_corrupt_gz(d: Path) -> Path:
    _mnist(d, gz=True)
    p = d / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:-12])  # lost the gzip trailer and some data
    return d


def _cifar(d: Path, damage=None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        raw = pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}, protocol=2)
        if damage and name == "data_batch_2":
            raw = damage(raw)
        (d / name).write_bytes(raw)
    return d


def _npz(path: Path, **over) -> Path:
    arrays = {"x_train": np.zeros((6, 4, 4), np.uint8), "y_train": np.array([0, 1] * 3),
              "x_test": np.zeros((2, 4, 4), np.uint8), "y_test": np.array([0, 1])}
    arrays.update(over)
    np.savez(path, **arrays)
    return path


def _npz_truncated(path: Path) -> Path:
    _npz(path)
    path.write_bytes(path.read_bytes()[:150])
    return path


def _image_tree(root: Path, bad: bool) -> Path:
    from PIL import Image

    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (6, 6), (10 * i, 20, 30)).save(root / split / c / f"{i}.png")
    if bad:
        p = root / "train" / "b" / "1.png"
        p.write_bytes(p.read_bytes()[:30])
    return root


def _sigma_file(tmp: Path, mutate) -> Path:
    p = tmp / "sigma.safetensors"
    save_tensors(p, {"train": torch.full((4,), 0.25), "clean": torch.full((2,), 0.25),
                     "triggered": torch.full((1,), 0.25)})
    mutate(p)
    return p


def _truncate(p: Path, keep: int | None = None) -> None:
    raw = p.read_bytes()
    p.write_bytes(raw[: (len(raw) // 2 if keep is None else keep)])


def _flip_last(p: Path) -> None:
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 0x10
    p.write_bytes(bytes(raw))


def _regions_file(tmp: Path, mutate) -> Path:
    s = RegionStore(4)
    s.update(torch.zeros(4), 0, 0.5)
    s.update(torch.ones(4), 1, 0.5)
    p = tmp / "regions.safetensors"
    s.save(p)
    mutate(p)
    return p


def _load_sigma(p: Path):
    return rundir.load_sigma(p, {"train": 4, "clean": 2, "triggered": 1})


FILE_CASES = [
    ("mnist-truncated", lambda t: load_task("mnist", data_dir=_mnist(t / "m", cut=5)), DataError,
     "the file is truncated or corrupt"),
    ("mnist-bad-magic", lambda t: load_task("mnist", data_dir=_mnist(t / "m", magic=1234)), DataError,
     "magic number 1234"),
    ("mnist-gz-corrupt", lambda t: load_task("mnist", data_dir=_mnist_corrupt_gz(t / "m")), DataError,
     "truncated or corrupt"),
    ("cifar-truncated", lambda t: load_task("cifar10", data_dir=_cifar(t / "c", lambda r: r[:len(r) // 2])),
     DataError, "the file is truncated or corrupt"),
    ("cifar-garbage", lambda t: load_task("cifar10", data_dir=_cifar(t / "c", lambda r: b"\x00garbage" * 10)),
     DataError, "data_batch_2"),
    ("cifar-wrong-shape", lambda t: load_task("cifar10", data_dir=_cifar(
        t / "c", lambda r: pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})),
    ), DataError, "expected uint8 [N, 3072]"),
    ("npz-truncated", lambda t: load_task("numpy", data_dir=_npz_truncated(t / "d.npz")), DataError,
     "truncated or corrupt"),
    ("npz-values-above-one", lambda t: load_task("numpy", data_dir=_npz(t / "d.npz", x_train=np.full((6, 4, 4), 3.0))),
     DataError, "float images must be finite and in [0, 1]"),
    ("npz-nan", lambda t: load_task("numpy", data_dir=_npz(t / "d.npz", x_test=np.full((2, 4, 4), np.nan))),
     DataError, "float images must be finite and in [0, 1]"),
    ("npz-wrong-shape", lambda t: load_task("numpy", data_dir=_npz(t / "d.npz", x_train=np.zeros((6, 4, 4, 4, 4)))),
     DataError, "expected [N, H, W]"),
    ("npz-label-count", lambda t: load_task("numpy", data_dir=_npz(t / "d.npz", y_train=np.array([0, 1]))),
     DataError, "2 labels for 6 images"),
    ("npz-object-array", lambda t: load_task("numpy", data_dir=_npz(t / "d.npz", y_test=np.array([{}, {}], dtype=object))),
     DataError, "no object dtype"),
    ("image-truncated", lambda t: load_task("folder", data_dir=_image_tree(t / "f", bad=True)), DataError,
     "cannot decode image"),
    ("sigma-truncated", lambda t: _load_sigma(_sigma_file(t, _truncate)), CheckpointError, "truncated"),
    ("sigma-flipped-byte", lambda t: _load_sigma(_sigma_file(t, _flip_last)), CheckpointError,
     "does not match its embedded checksum"),
    ("sigma-missing", lambda t: _load_sigma(t / "sigma.safetensors"), CheckpointError, "run `certssb train`"),
    ("sigma-wrong-size", lambda t: rundir.load_sigma(_sigma_file(t, lambda p: None),
                                                       {"train": 5, "clean": 2, "triggered": 1}),
     CheckpointError, "expected float [5]"),
    ("sigma-nonpositive", lambda t: _load_sigma(_sigma_file(t, lambda p: save_tensors(p, {
        "train": torch.tensor([0.25, 0.0, 0.25, 0.25]), "clean": torch.full((2,), 0.25),
        "triggered": torch.full((1,), 0.25)}))), CheckpointError, "not finite and > 0"),
    ("regions-truncated", lambda t: RegionStore.load(_regions_file(t, _truncate)), CheckpointError, "truncated"),
    ("regions-flipped-byte", lambda t: RegionStore.load(_regions_file(t, _flip_last)), CheckpointError,
     "does not match its embedded checksum"),
    ("regions-not-safetensors", lambda t: RegionStore.load(_regions_file(t, lambda p: p.write_bytes(b"x" * 64))),
     CheckpointError, "not a safetensors file"),
    ("config-not-json", lambda t: check_compatible(_rundir(t, raw="{half")), CheckpointError, "is not valid JSON"),
    ("config-not-a-run", lambda t: check_compatible(_rundir(t, obj={"hello": 1})), CheckpointError,
     "not a certssb run record"),
]


@pytest.mark.parametrize("call,error,fragment", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_loaders_reject_bad_files(call, error, fragment, tmp_path):
    with pytest.raises(error) as info:
        call(tmp_path)
    assert fragment in str(info.value), str(info.value)


# ----------------------------------------------------------------------------- run directories
def _rundir(tmp: Path, *, fmt: int = RUN_FORMAT, version: str = "0.0.1", raw: str | None = None,
            obj: dict | None = None, name: str = "run") -> Path:
    out = tmp / name
    out.mkdir(parents=True, exist_ok=True)
    if raw is not None:
        (out / "config.json").write_text(raw)
    else:
        cfg = RunConfig(models=2, epochs=1, max_train=100, max_test=20, out=str(out)).to_dict()
        atomic_write_json(out / "config.json", obj if obj is not None else
                          {"format": fmt, "certssb": version, "torch": torch.__version__, "config": cfg})
    return out


def _summary(out: Path) -> Path:
    atomic_write_json(out / "summary.json", {"config": {"radii": [0.0]}, "methods": {}})
    return out


@pytest.mark.parametrize("kind,fragment", [
    ("newer-format", "upgrade certssb (pip install -U certssb) or use a fresh --out directory"),
    ("newer-version", "upgrade certssb (pip install -U certssb) or use a fresh --out directory"),
    ("older-format", "rerun into a fresh --out directory"),
])
def test_incompatible_run_directory_is_refused_everywhere(kind, fragment, tmp_path, capsys):
    fmt, version = {"newer-format": (RUN_FORMAT + 1, "0.0.1"), "newer-version": (RUN_FORMAT, "99.0.0"),
                    "older-format": (RUN_FORMAT - 1, "0.0.1")}[kind]
    out = _summary(_rundir(tmp_path, fmt=fmt, version=version))
    before = (out / "config.json").read_text()
    with pytest.raises(CheckpointError, match="certssb"):
        check_compatible(out)
    with pytest.raises(CheckpointError) as info:
        pipeline.run(RunConfig(models=2, epochs=1, out=str(out)), progress=False, log=lambda s: None)
    assert fragment in str(info.value)
    for cmd in (["run"], ["train"], ["certify"], ["report"]):
        extra = ["--models", "2", "--epochs", "1", "--quiet"] if cmd[0] in ("run", "train") else []
        assert main([*cmd, "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert fragment in err and "Traceback" not in err and err.startswith("certssb: error:")
    assert (out / "config.json").read_text() == before  # nothing was overwritten


def test_compatible_run_directory_passes(tmp_path):
    assert check_compatible(tmp_path / "fresh") is None
    saved = check_compatible(_rundir(tmp_path, version="0.0.1"))
    assert saved["format"] == RUN_FORMAT


# ----------------------------------------------------------------------------- the CLI
def _certify_dir(tmp: Path) -> Path:
    return _rundir(tmp, name="untrained")


def _damaged_csv_dir(tmp: Path) -> Path:
    out = _rundir(tmp, name="csv")
    atomic_write_json(out / "summary.json", {"config": {"radii": [0.0]},
                                             "methods": {"rab": {"mode": "rab", "storage_update": {}}}})
    (out / "certificates-rab-clean.csv").write_text("idx,label,predict\n0,1,1\n")
    (out / "certificates-rab-triggered.csv").write_text("idx,label,predict\n0,1,1\n")
    return out


def _evil_summary_dir(tmp: Path) -> Path:
    out = _rundir(tmp, name="evil")
    atomic_write_json(out / "summary.json", {"config": {"radii": [0.0]}, "methods": {"../../../x": {}}})
    return out


def _file(tmp: Path) -> Path:
    p = tmp / "a-file"
    p.write_text("not a folder")
    return p


RUN_TAIL = ["--models", "2", "--epochs", "1", "--max-train", "200", "--max-test", "20", "--quiet"]

# (id, argv with {tmp} for tmp_path, setup(tmp) or None, message fragment)
CLI_CASES = [
    # argparse level
    ("no-subcommand", [], None, "usage: certssb"),
    ("unknown-subcommand", ["fly"], None, "invalid choice: 'fly'"),
    ("run-unknown-dataset", ["run", "--dataset", "svhn"], None, "invalid choice: 'svhn'"),
    ("run-unknown-trigger", ["run", "--trigger", "laser"], None, "invalid choice: 'laser'"),
    ("run-unknown-bound", ["run", "--bound", "wilson"], None, "invalid choice: 'wilson'"),
    ("run-unknown-backend", ["run", "--backend", "fast"], None, "invalid choice: 'fast'"),
    ("run-models-not-int", ["run", "--models", "many"], None, "invalid int value: 'many'"),
    ("run-alpha-not-float", ["run", "--alpha", "tiny"], None, "invalid float value: 'tiny'"),
    ("run-classes-text", ["run", "--classes", "one,zero"], None, "not a comma-separated list"),
    ("run-radii-text", ["run", "--radii", "a:b"], None, "cannot read radii 'a:b'"),
    ("run-pixel-text", ["run", "--trigger-pixel", "3"], None, "expected ROW,COL"),
    ("run-unknown-flag", ["run", "--sigmaa", "0.2"], None, "unrecognized arguments"),
    ("report-needs-out", ["report"], None, "the following arguments are required: --out"),
    ("certify-needs-out", ["certify"], None, "the following arguments are required: --out"),
    # run / train: values
    ("run-alpha", ["run", "--alpha", "2", "--out", "{tmp}/o"], None, "--alpha must lie in (0, 1)"),
    ("run-alpha-nan", ["run", "--alpha", "nan", "--out", "{tmp}/o"], None, "--alpha must lie in (0, 1)"),
    ("run-sigma0-zero", ["run", "--sigma0", "0", "--out", "{tmp}/o"], None, "--sigma0 must be a finite number > 0"),
    ("run-sigma0-inf", ["run", "--sigma0", "inf", "--out", "{tmp}/o"], None, "--sigma0 must be a finite number > 0"),
    ("run-models-zero", ["run", "--models", "0", "--out", "{tmp}/o"], None, "--models must be an integer >= 1"),
    ("run-device", ["run", "--device", "tpu", "--out", "{tmp}/o"], None, "unknown device 'tpu'"),
    ("run-arch", ["run", "--arch", "vgg", "--out", "{tmp}/o"], None, "unknown architecture 'vgg'"),
    ("run-classes-repeated", ["run", "--classes", "1,1", "--out", "{tmp}/o"], None, "--classes repeats a class"),
    ("run-classes-missing", ["run", "--classes", "3,42", "--out", "{tmp}/o", *RUN_TAIL], None,
     "class id(s) [42] not in digits"),
    ("run-poison-none", ["run", "--poison-rate", "0.0001", "--out", "{tmp}/o", *RUN_TAIL], None,
     "the smallest rate that works is just above 0.5/200 = 0.0025"),
    ("run-data-dir", ["run", "--dataset", "mnist", "--data-dir", "{tmp}/nowhere", "--out", "{tmp}/o"], None,
     "does not exist"),
    ("run-corrupt-mnist", ["run", "--dataset", "mnist", "--data-dir", "{tmp}/m", "--out", "{tmp}/o"],
     lambda t: _mnist(t / "m", cut=7), "truncated or corrupt"),
    ("run-out-is-a-file", ["run", "--out", "{tmp}/a-file", *RUN_TAIL], _file, "cannot create the run directory"),
    ("train-alpha", ["train", "--alpha", "0", "--out", "{tmp}/o"], None, "--alpha must lie in (0, 1)"),
    ("train-sigma0", ["train", "--sigma0", "-1", "--out", "{tmp}/o"], None, "--sigma0 must be a finite number > 0"),
    ("train-epochs", ["train", "--epochs", "0", "--out", "{tmp}/o"], None, "--epochs must be an integer >= 1"),
    # certify
    ("certify-no-run", ["certify", "--out", "{tmp}/nowhere"], None, "config.json not found"),
    ("certify-alpha", ["certify", "--out", "{tmp}/untrained", "--alpha", "5"], _certify_dir,
     "--alpha must lie in (0, 1)"),
    ("certify-device", ["certify", "--out", "{tmp}/untrained", "--device", "tpu"], _certify_dir,
     "unknown device 'tpu'"),
    ("certify-untrained", ["certify", "--out", "{tmp}/untrained", "--quiet"], _certify_dir,
     "run `certssb train` first"),
    ("certify-regions-missing", ["certify", "--out", "{tmp}/untrained", "--regions", "{tmp}/r.safetensors"],
     _certify_dir, "does not exist"),
    ("certify-regions-pickle", ["certify", "--out", "{tmp}/untrained", "--regions", "{tmp}/r.safetensors"],
     lambda t: (_certify_dir(t), (t / "r.safetensors").write_bytes(pickle.dumps({"x": 1}))),
     "not a safetensors file"),
    ("certify-config-not-json", ["certify", "--out", "{tmp}/run"], lambda t: _rundir(t, raw="{"),
     "is not valid JSON"),
    # report
    ("report-no-run", ["report", "--out", "{tmp}/nowhere"], None, "has no summary.json"),
    ("report-radii", ["report", "--out", "{tmp}/nowhere", "--radii", "0:1:0"], None, "cannot read radii"),
    ("report-negative-radii", ["report", "--out", "{tmp}/run", "--radii=-1,0"], lambda t: _summary(_rundir(t)),
     "radii must be non-negative finite numbers"),
    ("report-summary-not-json", ["report", "--out", "{tmp}/run"],
     lambda t: (_rundir(t), (t / "run" / "summary.json").write_text("{")), "is not valid JSON"),
    ("report-damaged-csv", ["report", "--out", "{tmp}/csv"], _damaged_csv_dir, "is damaged (columns"),
    ("report-method-path", ["report", "--out", "{tmp}/evil"], _evil_summary_dir, "refusing to follow it"),
]


@pytest.mark.parametrize("argv,setup,fragment", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_user_errors_exit_2_without_traceback(argv, setup, fragment, tmp_path, capsys):
    if setup is not None:
        setup(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    text = captured.err + captured.out
    assert fragment in text, text
    assert "Traceback" not in text
    if captured.err.startswith("usage:"):  # argparse: the usage, then one error line
        assert captured.err.count(" error: ") == 1, captured.err
    elif argv:  # one message on one line (after any progress log lines), prefixed like every CertssbError
        lines = captured.err.rstrip("\n").split("\n")
        assert lines[-1].startswith("certssb: error: ") and fragment in lines[-1], captured.err
        assert sum("error" in line for line in lines) == 1, captured.err


@pytest.mark.parametrize("argv", [
    ["run", "--alpha", "2"], ["train", "--sigma0", "0"], ["certify", "--out", "{tmp}/nowhere"],
    ["report", "--out", "{tmp}/nowhere"]], ids=["run", "train", "certify", "report"])
def test_debug_reraises_with_traceback_for_every_subcommand(argv, tmp_path, monkeypatch):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0] in ("run", "train"):
        argv += ["--out", str(tmp_path / "o")]
    with pytest.raises(CertssbError):
        main(argv + ["--debug"])
    monkeypatch.setenv("CERTSSB_DEBUG", "1")
    with pytest.raises(CertssbError):
        main(argv)


def test_module_entry_point_debug_prints_the_traceback(tmp_path):
    base = [sys.executable, "-m", "certssb", "report", "--out", str(tmp_path / "nowhere")]
    plain = subprocess.run(base, capture_output=True, text=True)
    debug = subprocess.run(base + ["--debug"], capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip() == f"certssb: error: {tmp_path / 'nowhere'} has no summary.json; run " \
                                   "`certssb run` or `certssb certify` first"
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "CertssbError" in debug.stderr

