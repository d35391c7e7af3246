"""A classification task from a registered dataset: pick the classes, relabel, subsample, resize.

`load_task` finds the dataset (`resolve_data_dir`), reads it with the
registered reader, keeps the selected classes, relabels them to task labels
0..K-1 in the order given, optionally subsamples and resizes, and returns a
`TaskData` with float32 images in [0, 1] of shape [N, C, H, W] and int64
labels of shape [N]. Nothing here normalizes: sigma and radii downstream are
in [0, 1] pixel units, as in the paper (docs/THEORY.md).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import CertssbError, DataError
from .images import use_image_cache
from .locate import resolve_data_dir
from .registry import get_dataset

__all__ = ["TaskData", "parse_classes", "load_task"]


@dataclass
class TaskData:
    """A loaded classification task.

    Images are float32 in [0, 1], shape [N, C, H, W]; labels are int64 [N] task
    labels 0..K-1, where task label j is original class `classes[j]` of the dataset.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[int]
    class_names: list[str]
    source: str

    @property
    def num_classes(self) -> int:
        """Number of task classes K."""
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        c, h, w = self.x_train.shape[1:]
        return (int(c), int(h), int(w))

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary: name, classes, class_names, n_train, n_test, image_shape, source."""
        return {
            "name": self.name,
            "classes": [int(c) for c in self.classes],
            "class_names": list(self.class_names),
            "n_train": int(self.x_train.shape[0]),
            "n_test": int(self.x_test.shape[0]),
            "image_shape": list(self.image_shape),
            "source": self.source,
        }


# --------------------------------------------------------------------------- arguments


def parse_classes(text: str | None) -> list[int] | None:
    """Parse a `--classes` value: "1,0" -> [1, 0]; None, "" or "all" -> None (all classes).

    The order matters: task label j is the j-th id. Anything but comma-separated
    non-negative integers raises `CertssbError`.
    """
    if text is None:
        return None
    s = str(text).strip()
    if s == "" or s.lower() == "all":
        return None
    parts = [p.strip() for p in s.split(",")]
    if not all(re.fullmatch(r"\d+", p) for p in parts):
        raise CertssbError(
            f"--classes {text!r} is not a comma-separated list of class ids: write e.g. '1,0' "
            "(task label 0 = class 1, task label 1 = class 0) or 'all'")
    return [int(p) for p in parts]


def _check_optional_positive(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise CertssbError(f"{what} must be a positive integer or None (got {value!r}); "
                           f"omit it to use everything")
    return int(value)


def _format_class_list(ids: Sequence[int], names: Sequence[str], limit: int = 30) -> str:
    items = [f"{i}={n}" if str(i) != n else str(i) for i, n in zip(ids, names)]
    if len(items) > limit:
        items = items[:limit] + [f"... ({len(ids)} in all)"]
    return ", ".join(items)


def _select_classes(classes: Sequence[int] | str | None, dataset: str,
                    ids: list[int], names: list[str]) -> list[int]:
    """Validate the requested class ids against the dataset's and return them in task order."""
    if isinstance(classes, str):
        classes = parse_classes(classes)
    valid = _format_class_list(ids, names)
    if classes is None:
        if len(ids) < 2:
            raise DataError(f"{dataset} has only {len(ids)} class(es) ({valid}); a classification "
                            "task needs at least 2: add classes to the data")
        return list(ids)
    try:
        sel = [int(c) for c in classes]
        if any(isinstance(c, bool) or int(c) != c for c in classes):
            raise TypeError
    except (TypeError, ValueError):
        raise CertssbError(f"classes must be a sequence of integer class ids, got {classes!r}; "
                           f"valid ids for {dataset}: {valid}") from None
    if len(sel) < 2:
        raise CertssbError(f"classes={sel} selects fewer than 2 classes; pick at least two, "
                           f"e.g. '1,0' (valid ids for {dataset}: {valid}) or 'all'")
    seen: set[int] = set()
    for c in sel:
        if c in seen:
            raise CertssbError(f"class {c} is repeated in classes={sel}; list each class once")
        seen.add(c)
    id_set = set(ids)
    bad = [c for c in sel if c not in id_set]
    if bad:
        raise CertssbError(f"class id(s) {bad} not in {dataset}; valid ids: {valid}")
    return sel


# --------------------------------------------------------------------------- entry point


def _subsample(n: int, k: int | None, seed: int, stream: int) -> np.ndarray:
    """`k` of `n` positions chosen at random by (seed, stream), returned in increasing order."""
    if k is None or k >= n:
        return np.arange(n)
    rng = np.random.default_rng([seed, stream])
    return np.sort(rng.choice(n, size=k, replace=False))


def load_task(dataset: str, *, data_dir: str | os.PathLike | None = None,
              classes: Sequence[int] | str | None = None, image_size: int | None = None,
              max_train: int | None = None, max_test: int | None = None,
              seed: int = 0, cache_dir: str | os.PathLike | None = None) -> TaskData:
    """Load `dataset` as a classification task over `classes`.

    classes: original class ids in task-label order (`[1, 0]`: task label 0 is
    class 1); None = every class in the dataset's natural order. A string is
    parsed with `parse_classes`.
    image_size: resize every image to image_size x image_size (bilinear;
    ImageNette defaults to 224; None elsewhere keeps the native size).
    max_train / max_test: keep that many samples, chosen uniformly at random with
    `seed` (independent streams for train and test) and kept in dataset order;
    None keeps all. The digits train/test split itself never depends on `seed`.
    cache_dir: where decoded image files are cached (`certssb.data.images`: uint8 safetensors keyed by
    the file list and image size); None: $CERTSSB_CACHE if set, else no cache. In-memory datasets
    (digits, MNIST, .npz) decode nothing and ignore it.

    Returns `TaskData` with x float32 [N, C, H, W] in [0, 1] and y int64 [N] in
    0..K-1. Raises `CertssbError` / `DataError` for bad arguments or data.
    """
    spec = get_dataset(dataset)
    image_size = _check_optional_positive(image_size, "image_size")
    max_train = _check_optional_positive(max_train, "max_train")
    max_test = _check_optional_positive(max_test, "max_test")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise CertssbError(f"seed must be a non-negative integer (got {seed!r})")
    seed = int(seed)

    if spec.no_files is not None:
        if data_dir is not None:
            resolve_data_dir(dataset, data_dir)  # raises: the dataset reads no files
        cat = spec.read(None, image_size)
    else:
        cat = spec.read(resolve_data_dir(dataset, data_dir), image_size)

    selected = _select_classes(classes, dataset, cat.class_ids, cat.class_names)
    train, test = cat.load(selected)
    missing = [c for c in selected if not np.any(train.labels == c)]
    if missing:
        raise DataError(f"{dataset} ({cat.source}) has no training samples of class(es) {missing}; "
                        "drop them from --classes")
    if test.labels.size == 0:
        raise DataError(f"{dataset} ({cat.source}) has no test samples of classes {selected}")

    to_task = np.full(max(cat.class_ids) + 1, -1, dtype=np.int64)
    to_task[selected] = np.arange(len(selected))
    out = []
    if cache_dir is None:
        cache_dir = os.environ.get("CERTSSB_CACHE") or None
    with use_image_cache(cache_dir):
        for split, k, stream in ((train, max_train, 1), (test, max_test, 2)):
            idx = _subsample(split.labels.shape[0], k, seed, stream)
            x = split.fetch(idx)
            y = torch.from_numpy(to_task[split.labels[idx]])
            out += [x, y]
    name_of = dict(zip(cat.class_ids, cat.class_names))
    return TaskData(name=dataset, x_train=out[0], y_train=out[1], x_test=out[2], y_test=out[3],
                    classes=selected, class_names=[name_of[c] for c in selected], source=cat.source)
