"""Pixels into tensors: decoding image files (in parallel), listing image folders, array splits, resizing.

Shared by the dataset readers. Every split fetches float32 [n, C, H, W] images in [0, 1]; uint8
pixels are divided by 255. Image files are decoded to uint8 (a quarter of float32's memory), in
parallel with a progress bar, and converted to float32 once, chunk by chunk, into the final tensor.

The decode cache. When a cache folder is set (`use_image_cache`, which `load_task` sets from its
``cache_dir`` argument or ``$CERTSSB_CACHE``; `certssb run` / `train` use ``$CERTSSB_CACHE``, else
``<run dir>/cache``, and `certssb grid` ``<grid root>/cache`` unless ``$CERTSSB_CACHE`` is set), the
decoded uint8 pixels of a split are kept in ``<cache>/images-<key>.safetensors`` (with the embedded
content checksum of `certssb.core.files.save_tensors`), keyed by the sha256 of the image size and the
file list (each file's resolved path, size and modification time), so a rerun or another cell reading
the same files at the same size loads them instead of decoding again. A damaged or altered cache
file is never used: it is decoded again and rewritten. The float32 images are byte-identical with and
without the cache.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from ..errors import DataError
from .registry import Catalog, Split

__all__ = ["IMAGE_EXTENSIONS", "to_float_tensor", "resize_tensor", "array_split", "decode_image",
           "decode_files", "file_split", "list_images", "subdirs", "tree_split",
           "array_catalog", "tree_catalog", "use_image_cache", "image_cache_dir", "cache_key", "uint8_to_float"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff",
                              ".webp", ".ppm", ".pgm", ".pbm"})

_DECODE_WORKERS = max(1, min(8, os.cpu_count() or 1))
_DECODE_CHUNK = 256
# images per step of the uint8 -> float32 conversion (bounds its temporaries)
_CONVERT_CHUNK = 64
CACHE_FORMAT = 1

_cache_dir: Optional[Path] = None


@contextmanager
def use_image_cache(folder: str | os.PathLike | None) -> Iterator[None]:
    """Within the block, decoded image files are cached under `folder` (None: no cache)."""
    global _cache_dir
    before = _cache_dir
    _cache_dir = None if folder is None else Path(folder)
    try:
        yield
    finally:
        _cache_dir = before


def image_cache_dir() -> Optional[Path]:
    """The cache folder in effect (`use_image_cache`), or None."""
    return _cache_dir


def cache_key(paths: Sequence[Path], size: int | None) -> str:
    """sha256 (hex, 24 digits) of the image size and the file list: each file's resolved path, size
    and modification time (an edited or replaced file changes the key)."""
    h = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "size": size}).encode())
    for p in paths:
        st = os.stat(p)
        h.update(json.dumps([str(Path(p).resolve()), st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()[:24]


def uint8_to_float(arr: np.ndarray) -> torch.Tensor:
    """uint8 [n, H, W, C] -> float32 [n, C, H, W] in [0, 1] (x / 255), converted chunk by chunk into
    one contiguous tensor (no full-size float32 temporary)."""
    n, h, w, c = arr.shape
    out = torch.empty((n, c, h, w), dtype=torch.float32)
    src = torch.from_numpy(arr)
    for a in range(0, n, _CONVERT_CHUNK):
        e = min(n, a + _CONVERT_CHUNK)
        out[a:e] = src[a:e].permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    return out


def _cached_decode(paths: Sequence[Path], size: int | None) -> np.ndarray:
    """`decode_files`, through the cache folder when one is set."""
    folder = _cache_dir
    if folder is None:
        return decode_files(paths, size)
    from ..core.files import load_tensors, save_tensors
    from ..errors import CheckpointError

    path = folder / f"images-{cache_key(paths, size)}.safetensors"
    if path.is_file():
        try:
            arr = load_tensors(path, require_checksum=True)["x"]
            if arr.dtype == torch.uint8 and arr.dim() == 4 and arr.shape[0] == len(paths):
                return arr.numpy()
        except (CheckpointError, KeyError):
            pass  # damaged or altered: decoded again and rewritten
    arr = decode_files(paths, size)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(path, {"x": torch.from_numpy(arr)},
                 metadata={"certssb": "image-cache", "format": str(CACHE_FORMAT), "n": str(len(paths)),
                           "size": str(size), "first": str(paths[0])})
    return arr


def to_float_tensor(x: np.ndarray) -> torch.Tensor:
    """uint8 -> /255, float -> as is; returns float32 [n, C, H, W] (input already NCHW)."""
    if x.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32).div_(255.0)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def resize_tensor(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Bilinear (antialiased, like PIL's) resize of [n, C, H, W] to size x size."""
    if size is None or tuple(x.shape[-2:]) == (size, size) or x.shape[0] == 0:
        return x
    out = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                          align_corners=False, antialias=True)
    return out.clamp_(0.0, 1.0)  # rounding may step a hair outside [0, 1]


def array_split(x: np.ndarray, labels: np.ndarray, selected: list[int],
                image_size: int | None) -> Split:
    """A split over an in-memory NCHW array, keeping only samples of `selected` classes."""
    keep = np.flatnonzero(np.isin(labels, selected))
    lab = labels[keep].astype(np.int64)

    def fetch(idx: np.ndarray) -> torch.Tensor:
        return resize_tensor(to_float_tensor(x[keep[idx]]), image_size)

    return Split(lab, fetch)


def decode_image(path: Path, size: int | None) -> np.ndarray:
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


def decode_files(paths: Sequence[Path], size: int | None, progress: Optional[bool] = None) -> np.ndarray:
    """Decode `paths` into uint8 [n, H, W, 3] with a thread pool (PIL releases the GIL).

    progress: a progress bar on stderr (None: only when stderr is a terminal)."""
    from tqdm.auto import tqdm

    n = len(paths)
    if n == 0:
        raise DataError("no images to decode")
    first = decode_image(paths[0], size)
    out = np.empty((n,) + first.shape, dtype=np.uint8)
    out[0] = first

    bar = tqdm(total=n, initial=1, desc="decode images", unit="image", leave=False,
               disable=(False if progress else True) if progress is not None else None)

    def work(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            a = decode_image(paths[i], size)
            if a.shape != first.shape:
                raise DataError(
                    f"images differ in size: {paths[0]} is {first.shape[1]}x{first.shape[0]} but "
                    f"{paths[i]} is {a.shape[1]}x{a.shape[0]}; pass --image-size N to resize "
                    "every image to N x N")
            out[i] = a
            bar.update(1)

    step = max(1, min(_DECODE_CHUNK, -(-(n - 1) // (4 * _DECODE_WORKERS))))  # every worker busy
    bounds = [(lo, min(lo + step, n)) for lo in range(1, n, step)]
    try:
        if len(bounds) <= 1 or _DECODE_WORKERS == 1:
            for lo, hi in bounds:
                work(lo, hi)
        else:
            with ThreadPoolExecutor(_DECODE_WORKERS) as ex:
                for f in [ex.submit(work, lo, hi) for lo, hi in bounds]:
                    f.result()  # re-raises the first decode error
    finally:
        bar.close()
    return out


def file_split(paths: list[Path], labels: list[int], size: int | None) -> Split:
    """A split over image files (label = original class id), decoded only when fetched."""
    def fetch(idx: np.ndarray) -> torch.Tensor:
        arr = _cached_decode([paths[i] for i in idx], size)
        return uint8_to_float(arr)

    return Split(np.asarray(labels, dtype=np.int64), fetch)


def list_images(d: Path) -> list[Path]:
    """Image files in `d` (by extension, case-insensitive), sorted by name; hidden files skipped."""
    return sorted(p for p in d.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def subdirs(d: Path) -> list[str]:
    """Names of the non-hidden subfolders of `d`, sorted."""
    return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def tree_split(split_dir: Path, dir_names: list[str], ids: list[int], selected: list[int],
               size: int | None) -> Split:
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
        files = list_images(cdir)
        if not files:
            raise DataError(f"{cdir} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                            "add the class's images or drop the class from --classes")
        paths += files
        labels += [cid] * len(files)
    return file_split(paths, labels, size)


def array_catalog(ids: list[int], names: list[str], source: str,
                  train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                  image_size: int | None) -> Catalog:
    """A catalog over in-memory (NCHW images, original labels) train and test arrays."""
    def load(selected: list[int]) -> tuple[Split, Split]:
        return (array_split(*train, selected, image_size),
                array_split(*test, selected, image_size))

    return Catalog(ids, names, source, load)


def tree_catalog(ids: list[int], names: list[str], source: str, train_dir: Path, test_dir: Path,
                 dir_names: list[str], size: int | None) -> Catalog:
    """A catalog over image trees `train_dir/<dir_name>/*` and `test_dir/<dir_name>/*`."""
    def load(selected: list[int]) -> tuple[Split, Split]:
        return (tree_split(train_dir, dir_names, ids, selected, size),
                tree_split(test_dir, dir_names, ids, selected, size))

    return Catalog(ids, names, source, load)
