"""An .npz file with x_train, y_train, x_test, y_test (optional class_names), read without pickle."""
from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError
from .images import array_catalog
from .registry import Catalog, DatasetSpec, TrainingDefaults, register_dataset


def check_npz(path: Path) -> Path:
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


def read_numpy(path: Path, image_size: int | None) -> Catalog:
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
    return array_catalog(list(range(k)), names, f"{path} (NumPy arrays)", (xtr, ytr), (xte, yte), image_size)


register_dataset(DatasetSpec(
    "numpy", read_numpy, check_path=check_npz,
    expected="an .npz file (or a folder holding exactly one)",
    training=TrainingDefaults(epochs=10, batch_size=64, lr=1e-3, models=100)))
