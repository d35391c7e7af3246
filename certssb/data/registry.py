"""The dataset registry: what a dataset is to the rest of the package, and the table of them.

A dataset is a `DatasetSpec`: a reader that turns a location into a `Catalog`
(class ids and names, a source line, and a loader of the train/test `Split`s),
how that location is found, and the paper's training schedule for it. Each
dataset module (digits.py, mnist.py, ...) builds its spec and calls
`register_dataset`; `certssb/data/__init__.py` imports those modules, so adding
a dataset is one new module plus one import line there. Everything that lists
or looks up datasets (`load_task`, `resolve_data_dir`, `RunConfig`, the CLI's
--dataset choices) reads this table at call time, so a dataset registered later
(a plugin, a test) is as usable as the built-in ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch

from ..core.registry import Registry
from ..errors import CertssbError

__all__ = ["Split", "Catalog", "TrainingDefaults", "DatasetSpec", "register_dataset",
           "register_reader", "unregister_dataset", "get_dataset", "dataset_names", "training_defaults"]


@dataclass
class Split:
    """One split restricted to the selected classes, materialized lazily.

    `labels` are ORIGINAL class ids (int64 [N]); `fetch(idx)` returns the images
    at those positions as float32 [n, C, H, W] in [0, 1] (decoding files only then).
    """

    labels: np.ndarray
    fetch: Callable[[np.ndarray], torch.Tensor]


@dataclass
class Catalog:
    """What a reader knows before decoding: class ids/names, source, and a split loader.

    `load(selected)` returns the (train, test) splits holding only the samples
    of the `selected` original class ids.
    """

    class_ids: list[int]
    class_names: list[str]
    source: str
    load: Callable[[list[int]], tuple[Split, Split]]


@dataclass(frozen=True)
class TrainingDefaults:
    """A dataset's defaults for the fields a `RunConfig` leaves as None.

    trigger / poison_rate / radii: None means the run-wide default (onepixel,
    0.02, 0:2.5:0.25; see certssb/runner/config.py). trigger_pixels: the
    trigger position per trigger name, where the image centre is a bad place.
    """

    epochs: int
    batch_size: int
    lr: float
    models: int
    trigger: Optional[str] = None
    poison_rate: Optional[float] = None
    radii: Optional[tuple[float, ...]] = None
    trigger_pixels: Mapping[str, tuple[int, int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The schedule as a plain dict (epochs, batch_size, lr, models, and whichever of
        trigger, poison_rate, radii are set; radii as a list)."""
        out: dict[str, Any] = {"epochs": self.epochs, "batch_size": self.batch_size,
                               "lr": self.lr, "models": self.models}
        if self.trigger is not None:
            out["trigger"] = self.trigger
        if self.poison_rate is not None:
            out["poison_rate"] = self.poison_rate
        if self.radii is not None:
            out["radii"] = list(self.radii)
        return out


# reader(location, image_size): location is the path `resolve_data_dir` found, or None
# for a dataset that reads no files; image_size is the requested side or None.
Reader = Callable[[Optional[Path], Optional[int]], Catalog]


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: its reader, how its files are found, and its training defaults.

    Exactly one way of finding the data applies:

    - `no_files` set (e.g. "embedded in scikit-learn"): the dataset reads no
      files; the reader gets location None and a --data-dir is refused.
    - `check_path` set: the user must pass --data-dir; `check_path(path)`
      validates it and returns what the reader gets. `expected` completes
      "needs --data-dir pointing at ...".
    - else `detect(dir)` says whether a directory holds the dataset; it is
      searched for in --data-dir, $CERTSSB_DATA or the default roots, each
      directly and in `subfolders`. `expected` completes "looked for ...".

    default_arch: the architecture a run uses when --arch is not given (None:
    chosen from the image shape). class_names: the standard class names, for
    documentation; the reader's `Catalog` is what a task uses.
    """

    name: str
    read: Reader
    training: TrainingDefaults
    expected: str = ""
    detect: Optional[Callable[[Path], bool]] = None
    subfolders: tuple[str, ...] = ()
    check_path: Optional[Callable[[Path], Path]] = None
    no_files: Optional[str] = None
    default_arch: Optional[str] = None
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        ways = sum(x is not None for x in (self.no_files, self.check_path, self.detect))
        if ways != 1:
            raise CertssbError(f"dataset spec {self.name!r} must set exactly one of no_files, "
                               f"check_path and detect (it sets {ways})")


_REGISTRY: Registry[DatasetSpec] = Registry("dataset")


def register_dataset(spec: DatasetSpec, *, replace: bool = False) -> DatasetSpec:
    """Add `spec` to the registry (in registration order) and return it.

    A name already registered raises `CertssbError` unless `replace=True`.
    """
    if not isinstance(spec, DatasetSpec):
        raise CertssbError(f"register_dataset takes a DatasetSpec, got {type(spec).__name__}")
    return _REGISTRY.add(spec.name, spec, replace=replace)


def register_reader(name: str, **fields: Any) -> Callable[[Reader], Reader]:
    """Decorator form: `@register_reader("x", training=..., detect=...)` on a reader function
    registers `DatasetSpec(name="x", read=<the function>, **fields)` and returns the function."""
    def wrap(read: Reader) -> Reader:
        register_dataset(DatasetSpec(name=name, read=read, **fields))
        return read
    return wrap


unregister_dataset = _REGISTRY.remove
dataset_names = _REGISTRY.names
get_dataset = _REGISTRY.get


def training_defaults(name: str) -> dict[str, Any]:
    """`get_dataset(name).training.as_dict()`: the dataset's schedule as a plain dict."""
    return get_dataset(name).training.as_dict()
