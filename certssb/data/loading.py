"""Dataset layer: find a dataset, read it, pick the task's classes, return [0, 1] float tensors.

Pipeline stage 1 (DESIGN.md 1.1). `load_task` reads one of the supported
formats (`DATASETS`), keeps the selected classes, relabels them to task labels
0..K-1 in the order given, optionally subsamples and resizes, and returns a
`TaskData` with float32 images in [0, 1] of shape [N, C, H, W] and int64
labels of shape [N]. Nothing here normalizes: sigma and radii downstream are
in [0, 1] pixel units, as in the paper.

Formats: scikit-learn's 8x8 digits (embedded, no files), MNIST IDX (.gz or
plain), CIFAR-10 python batches (read with a restricted unpickler that can only
rebuild numpy arrays) or an image-folder copy, an ImageNette `train/`/`val/`
tree, any `train/<class>/` + `test/<class>/` image folder, and an `.npz` file.
"""
from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import re
import struct
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..errors import CertssbError, DataError

DATASETS = ("digits", "mnist", "cifar10", "imagenette", "folder", "numpy")

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")

# Standard ImageNette v2 classes (wnid -> name); class ids follow the sorted wnid order.
IMAGENETTE_NAMES = {
    "n01440764": "tench",
    "n02102040": "English springer",
    "n02979186": "cassette player",
    "n03000684": "chain saw",
    "n03028079": "church",
    "n03394916": "French horn",
    "n03417042": "garbage truck",
    "n03425413": "gas pump",
    "n03445777": "golf ball",
    "n03888257": "parachute",
}

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff",
                              ".webp", ".ppm", ".pgm", ".pbm"})

IMAGENETTE_DEFAULT_SIZE = 224

# Known subfolders, tried in this order inside each candidate root (faithful formats first).
DATA_SUBFOLDERS: dict[str, tuple[str, ...]] = {
    "mnist": ("mnist", "MNIST/raw", "MNIST"),
    "cifar10": ("cifar-10-batches-py", "cifar10-jpeg", "cifar10", "cifar-10"),
    "imagenette": ("imagenette/imagenette2-224-thunderInfy", "imagenette2-224-thunderInfy",
                   "imagenette2-320", "imagenette2-160", "imagenette2", "imagenette"),
}

_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension

_CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_BATCH = "test_batch"

_WNID_RE = re.compile(r"^n\d{8}$")
_DECODE_WORKERS = max(1, min(8, os.cpu_count() or 1))
_DECODE_CHUNK = 256


# --------------------------------------------------------------------------- task data


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


def _check_dataset(dataset: str) -> str:
    if dataset not in DATASETS:
        raise CertssbError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    return dataset


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


# --------------------------------------------------------------------------- locating data


def _repo_root() -> Path:
    """Parent of the `certssb` package folder."""
    return Path(__file__).resolve().parent.parent


def _default_roots() -> list[Path]:
    """Fallback roots when neither --data-dir nor CERTSSB_DATA is given, in search order."""
    return [Path.cwd().parent / "shared" / "data", _repo_root().parent / "shared" / "data"]


def _has_mnist(d: Path) -> bool:
    base = _MNIST_FILES["train_images"]
    return (d / base).is_file() or (d / f"{base}.gz").is_file()


def _has_cifar_batches(d: Path) -> bool:
    return (d / _CIFAR_TRAIN_BATCHES[0]).is_file() or (d / _CIFAR_TEST_BATCH).is_file()


def _has_cifar_folder(d: Path) -> bool:
    return ((d / "train").is_dir() and (d / "test").is_dir()
            and any((d / "train" / c).is_dir() for c in CIFAR10_CLASSES))


def _has_imagenette(d: Path) -> bool:
    if not ((d / "train").is_dir() and (d / "val").is_dir()):
        return False
    return any(p.is_dir() and _WNID_RE.match(p.name) for p in (d / "train").iterdir())


_DETECTORS: dict[str, Callable[[Path], bool]] = {
    "mnist": _has_mnist,
    "cifar10": lambda d: _has_cifar_batches(d) or _has_cifar_folder(d),
    "imagenette": _has_imagenette,
}

_EXPECTED = {
    "mnist": "the four MNIST IDX files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
             "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz])",
    "cifar10": "CIFAR-10 python batches (data_batch_1..5, test_batch) or an image folder "
               "train/<class>/*, test/<class>/*",
    "imagenette": "an ImageNette tree train/<wnid>/*.JPEG, val/<wnid>/*.JPEG",
}


def resolve_data_dir(dataset: str, data_dir: str | os.PathLike | None) -> Path:
    """Find the directory (or, for "numpy", the .npz file) that holds `dataset`.

    Roots: the explicit `data_dir` if given (only it); else env `CERTSSB_DATA` if
    set (only it); else `../shared/data` from the current directory, then
    `<repo root>/../shared/data`. Inside a root the dataset's files may lie
    directly or in a known subfolder (`DATA_SUBFOLDERS`). "folder" and "numpy"
    need an explicit `data_dir`; "digits" reads no files. Nothing found ->
    `DataError` listing what was looked for where.
    """
    _check_dataset(dataset)
    if dataset == "digits":
        raise CertssbError("dataset 'digits' is embedded in scikit-learn and reads no files; "
                           "drop --data-dir, or use --dataset folder/numpy for your own files")
    if dataset in ("folder", "numpy"):
        if data_dir is None:
            what = ("an image tree <root>/train/<class>/* and <root>/test/<class>/*"
                    if dataset == "folder" else "an .npz file (or a folder holding exactly one)")
            raise CertssbError(f"dataset {dataset!r} needs --data-dir pointing at {what}")
        return _resolve_folder(Path(data_dir)) if dataset == "folder" else _resolve_npz(Path(data_dir))

    if data_dir is not None:
        roots, how = [Path(data_dir)], "--data-dir"
        if not roots[0].is_dir():
            raise DataError(f"--data-dir {roots[0]} does not exist or is not a directory; "
                            f"pass the folder that holds {_EXPECTED[dataset]}")
    elif os.environ.get("CERTSSB_DATA"):
        roots, how = [Path(os.environ["CERTSSB_DATA"])], "CERTSSB_DATA"
    else:
        roots, how = _default_roots(), "default locations"
    detect = _DETECTORS[dataset]
    looked: list[str] = []
    for root in roots:
        for cand in [root] + [root / s for s in DATA_SUBFOLDERS[dataset]]:
            looked.append(str(cand))
            if cand.is_dir() and detect(cand):
                return cand
    raise DataError(
        f"could not find {dataset}: looked for {_EXPECTED[dataset]} in ({how}) "
        f"{'; '.join(looked)}. Pass --data-dir DIR or set CERTSSB_DATA=DIR to the folder that "
        f"holds them (or its parent with one of the subfolders {', '.join(DATA_SUBFOLDERS[dataset])})")


def _resolve_folder(root: Path) -> Path:
    if not root.is_dir():
        raise DataError(f"--data-dir {root} does not exist or is not a directory; pass the root "
                        "of an image tree train/<class>/* and test/<class>/* (or val/)")
    if not (root / "train").is_dir() or not ((root / "test").is_dir() or (root / "val").is_dir()):
        raise DataError(f"{root} has no train/ and test/ (or val/) subfolders; an image folder "
                        "dataset is <root>/train/<class>/* and <root>/test/<class>/*")
    return root


def _resolve_npz(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix == ".npz" and p.is_file())
        if len(found) == 1:
            return found[0]
        raise DataError(f"{path} holds {len(found)} .npz files ({', '.join(p.name for p in found)}); "
                        "pass --data-dir pointing at the one .npz file to use")
    raise DataError(f"--data-dir {path} does not exist; pass an .npz file with x_train, y_train, "
                    "x_test, y_test (or a folder holding exactly one)")


# --------------------------------------------------------------------------- splits


@dataclass
class _Split:
    """One split restricted to the selected classes, materialized lazily.

    `labels` are ORIGINAL class ids (int64 [N]); `fetch(idx)` returns the images
    at those positions as float32 [n, C, H, W] in [0, 1] (decoding files only then).
    """

    labels: np.ndarray
    fetch: Callable[[np.ndarray], torch.Tensor]


@dataclass
class _Catalog:
    """What a reader knows before decoding: class ids/names, source, and a split loader."""

    class_ids: list[int]
    class_names: list[str]
    source: str
    load: Callable[[list[int]], tuple[_Split, _Split]]


def _to_float_tensor(x: np.ndarray) -> torch.Tensor:
    """uint8 -> /255, float -> as is; returns float32 [n, C, H, W] (input already NCHW)."""
    if x.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32).div_(255.0)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _resize_tensor(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Bilinear (antialiased, like PIL's) resize of [n, C, H, W] to size x size."""
    if size is None or tuple(x.shape[-2:]) == (size, size) or x.shape[0] == 0:
        return x
    out = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                          align_corners=False, antialias=True)
    return out.clamp_(0.0, 1.0)  # rounding may step a hair outside [0, 1]


def _array_split(x: np.ndarray, labels: np.ndarray, selected: list[int],
                 image_size: int | None) -> _Split:
    """A split over an in-memory NCHW array, keeping only samples of `selected` classes."""
    keep = np.flatnonzero(np.isin(labels, selected))
    lab = labels[keep].astype(np.int64)

    def fetch(idx: np.ndarray) -> torch.Tensor:
        return _resize_tensor(_to_float_tensor(x[keep[idx]]), image_size)

    return _Split(lab, fetch)


def _decode_image(path: Path, size: int | None) -> np.ndarray:
    """Decode one image file to uint8 RGB [H, W, 3], resized (PIL bilinear) when `size` is set."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")  # grayscale, palette, CMYK -> RGB; also forces the full decode
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot decode image {path} ({e}); the file is truncated or not an "
                        "image: replace or delete it") from None


def _decode_files(paths: Sequence[Path], size: int | None) -> np.ndarray:
    """Decode `paths` into uint8 [n, H, W, 3] with a thread pool (PIL releases the GIL)."""
    n = len(paths)
    if n == 0:
        raise DataError("no images to decode")
    first = _decode_image(paths[0], size)
    out = np.empty((n,) + first.shape, dtype=np.uint8)
    out[0] = first

    def work(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            a = _decode_image(paths[i], size)
            if a.shape != first.shape:
                raise DataError(
                    f"images differ in size: {paths[0]} is {first.shape[1]}x{first.shape[0]} but "
                    f"{paths[i]} is {a.shape[1]}x{a.shape[0]}; pass --image-size N to resize "
                    "every image to N x N")
            out[i] = a

    bounds = [(lo, min(lo + _DECODE_CHUNK, n)) for lo in range(1, n, _DECODE_CHUNK)]
    if len(bounds) <= 1 or _DECODE_WORKERS == 1:
        for lo, hi in bounds:
            work(lo, hi)
    else:
        with ThreadPoolExecutor(_DECODE_WORKERS) as ex:
            for f in [ex.submit(work, lo, hi) for lo, hi in bounds]:
                f.result()  # re-raises the first decode error
    return out


def _file_split(paths: list[Path], labels: list[int], size: int | None) -> _Split:
    def fetch(idx: np.ndarray) -> torch.Tensor:
        arr = _decode_files([paths[i] for i in idx], size)
        return torch.from_numpy(arr).permute(0, 3, 1, 2).to(torch.float32).div_(255.0).contiguous()

    return _Split(np.asarray(labels, dtype=np.int64), fetch)


def _list_images(d: Path) -> list[Path]:
    """Image files in `d` (by extension, case-insensitive), sorted by name; hidden files skipped."""
    return sorted(p for p in d.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def _subdirs(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def _tree_split(split_dir: Path, dir_names: list[str], ids: list[int], selected: list[int],
                size: int | None) -> _Split:
    """Files of the selected classes in `split_dir/<dir_name>/`, in dataset class order then name."""
    paths: list[Path] = []
    labels: list[int] = []
    sel = set(selected)
    for cid, dname in zip(ids, dir_names):
        if cid not in sel:
            continue
        cdir = split_dir / dname
        if not cdir.is_dir():
            raise DataError(f"{cdir} is missing: every class needs a folder in {split_dir}")
        files = _list_images(cdir)
        if not files:
            raise DataError(f"{cdir} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                            "add the class's images or drop the class from --classes")
        paths += files
        labels += [cid] * len(files)
    return _file_split(paths, labels, size)


# --------------------------------------------------------------------------- readers


def _read_digits(image_size: int | None) -> _Catalog:
    """sklearn's load_digits: 1797 images 8x8, pixel/16; fixed stratified 75/25 split (seed 0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]  # [1797, 1, 8, 8], values 0..16 -> [0, 1]
    y = d.target.astype(np.int64)
    # The split never depends on the task seed, so the test set is always the same.
    tr, te = train_test_split(np.arange(len(y)), test_size=0.25, stratify=y, random_state=0)
    tr, te = np.sort(tr), np.sort(te)
    ids = list(range(10))

    def load(selected: list[int]) -> tuple[_Split, _Split]:
        return (_array_split(x[tr], y[tr], selected, image_size),
                _array_split(x[te], y[te], selected, image_size))

    return _Catalog(ids, [str(i) for i in ids], "sklearn load_digits", load)


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


def _read_mnist(d: Path, image_size: int | None) -> _Catalog:
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

    def load(selected: list[int]) -> tuple[_Split, _Split]:
        return (_array_split(*splits["train"], selected, image_size),
                _array_split(*splits["test"], selected, image_size))

    return _Catalog(ids, [str(i) for i in ids], f"{d} (MNIST IDX)", load)


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


def _read_cifar_batches(d: Path, image_size: int | None) -> _Catalog:
    parts = [_read_cifar_batch(d / b) for b in _CIFAR_TRAIN_BATCHES]
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    xte, yte = _read_cifar_batch(d / _CIFAR_TEST_BATCH)

    def load(selected: list[int]) -> tuple[_Split, _Split]:
        return (_array_split(xtr, ytr, selected, image_size),
                _array_split(xte, yte, selected, image_size))

    return _Catalog(list(range(10)), list(CIFAR10_CLASSES), f"{d} (CIFAR-10 python batches)", load)


def _first_image_suffix(split_dir: Path) -> str | None:
    """Lower-case suffix of the first image file found under split_dir/<class>/ (None if none)."""
    for c in CIFAR10_CLASSES:
        if (split_dir / c).is_dir():
            for p in (split_dir / c).iterdir():
                if p.suffix.lower() in IMAGE_EXTENSIONS:
                    return p.suffix.lower()
    return None


def _read_cifar_folder(d: Path, image_size: int | None) -> _Catalog:
    """CIFAR-10 image-folder copy: train/<classname>/*, test/<classname>/*, standard class order."""
    for split in ("train", "test"):
        unknown = [n for n in _subdirs(d / split) if n not in CIFAR10_CLASSES]
        if unknown:
            raise DataError(f"{d / split} has folders {unknown} that are not CIFAR-10 classes "
                            f"({', '.join(CIFAR10_CLASSES)}); use --dataset folder for other trees")
    if d.name == "cifar10-jpeg":
        note = "CIFAR-10 (JPEG q75 copy)"  # the shared lossy mirror (see shared/data/README.md)
    elif _first_image_suffix(d / "train") in (".jpg", ".jpeg"):
        note = "CIFAR-10 (JPEG copy, lossy; not the official batches)"
    else:
        note = "CIFAR-10 (image-folder copy)"
    ids, dirs = list(range(10)), list(CIFAR10_CLASSES)

    def load(selected: list[int]) -> tuple[_Split, _Split]:
        return (_tree_split(d / "train", dirs, ids, selected, image_size),
                _tree_split(d / "test", dirs, ids, selected, image_size))

    return _Catalog(ids, list(CIFAR10_CLASSES), f"{d} ({note})", load)


def _read_imagenette(d: Path, image_size: int | None) -> _Catalog:
    """ImageNette tree train/<wnid>/*, val/<wnid>/*; classes in sorted wnid order; RGB; resized."""
    size = IMAGENETTE_DEFAULT_SIZE if image_size is None else image_size
    wnids = [n for n in _subdirs(d / "train") if _WNID_RE.match(n)]
    val = [n for n in _subdirs(d / "val") if _WNID_RE.match(n)]
    if wnids != val:
        raise DataError(f"{d}: train/ and val/ hold different class folders "
                        f"({sorted(set(wnids) ^ set(val))} in only one); both need the same wnids")
    ids = list(range(len(wnids)))
    names = [IMAGENETTE_NAMES.get(w, w) for w in wnids]
    if d.name == "imagenette2-224-thunderInfy":
        note = "ImageNette (224px copy, 600 train images per class)"
    else:
        note = f"ImageNette ({d.name})" if d.name.startswith("imagenette") else "ImageNette"

    def load(selected: list[int]) -> tuple[_Split, _Split]:
        return (_tree_split(d / "train", wnids, ids, selected, size),
                _tree_split(d / "val", wnids, ids, selected, size))

    return _Catalog(ids, names, f"{d} ({note})", load)


def _read_folder(d: Path, image_size: int | None) -> _Catalog:
    """Generic image tree <root>/train/<class>/*, <root>/test|val/<class>/*; sorted class names."""
    test_dir = d / "test" if (d / "test").is_dir() else d / "val"
    names = _subdirs(d / "train")
    test_names = _subdirs(test_dir)
    if names != test_names:
        raise DataError(f"{d}: train/ and {test_dir.name}/ hold different class folders "
                        f"({sorted(set(names) ^ set(test_names))} in only one); give both the same classes")
    if not names:
        raise DataError(f"{d / 'train'} has no class folders; lay out images as train/<class>/*")
    ids = list(range(len(names)))

    def load(selected: list[int]) -> tuple[_Split, _Split]:
        return (_tree_split(d / "train", names, ids, selected, image_size),
                _tree_split(test_dir, names, ids, selected, image_size))

    return _Catalog(ids, names, f"{d} (image folder)", load)


def _npz_images(x: np.ndarray, key: str, path: Path) -> np.ndarray:
    """Validate an image array and return it as NCHW (uint8 or float in [0, 1])."""
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{path}: {key} has dtype {x.dtype}; store images as uint8 (0..255) or "
                        "float in [0, 1]")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        # [N, C, H, W] wins when both readings fit (torch's layout).
        if x.shape[1] not in (1, 3):
            if x.shape[3] not in (1, 3):
                raise DataError(f"{path}: {key} has shape {list(x.shape)}; expected [N, H, W], "
                                "[N, H, W, C] or [N, C, H, W] with C = 1 or 3")
            x = x.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"{path}: {key} has shape {list(x.shape)}; expected [N, H, W], "
                        "[N, H, W, C] or [N, C, H, W] with C = 1 or 3")
    if x.shape[0] == 0:
        raise DataError(f"{path}: {key} holds no samples")
    if x.dtype != np.uint8:
        lo, hi = float(np.min(x)), float(np.max(x))
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
            raise DataError(f"{path}: {key} values span [{lo}, {hi}]; float images must be finite "
                            "and in [0, 1] (divide uint8 pixels by 255, or store them as uint8)")
    return x


def _npz_labels(y: np.ndarray, key: str, n: int, path: Path) -> np.ndarray:
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
        raise DataError(f"{path}: {key} is {y.dtype} {list(y.shape)}; labels must be a 1-D integer array")
    if y.shape[0] != n:
        raise DataError(f"{path}: {key} has {y.shape[0]} labels for {n} images")
    if y.size and int(y.min()) < 0:
        raise DataError(f"{path}: {key} holds negative labels; use class ids 0..K-1")
    return y.astype(np.int64)


def _read_numpy(path: Path, image_size: int | None) -> _Catalog:
    """An .npz with x_train, y_train, x_test, y_test (optional class_names); no pickle allowed."""
    keys = ("x_train", "y_train", "x_test", "y_test")
    try:
        with np.load(path, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise DataError(f"{path} is a single .npy array; save an .npz with "
                                "np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)")
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise DataError(f"{path} lacks {missing} (it holds {z.files}); save it with "
                                "np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)")
            arrs = {k: z[k] for k in keys}
            names_arr = z["class_names"] if "class_names" in z.files else None
    except DataError:
        raise
    except ValueError as e:  # object arrays need pickle, which is refused
        raise DataError(f"{path}: {e}; store plain numeric arrays (no object dtype)") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{path}: not a readable .npz ({e}); the file is truncated or corrupt") from None
    xtr = _npz_images(arrs["x_train"], "x_train", path)
    xte = _npz_images(arrs["x_test"], "x_test", path)
    if xtr.shape[1:] != xte.shape[1:]:
        raise DataError(f"{path}: x_train images are {list(xtr.shape[1:])} but x_test images are "
                        f"{list(xte.shape[1:])} (as [C, H, W]); both must have the same shape")
    ytr = _npz_labels(arrs["y_train"], "y_train", xtr.shape[0], path)
    yte = _npz_labels(arrs["y_test"], "y_test", xte.shape[0], path)
    if names_arr is not None:
        if names_arr.ndim != 1 or names_arr.dtype.kind not in "US":
            raise DataError(f"{path}: class_names must be a 1-D string array")
        names = [str(s.decode() if isinstance(s, bytes) else s) for s in names_arr.tolist()]
    else:
        names = [str(i) for i in range(int(ytr.max()) + 1)]
    k = len(names)
    origin = "class_names" if names_arr is not None else "the largest y_train label"
    for key, y in (("y_train", ytr), ("y_test", yte)):
        if y.size and int(y.max()) >= k:
            raise DataError(f"{path}: {key} holds label {int(y.max())} but there are {k} classes "
                            f"(0..{k - 1}, from {origin}); every label must be a class id 0..K-1 "
                            "that training covers")
    ids = list(range(k))

    def load(selected: list[int]) -> tuple[_Split, _Split]:
        return (_array_split(xtr, ytr, selected, image_size),
                _array_split(xte, yte, selected, image_size))

    return _Catalog(ids, names, f"{path} (NumPy arrays)", load)


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
              seed: int = 0) -> TaskData:
    """Load `dataset` as a classification task over `classes`.

    classes: original class ids in task-label order (`[1, 0]`: task label 0 is
    class 1); None = every class in the dataset's natural order. A string is
    parsed with `parse_classes`.
    image_size: resize every image to image_size x image_size (bilinear;
    ImageNette defaults to 224; None elsewhere keeps the native size).
    max_train / max_test: keep that many samples, chosen uniformly at random with
    `seed` (independent streams for train and test) and kept in dataset order;
    None keeps all. The digits train/test split itself never depends on `seed`.

    Returns `TaskData` with x float32 [N, C, H, W] in [0, 1] and y int64 [N] in
    0..K-1. Raises `CertssbError` / `DataError` for bad arguments or data.
    """
    _check_dataset(dataset)
    image_size = _check_optional_positive(image_size, "image_size")
    max_train = _check_optional_positive(max_train, "max_train")
    max_test = _check_optional_positive(max_test, "max_test")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise CertssbError(f"seed must be a non-negative integer (got {seed!r})")
    seed = int(seed)

    if dataset == "digits":
        if data_dir is not None:
            resolve_data_dir(dataset, data_dir)  # raises: digits reads no files
        cat = _read_digits(image_size)
    else:
        where = resolve_data_dir(dataset, data_dir)
        if dataset == "mnist":
            cat = _read_mnist(where, image_size)
        elif dataset == "cifar10":
            reader = _read_cifar_batches if _has_cifar_batches(where) else _read_cifar_folder
            cat = reader(where, image_size)
        elif dataset == "imagenette":
            cat = _read_imagenette(where, image_size)
        elif dataset == "folder":
            cat = _read_folder(where, image_size)
        else:
            cat = _read_numpy(where, image_size)

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
    for split, k, stream in ((train, max_train, 1), (test, max_test, 2)):
        idx = _subsample(split.labels.shape[0], k, seed, stream)
        x = split.fetch(idx)
        y = torch.from_numpy(to_task[split.labels[idx]])
        out += [x, y]
    name_of = dict(zip(cat.class_ids, cat.class_names))
    return TaskData(name=dataset, x_train=out[0], y_train=out[1], x_test=out[2], y_test=out[3],
                    classes=selected, class_names=[name_of[c] for c in selected], source=cat.source)
