"""The run configuration: every knob of a run, its defaults and its validation.

A `RunConfig` is everything needed to reproduce a run (with the package
version, written to `config.json`). Fields left as None take the paper's
per-dataset defaults in `resolve()`; `validate()` checks every value at the API
boundary with a message that says what to change.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..attacks import TRIGGERS as TRIGGER_NAMES, check_trigger_options, trigger_names  # noqa: F401  (TRIGGER_NAMES: re-exported)
from ..certify.bounds import BOUNDS as BOUND_NAMES
from ..data import dataset_names, get_dataset, training_defaults
from ..errors import CertssbError
from ..kernels import check_backend
from ..smoothing.engine import check_engine
from ..models import arch_names

METHOD_NAMES = ("cert-ssb", "rab")

# Per-dataset schedules (epochs, batch size, lr, models, and for some the trigger, poison
# rate, radii and trigger position) are part of each dataset's registration in certssb/data/.
DEFAULT_RADII = tuple(round(0.25 * i, 2) for i in range(11))  # 0 .. 2.5


@dataclass
class RunConfig:
    """All settings of a run. See `certssb run --help` for the meaning of each."""

    dataset: str = "digits"
    data_dir: Optional[str] = None
    classes: Optional[list[int]] = None
    image_size: Optional[int] = None
    max_train: Optional[int] = None
    max_test: Optional[int] = None
    arch: Optional[str] = None
    trigger: Optional[str] = None  # default: onepixel (blending for digits)
    delta: float = 1.0
    trigger_pixel: Optional[list[int]] = None  # default: image centre (MNIST: RAB's positions)
    trigger_options: Optional[dict] = None  # the trigger's own parameters, e.g. {"patch_size": 4}
    poison_rate: Optional[float] = None  # default: 0.02 (0.05 for digits)
    target: Optional[int] = None  # original class id; default: 0 if among the classes, else the first
    all_to_all: bool = False
    method: str = "both"
    sigma0: float = 0.25
    sigma_steps: int = 5  # K; cheap defaults for CPUs: each step costs `draws` passes per sample
    sigma_draws: int = 4
    sigma_lr: Optional[float] = None  # default 0.1 * sigma0 per unit of gradient
    sigma_min: Optional[float] = None  # default sigma0 / 2
    sigma_max: Optional[float] = None  # default 2 * sigma0
    base_epochs: Optional[int] = None  # default: same as epochs
    models: Optional[int] = None
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    bound: str = "hoeffding"
    alpha: float = 0.001
    radii: Optional[list[float]] = None  # default 0:2.5:0.25 (0:0.25:0.025 for digits)
    storage_update: bool = True
    region_order: str = "index"
    eval_batch_size: int = 128  # images per forward pass (sigma search, certification); small is
                                # faster on CPUs (cache-resident activations: 2x at 128 vs 512)
    group_size: Optional[int] = None  # models trained at once; None: from free memory, then recorded
    init_weights: Optional[str] = None  # a ResNet-18 checkpoint every model starts from (--init-weights)
    seed: int = 0
    device: str = "auto"
    backend: str = "kernels"  # "kernels": native C++/CUDA ops; "reference": pure PyTorch (same results)
    # precision / execution variant of the grouped models (certssb.smoothing.engine): "auto" is fp32 on a
    # CPU (today's computation) and per architecture on a GPU; the resolved engine is recorded
    engine: str = "auto"
    out: str = "runs/latest"

    # ---------------------------------------------------------------- helpers
    @property
    def methods(self) -> list[str]:
        return ["rab", "cert-ssb"] if self.method == "both" else [self.method]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("trigger_options", "init_weights"):  # unset: config.json / summary.json as before
            if d[key] is None:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CertssbError(f"unknown config keys {unknown}; valid keys: {sorted(names)}")
        return cls(**d)

    def resolve(self) -> "RunConfig":
        """A copy with every None default filled in (dataset schedule, sigma range), validated."""
        c = dataclasses.replace(self)
        _check_dataset(c.dataset)
        dflt = training_defaults(c.dataset)
        c.epochs = dflt["epochs"] if c.epochs is None else c.epochs
        c.batch_size = dflt["batch_size"] if c.batch_size is None else c.batch_size
        c.lr = dflt["lr"] if c.lr is None else c.lr
        c.models = dflt["models"] if c.models is None else c.models
        c.trigger = dflt.get("trigger", "onepixel") if c.trigger is None else c.trigger
        c.poison_rate = dflt.get("poison_rate", 0.02) if c.poison_rate is None else c.poison_rate
        c.base_epochs = c.epochs if c.base_epochs is None else c.base_epochs
        if isinstance(c.sigma0, (int, float)) and c.sigma0 > 0:
            c.sigma_lr = 0.1 * c.sigma0 if c.sigma_lr is None else c.sigma_lr
            c.sigma_min = c.sigma0 / 2 if c.sigma_min is None else c.sigma_min
            c.sigma_max = 2 * c.sigma0 if c.sigma_max is None else c.sigma_max
        if c.trigger_pixel is None:
            pixel = get_dataset(c.dataset).training.trigger_pixels.get(c.trigger)
            c.trigger_pixel = None if pixel is None else list(pixel)
        radii = dflt.get("radii", DEFAULT_RADII) if c.radii is None else c.radii
        c.radii = sorted({float(r) for r in radii})
        c.validate()
        return c

    def validate(self) -> None:
        """Raise CertssbError naming the first bad setting and what to do."""
        def positive_int(name, v, minimum=1):
            if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
                raise CertssbError(f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {v!r}")

        def finite_pos(name, v):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise CertssbError(f"--{name.replace('_', '-')} must be a finite number > 0, got {v!r}")

        _check_dataset(self.dataset)
        if self.method not in METHOD_NAMES + ("both",):
            raise CertssbError(f"unknown method {self.method!r}; choose cert-ssb, rab or both")
        if self.trigger is not None and self.trigger not in trigger_names():
            raise CertssbError(f"unknown trigger {self.trigger!r}; choose one of {', '.join(trigger_names())}")
        if self.trigger_options is not None:
            check_trigger_options(self.trigger, self.trigger_options)
        if self.bound not in BOUND_NAMES:
            raise CertssbError(f"unknown bound {self.bound!r}; choose one of {', '.join(BOUND_NAMES)}")
        if self.arch is not None and self.arch not in arch_names():
            raise CertssbError(f"unknown architecture {self.arch!r}; choose one of {', '.join(arch_names())} "
                               "(or leave --arch out for the dataset's default)")
        if self.init_weights is not None and (not isinstance(self.init_weights, (str, os.PathLike))
                                              or not str(self.init_weights)):
            raise CertssbError(f"--init-weights must be the path of a ResNet-18 checkpoint file, got "
                               f"{self.init_weights!r}")
        if self.data_dir is not None and not isinstance(self.data_dir, (str, os.PathLike)):
            raise CertssbError(f"--data-dir must be a path, got {self.data_dir!r}")
        if not isinstance(self.out, (str, os.PathLike)) or not str(self.out):
            raise CertssbError(f"--out must be a folder path, got {self.out!r}")
        if self.classes is not None:
            if not isinstance(self.classes, (list, tuple)) or any(
                    isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in self.classes):
                raise CertssbError(f"--classes must be a list of class ids (integers >= 0), e.g. [1, 0]; "
                                   f"got {self.classes!r}")
            if len(self.classes) < 2:
                raise CertssbError(f"--classes needs at least two classes, got {self.classes}")
            if len(set(self.classes)) != len(self.classes):
                raise CertssbError(f"--classes repeats a class: {self.classes}")
        finite_pos("delta", self.delta)
        finite_pos("sigma0", self.sigma0)
        for name in ("sigma_lr", "sigma_min", "sigma_max", "lr"):
            if getattr(self, name) is not None:
                finite_pos(name, getattr(self, name))
        if self.sigma_min is not None and self.sigma_max is not None and not (
                self.sigma_min <= self.sigma0 <= self.sigma_max):
            raise CertssbError(f"need sigma-min <= sigma0 <= sigma-max, got {self.sigma_min}, "
                               f"{self.sigma0}, {self.sigma_max}")
        if self.poison_rate is not None and not (
                isinstance(self.poison_rate, (int, float)) and 0 < self.poison_rate < 1):
            raise CertssbError(f"--poison-rate must lie in (0, 1), got {self.poison_rate!r}")
        if not (isinstance(self.alpha, float) and 0 < self.alpha < 1):
            raise CertssbError(f"--alpha must lie in (0, 1), got {self.alpha!r}")
        for name in ("models", "epochs", "batch_size", "base_epochs"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name))
        positive_int("sigma_steps", self.sigma_steps, 0)
        positive_int("sigma_draws", self.sigma_draws)
        positive_int("eval_batch_size", self.eval_batch_size)
        if self.group_size is not None:
            positive_int("group_size", self.group_size)
        for name in ("max_train", "max_test", "image_size"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name))
        if not isinstance(self.seed, int) or not (0 <= self.seed < 2 ** 63):
            raise CertssbError(f"--seed must be an integer in [0, 2^63), got {self.seed!r}")
        if self.radii is not None and (not self.radii or any(
                (not isinstance(r, (int, float))) or (not math.isfinite(r)) or r < 0 for r in self.radii)):
            raise CertssbError(f"--radii must be non-negative finite numbers, got {self.radii}")
        check_backend(self.backend)
        check_engine(self.engine)
        if self.region_order not in ("index", "random"):
            raise CertssbError(f"--region-order must be index or random, got {self.region_order!r}")
        if self.trigger_pixel is not None and (len(self.trigger_pixel) != 2 or any(
                not isinstance(v, int) or v < 0 for v in self.trigger_pixel)):
            raise CertssbError(f"--trigger-pixel must be ROW,COL of non-negative integers, got {self.trigger_pixel}")
        if self.target is not None and (isinstance(self.target, bool) or not isinstance(self.target, int)
                                        or self.target < 0):
            raise CertssbError(f"--target must be a class id (an integer >= 0), got {self.target!r}")
        if self.all_to_all and self.target is not None:
            raise CertssbError("--all-to-all relabels every class to the next one; do not also give --target")
        resolve_device(self.device)


def _check_dataset(name: Any) -> None:
    names = dataset_names()
    if name not in names:
        raise CertssbError(f"unknown dataset {name!r}; choose one of {', '.join(names)}")


def __getattr__(name: str) -> Any:
    # DATASET_NAMES / DATASET_DEFAULTS read the dataset registry at each access, so a
    # dataset registered after this import is listed too.
    if name == "DATASET_NAMES":
        return dataset_names()
    if name == "DATASET_DEFAULTS":
        return {n: training_defaults(n) for n in dataset_names()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; validates explicit names."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise CertssbError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CertssbError(f"device {name!r} was asked for but torch sees no CUDA GPU; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise CertssbError(f"device type {dev.type!r} is not supported; use cpu or cuda")
    return dev


def parse_radii(text: str) -> list[float]:
    """'0:2.5:0.25' (start:stop:step, inclusive) or '0,0.5,1' -> list of floats."""
    try:
        if ":" in text:
            start, stop, step = (float(t) for t in text.split(":"))
            if step <= 0:
                raise ValueError
            n = int(math.floor((stop - start) / step + 1e-9)) + 1
            return [round(start + i * step, 10) for i in range(max(n, 0))]
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise CertssbError(f"cannot read radii {text!r}; use start:stop:step (e.g. 0:2.5:0.25) "
                           f"or a comma list (e.g. 0,0.5,1)") from None
