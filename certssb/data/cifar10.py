"""CIFAR-10: the official python batches (read without running code) or an image-folder copy.

The batches are pickles; `_NumpyOnlyUnpickler` can rebuild numpy arrays and
nothing else, so a tampered file cannot execute anything while it is read.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .images import IMAGE_EXTENSIONS, array_catalog, subdirs, tree_catalog
from .registry import Catalog, DatasetSpec, TrainingDefaults, register_dataset

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")

_CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_BATCH = "test_batch"


def has_cifar_batches(d: Path) -> bool:
    """Whether `d` holds CIFAR-10 python batches."""
    return (d / _CIFAR_TRAIN_BATCHES[0]).is_file() or (d / _CIFAR_TEST_BATCH).is_file()


def has_cifar_folder(d: Path) -> bool:
    """Whether `d` is a CIFAR-10 image-folder copy (train/<class>/, test/<class>/)."""
    return ((d / "train").is_dir() and (d / "test").is_dir()
            and any((d / "train" / c).is_dir() for c in CIFAR10_CLASSES))


def read_cifar10(d: Path, image_size: int | None) -> Catalog:
    """The python batches when `d` holds them, else the image-folder copy."""
    reader = _read_cifar_batches if has_cifar_batches(d) else _read_cifar_folder
    return reader(d, image_size)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else.

    The CIFAR-10 batches are pickles of dicts holding bytes, lists, ints and one
    uint8 ndarray. Builtin containers need no globals; an ndarray needs
    `_reconstruct` (or `_frombuffer` for protocol 5), `ndarray` and `dtype`;
    bytes in a Python 3 protocol-2 pickle need `_codecs.encode` (allowed only
    as str -> latin-1 bytes). Every other global (os.system, builtins.eval,
    ...) is refused, so a malicious file cannot run code while it is read.
    """

    def __init__(self, file: io.BufferedIOBase, path: Path):
        super().__init__(file, encoding="bytes")  # the official files were written by Python 2
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        obj = _PICKLE_ALLOWED.get((module, name))
        if obj is None:
            raise DataError(f"{self._path}: refusing to unpickle global {module}.{name}; a CIFAR-10 "
                            "batch holds only numpy arrays and lists, so this file is not a CIFAR-10 "
                            "batch (or was tampered with): delete it and download the dataset again")
        return obj


def _latin1_encode(text: Any, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """`_codecs.encode` as protocol-2 pickles of bytes use it, restricted to str -> latin-1 bytes."""
    if not isinstance(text, str) or encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r}): a CIFAR-10 "
                                     "batch only encodes text as latin-1 bytes")
    return text.encode("latin-1", errors)


def _numpy_pickle_globals() -> dict[tuple[str, str], Any]:
    """The numpy callables an ndarray pickle names, under both numpy 1 and numpy 2 module paths."""
    try:
        from numpy._core import multiarray as ma, numeric as nu  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray as ma, numeric as nu  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                           # Python 3 protocol-2 pickles spell bytes as encode(str, "latin1")
                                           ("_codecs", "encode"): _latin1_encode}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = ma._reconstruct
    if hasattr(nu, "_frombuffer"):
        for mod in ("numpy.core.numeric", "numpy._core.numeric"):
            allowed[(mod, "_frombuffer")] = nu._frombuffer
    return allowed


_PICKLE_ALLOWED = _numpy_pickle_globals()


def _str_keys(d: dict) -> dict[str, Any]:
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch -> (uint8 [N, 3, 32, 32], int64 [N]), read without running code."""
    if not path.is_file():
        raise DataError(f"{path} is missing: CIFAR-10 python batches need "
                        f"{', '.join(_CIFAR_TRAIN_BATCHES)} and {_CIFAR_TEST_BATCH}")
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as e:  # truncated or garbage pickles raise many types
        raise DataError(f"{path}: not a readable CIFAR-10 batch ({type(e).__name__}: {e}); "
                        "the file is truncated or corrupt: download the dataset again") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: holds a {type(obj).__name__}, not the dict of a CIFAR-10 batch")
    obj = _str_keys(obj)
    data, labels = obj.get("data"), obj.get("labels")
    if not isinstance(data, np.ndarray) or labels is None:
        raise DataError(f"{path}: lacks the 'data' array or the 'labels' list of a CIFAR-10 batch")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' is {data.dtype} {list(data.shape)}, expected uint8 "
                        "[N, 3072]; the file is corrupt: download the dataset again")
    try:
        lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(f"{path}: 'labels' is not a list of integers") from None
    if lab.shape[0] != data.shape[0]:
        raise DataError(f"{path}: {data.shape[0]} images but {lab.shape[0]} labels")
    if lab.size and (lab.min() < 0 or lab.max() > 9):
        raise DataError(f"{path}: labels outside 0..9; the file is corrupt")
    # Rows are the R, G, B planes of a 32x32 image, each row-major.
    return data.reshape(-1, 3, 32, 32), lab


def _read_cifar_batches(d: Path, image_size: int | None) -> Catalog:
    parts = [_read_cifar_batch(d / b) for b in _CIFAR_TRAIN_BATCHES]
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    xte, yte = _read_cifar_batch(d / _CIFAR_TEST_BATCH)
    return array_catalog(list(range(10)), list(CIFAR10_CLASSES), f"{d} (CIFAR-10 python batches)",
                         (xtr, ytr), (xte, yte), image_size)


def _first_image_suffix(split_dir: Path) -> str | None:
    """Lower-case suffix of the first image file found under split_dir/<class>/ (None if none)."""
    for c in CIFAR10_CLASSES:
        if (split_dir / c).is_dir():
            for p in (split_dir / c).iterdir():
                if p.suffix.lower() in IMAGE_EXTENSIONS:
                    return p.suffix.lower()
    return None


def _read_cifar_folder(d: Path, image_size: int | None) -> Catalog:
    """CIFAR-10 image-folder copy: train/<classname>/*, test/<classname>/*, standard class order."""
    for split in ("train", "test"):
        unknown = [n for n in subdirs(d / split) if n not in CIFAR10_CLASSES]
        if unknown:
            raise DataError(f"{d / split} has folders {unknown} that are not CIFAR-10 classes "
                            f"({', '.join(CIFAR10_CLASSES)}); use --dataset folder for other trees")
    if d.name == "cifar10-jpeg":
        note = "CIFAR-10 (JPEG q75 copy)"  # the shared lossy mirror (see shared/data/README.md)
    elif _first_image_suffix(d / "train") in (".jpg", ".jpeg"):
        note = "CIFAR-10 (JPEG copy, lossy; not the official batches)"
    else:
        note = "CIFAR-10 (image-folder copy)"
    return tree_catalog(list(range(10)), list(CIFAR10_CLASSES), f"{d} ({note})", d / "train", d / "test",
                        list(CIFAR10_CLASSES), image_size)


register_dataset(DatasetSpec(
    "cifar10", read_cifar10, detect=lambda d: has_cifar_batches(d) or has_cifar_folder(d),
    subfolders=("cifar-10-batches-py", "cifar10-jpeg", "cifar10", "cifar-10"),  # faithful formats first
    expected="CIFAR-10 python batches (data_batch_1..5, test_batch) or an image folder "
             "train/<class>/*, test/<class>/*",
    default_arch="cifar-preact-resnet", class_names=CIFAR10_CLASSES,
    training=TrainingDefaults(epochs=10, batch_size=64, lr=1e-3, models=100)))  # paper schedule (Adam)
