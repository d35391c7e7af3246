"""Pixels into tensors: decoding image files (in parallel), listing image folders, array splits, resizing.

Shared by the dataset readers. Every function returns or fetches float32
[n, C, H, W] images in [0, 1]; uint8 pixels are divided by 255.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import DataError
from .registry import Catalog, Split

__all__ = ["IMAGE_EXTENSIONS", "to_float_tensor", "resize_tensor", "array_split", "decode_image",
           "decode_files", "file_split", "list_images", "subdirs", "tree_split",
           "array_catalog", "tree_catalog"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff",
                              ".webp", ".ppm", ".pgm", ".pbm"})

_DECODE_WORKERS = max(1, min(8, os.cpu_count() or 1))
_DECODE_CHUNK = 256


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


def decode_files(paths: Sequence[Path], size: int | None) -> np.ndarray:
    """Decode `paths` into uint8 [n, H, W, 3] with a thread pool (PIL releases the GIL)."""
    n = len(paths)
    if n == 0:
        raise DataError("no images to decode")
    first = decode_image(paths[0], size)
    out = np.empty((n,) + first.shape, dtype=np.uint8)
    out[0] = first

    def work(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            a = decode_image(paths[i], size)
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


def file_split(paths: list[Path], labels: list[int], size: int | None) -> Split:
    """A split over image files (label = original class id), decoded only when fetched."""
    def fetch(idx: np.ndarray) -> torch.Tensor:
        arr = decode_files([paths[i] for i in idx], size)
        return torch.from_numpy(arr).permute(0, 3, 1, 2).to(torch.float32).div_(255.0).contiguous()

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
