"""MNIST from its four IDX files (gzipped or plain)."""
from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError
from .images import array_catalog
from .registry import Catalog, DatasetSpec, TrainingDefaults, register_dataset

_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension


def has_mnist(d: Path) -> bool:
    """Whether `d` holds the MNIST training images (plain or .gz)."""
    base = _MNIST_FILES["train_images"]
    return (d / base).is_file() or (d / f"{base}.gz").is_file()


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse an IDX file (optionally gzipped): big-endian magic, then big-endian uint32 dims."""
    kind = "image" if magic == _IDX_IMAGES_MAGIC else "label"
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read ({e}); the file is truncated or corrupt: "
                        "download it again") from None
    if len(data) < 4:
        raise DataError(f"{path}: only {len(data)} bytes, not an IDX file (truncated); download it again")
    got = int.from_bytes(data[:4], "big")
    if got != magic:
        raise DataError(f"{path}: magic number {got} is not {magic} (IDX {kind} file); this is not "
                        f"an MNIST {kind} file or it is corrupt: download it again")
    ndim = data[3]
    head = 4 + 4 * ndim
    if len(data) < head:
        raise DataError(f"{path}: header truncated ({len(data)} bytes); download it again")
    dims = struct.unpack(">" + "I" * ndim, data[4:head])
    need = head + math.prod(dims)
    if len(data) != need:
        raise DataError(f"{path}: holds {len(data)} bytes but its header (dims {list(dims)}) needs "
                        f"{need}: the file is truncated or corrupt; download it again")
    return np.frombuffer(data, dtype=np.uint8, offset=head).reshape(dims)


def _mnist_file(d: Path, base: str) -> Path:
    for name in (base, f"{base}.gz"):  # prefer the unpacked file when both exist
        if (d / name).is_file():
            return d / name
    raise DataError(f"{d} lacks {base} (or {base}.gz); MNIST needs all four IDX files: "
                    f"{', '.join(_MNIST_FILES.values())}")


def read_mnist(d: Path, image_size: int | None) -> Catalog:
    """MNIST IDX files: images uint8 [N, H, W] -> [N, 1, H, W]/255, labels 0..9."""
    files = {k: _mnist_file(d, v) for k, v in _MNIST_FILES.items()}
    splits = {}
    for s in ("train", "test"):
        x = _read_idx(files[f"{s}_images"], _IDX_IMAGES_MAGIC)
        y = _read_idx(files[f"{s}_labels"], _IDX_LABELS_MAGIC)
        if x.ndim != 3 or y.ndim != 1:
            raise DataError(f"{files[f'{s}_images']}: expected 3-D images and 1-D labels, got "
                            f"{x.ndim}-D and {y.ndim}-D; download the files again")
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{files[f'{s}_images']} holds {x.shape[0]} images but "
                            f"{files[f'{s}_labels']} holds {y.shape[0]} labels; the files do not "
                            "belong together: download them again")
        if y.size and int(y.max()) > 9:
            raise DataError(f"{files[f'{s}_labels']}: label {int(y.max())} is not a digit 0..9; "
                            "the file is corrupt: download it again")
        splits[s] = (x[:, None], y.astype(np.int64))
    if splits["train"][0].shape[1:] != splits["test"][0].shape[1:]:
        raise DataError(f"{d}: train and test images differ in size; download the files again")
    ids = list(range(10))
    return array_catalog(ids, [str(i) for i in ids], f"{d} (MNIST IDX)",
                         splits["train"], splits["test"], image_size)


register_dataset(DatasetSpec(
    "mnist", read_mnist, detect=has_mnist, subfolders=("mnist", "MNIST/raw", "MNIST"),
    expected="the four MNIST IDX files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
             "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz])",
    default_arch="mnist-cnn", class_names=tuple(str(i) for i in range(10)),
    # Paper schedule (Adam). RAB's pixel-trigger positions: the centre of a '1' is ink, where
    # clipping would erase a one-pixel trigger (measured L2 0.03 instead of 1.0 at the centre).
    training=TrainingDefaults(epochs=20, batch_size=128, lr=1e-3, models=100,
                              trigger_pixels={"onepixel": (23, 23), "fourpixel": (19, 19)})))
