"""Inputs of a streaming certification job: validated batches from tensors or files, regrouped into chunks.

`check_inputs` turns a batch (tensor or array, uint8 pixels or floats in [0, 1])
into float32 [b, C, H, W] or says what is wrong; `InputFile` reads .npy / .npz /
.safetensors files or an image folder in batches without loading it whole (memory
O(batch)); `rechunk` regroups any iterable of batches into chunks of a fixed size.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from ..data.images import list_images
from ..errors import CertssbError, DataError

# Input keys looked for in .npz / .safetensors files, in this order (else the only array).
INPUT_KEYS = ("x", "images", "inputs", "x_test")
LABEL_KEYS = ("y", "labels", "y_test")


def check_inputs(x: Any, image_shape: Sequence[int], *, where: str = "inputs") -> torch.Tensor:
    """x as float32 [b, C, H, W] in [0, 1], or DataError saying what is wrong.

    Accepts a tensor or array of shape [b, C, H, W] (uint8 pixels are divided by 255;
    floats must already lie in [0, 1]) and checks shape, finiteness and range.
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{where}: expected a tensor of shape [b, {', '.join(map(str, image_shape))}], "
                        f"got {type(x).__name__}")
    if tuple(x.shape[1:]) != tuple(image_shape) or x.dim() != 4:
        raise DataError(f"{where}: shape {list(x.shape)} does not match the run's images "
                        f"[b, {', '.join(map(str, image_shape))}]; resize the inputs to the run's image size "
                        "(or certify them with a run trained on their size)")
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    if not x.is_floating_point():
        raise DataError(f"{where}: dtype {x.dtype} is neither uint8 pixels nor floats in [0, 1]")
    x = x.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if x.numel():
        bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
        if bool(bad.any()):
            raise DataError(f"{where}: input {int(bad.nonzero()[0, 0])} of this batch holds NaN or Inf; "
                            "drop or repair it")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise DataError(f"{where}: values span [{lo:.4g}, {hi:.4g}] but inputs must lie in [0, 1] "
                            "(divide 0..255 pixels by 255; do not normalize)")
    return x


def _check_labels(y: Any, n: int, num_classes: Optional[int], where: str) -> torch.Tensor:
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
    if y.dim() != 1 or y.shape[0] != n or y.is_floating_point() or y.dtype == torch.bool:
        raise DataError(f"{where}: labels must be {n} integers (a 1-D integer array), got "
                        f"{y.dtype} {list(y.shape)}")
    y = y.to(torch.int64)
    if n and (int(y.min()) < 0 or (num_classes is not None and int(y.max()) >= num_classes)):
        top = "K-1" if num_classes is None else num_classes - 1
        raise DataError(f"{where}: labels must be task labels 0..{top}, found {int(y.min())}..{int(y.max())}")
    return y


class InputFile:
    """The inputs of a stream, read from a file or a folder a batch at a time (never all at once).

    path: a `.npy` array; an `.npz` or `.safetensors` file (the array named x, images, inputs
    or x_test, else its only array; labels from y, labels or y_test when present); or a folder
    of image files (.png, .jpg, ...; sorted by name). Arrays may be uint8 pixels (divided by 255)
    or floats in [0, 1], laid out [N, C, H, W], [N, H, W] (one channel) or [N, H, W, C].
    image_shape: the run's (C, H, W): every input must have it (no resizing). labels: a file
    of task labels 0..K-1 (`.npy`, `.npz`, or text with one integer per line) overriding the
    inputs file's. Iterating yields (x float32 [b, C, H, W], y int64 [b] or None) batches of
    `batch` inputs, each validated (`check_inputs`). Example::

        for x, y in InputFile("new.npz", (1, 28, 28), num_classes=2): ...
    """

    def __init__(self, path: str | os.PathLike, image_shape: Sequence[int], *,
                 labels: str | os.PathLike | None = None, num_classes: Optional[int] = None,
                 batch: int = 1024, key: Optional[str] = None) -> None:
        self.path = Path(path)
        self.image_shape = tuple(int(v) for v in image_shape)
        self.batch = int(batch)
        if self.batch < 1:
            raise CertssbError(f"batch must be >= 1, got {batch}")
        self.num_classes = num_classes
        if not self.path.exists():
            raise DataError(f"--inputs {self.path} does not exist; pass an .npy, .npz or .safetensors file "
                            "or a folder of images")
        self._labels: Optional[np.ndarray] = None
        if self.path.is_dir():
            self.kind = "folder"
            self._files = list_images(self.path)
            if not self._files:
                raise DataError(f"{self.path} holds no image files; pass a folder of .png/.jpg images or an "
                                "array file")
            self.n = len(self._files)
        else:
            suffix = self.path.suffix.lower()
            opener = {".npy": self._open_npy, ".npz": self._open_npz, ".safetensors": self._open_safetensors}
            if suffix not in opener:
                raise DataError(f"--inputs {self.path}: unknown file type {suffix!r}; use .npy, .npz, "
                                ".safetensors or a folder of images")
            self.kind = suffix[1:]
            opener[suffix](key)
        if labels is not None:
            self._labels = _read_label_file(Path(labels))
        if self._labels is not None:
            self._labels = _check_labels(self._labels, self.n, num_classes, f"labels of {self.path}").numpy()

    def __len__(self) -> int:
        return self.n

    @property
    def has_labels(self) -> bool:
        return self._labels is not None

    # ---------------------------------------------------------------- openers
    def _layout(self, shape: Sequence[int], dtype: np.dtype | str, name: str) -> None:
        """Decide how [N, ...] arrays map to [N, C, H, W]; DataError when they do not fit the run."""
        c, h, w = self.image_shape
        shape = tuple(int(v) for v in shape)
        if str(dtype) not in ("uint8", "float16", "float32", "float64", "bfloat16"):
            raise DataError(f"{self.path}: {name} has dtype {dtype}; store images as uint8 (0..255) or "
                            "floats in [0, 1]")
        if len(shape) == 4 and shape[1:] == (c, h, w):
            self._perm = None
        elif len(shape) == 3 and c == 1 and shape[1:] == (h, w):
            self._perm = "nhw"
        elif len(shape) == 4 and shape[1:] == (h, w, c):
            self._perm = "nhwc"
        else:
            raise DataError(f"{self.path}: {name} has shape {list(shape)} but the run's images are "
                            f"[C, H, W] = [{c}, {h}, {w}]; pass arrays [N, {c}, {h}, {w}]"
                            f"{f', [N, {h}, {w}]' if c == 1 else ''} or [N, {h}, {w}, {c}] (no resizing is done)")
        self.n = shape[0]

    def _open_npy(self, key: Optional[str]) -> None:
        try:
            arr = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"{self.path}: not a readable .npy file ({e}); the file is truncated or corrupt") from None
        self._layout(arr.shape, arr.dtype, "the array")
        self._array = arr

    def _open_npz(self, key: Optional[str]) -> None:
        try:
            zf = zipfile.ZipFile(self.path)
            names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f"{self.path}: not a readable .npz file ({e}); the file is truncated or corrupt") from None
        self._zip_key = _pick_key(names, key, INPUT_KEYS, self.path)
        with zf.open(self._zip_key + ".npy") as f:
            shape, fortran, dtype = _npy_header(f, self.path)
        if fortran:
            raise DataError(f"{self.path}: {self._zip_key} is stored in Fortran order; save a C-ordered array "
                            "(np.ascontiguousarray)")
        self._layout(shape, dtype, self._zip_key)
        self._zip_dtype = dtype
        label_key = next((k for k in LABEL_KEYS if k in names), None)
        if label_key is not None:
            with np.load(self.path, allow_pickle=False) as z:  # loads only that member
                self._labels = z[label_key]

    def _open_safetensors(self, key: Optional[str]) -> None:
        from safetensors import safe_open
        try:
            with safe_open(str(self.path), "pt") as f:
                names = list(f.keys())
                self._st_key = _pick_key(names, key, INPUT_KEYS, self.path)
                sl = f.get_slice(self._st_key)
                shape, dtype = sl.get_shape(), sl.get_dtype()
                label_key = next((k for k in LABEL_KEYS if k in names), None)
                if label_key is not None:
                    self._labels = f.get_tensor(label_key).numpy()
        except DataError:
            raise
        except Exception as e:  # safetensors raises its own error types
            raise DataError(f"{self.path}: not a readable .safetensors file ({e}); the file is truncated or "
                            "corrupt") from None
        names = {"U8": "uint8", "F16": "float16", "F32": "float32", "F64": "float64", "BF16": "bfloat16"}
        self._layout(shape, names.get(dtype, dtype), self._st_key)

    # ---------------------------------------------------------------- reading
    def _rows(self) -> Iterator[np.ndarray | torch.Tensor]:
        """Raw batches of `batch` inputs, in order, as stored."""
        b, n = self.batch, self.n
        if self.kind == "npy":
            for a in range(0, n, b):
                yield np.array(self._array[a:a + b])
        elif self.kind == "npz":
            row = int(np.prod(self._shape_rest())) * self._zip_dtype.itemsize
            with zipfile.ZipFile(self.path) as zf, zf.open(self._zip_key + ".npy") as f:
                _npy_header(f, self.path)
                for a in range(0, n, b):
                    k = min(b, n - a)
                    data = f.read(row * k)
                    if len(data) != row * k:
                        raise DataError(f"{self.path}: {self._zip_key} ends after {a + len(data) // max(row, 1)} "
                                        f"of {n} inputs; the file is truncated")
                    yield np.frombuffer(data, dtype=self._zip_dtype).reshape((k,) + self._shape_rest()).copy()
        elif self.kind == "safetensors":
            from safetensors import safe_open
            with safe_open(str(self.path), "pt") as f:
                sl = f.get_slice(self._st_key)
                for a in range(0, n, b):
                    yield sl[a:a + b]
        else:
            for a in range(0, n, b):
                yield np.stack([self._decode(p) for p in self._files[a:a + b]])

    def _shape_rest(self) -> tuple[int, ...]:
        c, h, w = self.image_shape
        return {None: (c, h, w), "nhw": (h, w), "nhwc": (h, w, c)}[self._perm]

    def _decode(self, path: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError
        c, h, w = self.image_shape
        try:
            with Image.open(path) as im:
                im = im.convert("L" if c == 1 else "RGB")
                if im.size != (w, h):
                    raise DataError(f"{path} is {im.size[0]}x{im.size[1]} pixels but the run's images are "
                                    f"{w}x{h}; resize the images (no resizing is done)")
                arr = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise DataError(f"cannot decode image {path} ({e}); the file is truncated or not an image: "
                            "replace or delete it") from None
        if c not in (1, 3):
            raise DataError(f"the run's images have {c} channels; image folders hold 1 or 3")
        return arr[:, :, None] if c == 1 else arr  # [H, W, C]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        start = 0
        for raw in self._rows():
            t = raw if isinstance(raw, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(raw))
            if self.kind == "folder" or self._perm == "nhwc":
                t = t.permute(0, 3, 1, 2)
            elif self._perm == "nhw":
                t = t[:, None]
            k = t.shape[0]
            where = f"{self.path}, inputs {start}..{start + k - 1}"
            if t.dtype not in (torch.uint8,):
                t = t.to(torch.float32)
            x = check_inputs(t.contiguous(), self.image_shape, where=where)
            y = None if self._labels is None else torch.from_numpy(self._labels[start:start + k].copy())
            start += k
            yield x, y


def _pick_key(names: Sequence[str], key: Optional[str], preferred: Sequence[str], path: Path) -> str:
    if key is not None:
        if key not in names:
            raise DataError(f"{path} has no array {key!r} (it holds {sorted(names)})")
        return key
    for k in preferred:
        if k in names:
            return k
    rest = [n for n in names if n not in LABEL_KEYS]
    if len(rest) == 1:
        return rest[0]
    raise DataError(f"{path} holds arrays {sorted(names)}; name the inputs x (and the labels y)")


def _npy_header(f, path: Path) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of an .npy stream, leaving f at the first data byte."""
    from numpy.lib import format as npf
    try:
        version = npf.read_magic(f)
        reader = {(1, 0): npf.read_array_header_1_0, (2, 0): npf.read_array_header_2_0}.get(version)
        if reader is None:
            raise ValueError(f"unsupported .npy version {version}")
        shape, fortran, dtype = reader(f)
    except ValueError as e:
        raise DataError(f"{path}: not a readable .npy member ({e}); the file is truncated or corrupt") from None
    if dtype.hasobject:
        raise DataError(f"{path}: holds Python objects (pickled data); store a plain numeric array")
    return shape, fortran, dtype


def _read_label_file(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"--labels {path} does not exist; pass an .npy, .npz or text file of integer labels")
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, allow_pickle=False)
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return z[_pick_key(z.files, None, LABEL_KEYS, path)]
        return np.loadtxt(path, dtype=np.int64, ndmin=1)
    except DataError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"--labels {path}: cannot read integer labels ({e})") from None


def rechunk(batches: Iterable, shape: Sequence[int], num_classes: int,
             chunk_size: int) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Regroup incoming batches (tensors, or (x, y) pairs) into chunks of exactly chunk_size inputs
    (the last may be smaller), validating each batch; never holds more than a chunk plus a batch."""
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    held = 0
    seen = 0
    labelled: Optional[bool] = None
    for item in batches:
        if isinstance(item, (tuple, list)) and len(item) == 2:
            x, y = item
        else:
            x, y = item, None
        where = f"inputs {seen}..{seen + (len(x) if hasattr(x, '__len__') else 0) - 1}"
        x = check_inputs(x, shape, where=where)
        if labelled is None:
            labelled = y is not None
        if labelled != (y is not None):
            raise DataError(f"{where}: some batches come with labels and some without; give labels for all or none")
        if y is not None:
            ys.append(_check_labels(y, x.shape[0], num_classes, where))
        xs.append(x)
        held += x.shape[0]
        seen += x.shape[0]
        while held >= chunk_size:
            xa = torch.cat(xs) if len(xs) > 1 else xs[0]
            ya = (torch.cat(ys) if len(ys) > 1 else ys[0]) if labelled else None
            yield xa[:chunk_size], None if ya is None else ya[:chunk_size]
            xs, held = [xa[chunk_size:]], xa.shape[0] - chunk_size
            ys = [ya[chunk_size:]] if labelled else []
    if held:
        yield torch.cat(xs), (torch.cat(ys) if labelled else None)


def inputs_sha256(x: torch.Tensor, y: Optional[torch.Tensor]) -> str:
    h = hashlib.sha256(np.ascontiguousarray(x.numpy()).data)
    if y is not None:
        h.update(b"labels")
        h.update(np.ascontiguousarray(y.numpy()).data)
    return h.hexdigest()
