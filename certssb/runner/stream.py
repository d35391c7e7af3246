"""Streaming certification: certify inputs that arrive in batches, chunk by chunk, resumably.

This file's one job is issue 7.5: a trained run directory's ensemble certifies a stream
of new inputs of any length with memory that does not grow with the number of inputs
(apart from the storage-update store, which by design keeps every certified ball:
4 D + 32 bytes per stored input, and its search temporaries, bounded), and a job killed at
any moment continues where it stopped.

Per chunk of `chunk_size` inputs (`RunCertifier.certify`): per-input sigma (RAB: sigma0;
Cert-SSB: the pipeline's sigma search, `certssb.smoothing.sigma.optimize_sigma` on the run's base
model, with SIGMA-stream ids STREAM_ID_OFFSET + stream index), the votes of every model
group (the groups stay loaded when they fit in memory, else are re-read per chunk), the
certificates, then the storage update (one store continued across chunks, queried in
arrival order) and one checkpoint, written in this order, each atomically:

    <out>/chunks/chunk-NNNNN.safetensors  the chunk's certificates and the store rows it added
    <out>/progress.json                   the commit record: inputs done, per-chunk sha256 of
                                          the file and of the inputs it was computed from

A rerun with the same arguments verifies the committed chunks (a missing, truncated or
altered chunk file is redone, with every chunk after it), checks that the inputs are the
same ones (their sha256), rebuilds the store from the chunks' rows and goes on; every
output is then identical, byte for byte, to an uninterrupted run's. When progress.json
itself is damaged, the chunks are recovered from their own embedded checksums. At the end:
`certificates.csv` (assembled part by part from the chunk files; the run directory's
columns), `regions.safetensors` (the store: `RegionStore.load`, `certify --regions`) and
`summary.json` (deterministic: no timings).

Example::

    from certssb.runner.stream import InputFile, RunCertifier, certify_stream
    run = RunCertifier("runs/mnist", method="cert-ssb")
    inputs = InputFile("new.npz", run.image_shape, num_classes=run.num_classes)
    summary = certify_stream(run, inputs, "runs/mnist/stream-1", chunk_size=1000, total=len(inputs))
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from ..attacks import ADDITIVE_TRIGGERS
from ..certify.bounds import poison_budget
from ..certify.votes import Certificates, Votes, certify_votes, collect_votes
from .config import RunConfig, resolve_device
from ..smoothing.ensemble import MANIFEST_FORMAT, EnsembleDir, EnsembleSpec, _free_bytes
from ..errors import CertssbError, CheckpointError, DataError
from ..core.files import (CHECKSUM_KEY, AtomicFile, atomic_write_json, content_digest, load_tensors, read_json,
                     save_tensors, sha256_file)
from ..kernels import using_backend
from ..models import build_model, count_parameters
from ..certify.regions import FORMAT_VERSION as STORE_FORMAT_VERSION, RegionStore
from ..certify.regions import _FORMAT_NAME as STORE_FORMAT_NAME, _META_KEY as STORE_META_KEY
from .rundir import check_compatible
from ..report.metrics import CSV_COLUMNS, csv_cell, radius_key
from .lock import run_lock
from ..smoothing.sigma import optimize_sigma
from ..smoothing.training import Schedule

__all__ = ["STREAM_ID_OFFSET", "RunCertifier", "InputFile", "certify_stream", "check_inputs", "read_chunk",
           "format_summary", "KINDS"]

# SIGMA-stream ids of streamed inputs: stream input i -> 3 * 2^30 + i (training samples use
# 0.., clean test 2^30.., triggered test 2^31..: `certssb.smoothing.noise.SPLIT_OFFSETS`), so a stream
# never shares a sigma-search draw with the run's own inputs.
STREAM_ID_OFFSET = 3 << 30
PROGRESS_FORMAT = "certssb.runner.stream-progress"
CHUNK_FORMAT = "certssb.runner.stream-chunk"
FORMAT_VERSION = 1
# region_update codes of a chunk file (-1: storage update off)
KINDS = ("none", "trim", "align", "abstain")
# The ensemble stays loaded between chunks when its weights take at most this share of free memory.
MODEL_MEMORY_SHARE = 0.25
# Input keys looked for in .npz / .safetensors files, in this order (else the only array).
INPUT_KEYS = ("x", "images", "inputs", "x_test")
LABEL_KEYS = ("y", "labels", "y_test")


# ============================================================================ the run's ensemble
class RunCertifier:
    """A trained run directory's ensemble, loaded once to certify new inputs chunk by chunk.

    Args:
        run_dir: a run directory written by `certssb train` / `run` (config.json, models/...).
        method: "cert-ssb" or "rab"; default: cert-ssb when the run trained it, else rab.
        bound, alpha, device, backend, eval_batch_size: default to the run's config.
        keep_models: keep every model group in memory between chunks (True), re-read the
            groups from disk for every chunk (False), or decide from the weights' size: kept
            when they take at most MODEL_MEMORY_SHARE of free memory (None).

    Nothing is written. `certify(x, start)` returns the `Certificates` of inputs
    x [b, C, H, W] (float32 in [0, 1]) that sit at positions start..start+b-1 of a stream
    (the position picks their sigma-search noise; votes do not depend on it).
    Example::

        run = RunCertifier("runs/digits", method="rab")
        cert = run.certify(x)        # cert.predict, cert.radius, cert.abstain, cert.sigma
    """

    def __init__(self, run_dir: str | os.PathLike, *, method: Optional[str] = None,
                 bound: Optional[str] = None, alpha: Optional[float] = None, device: Optional[str] = None,
                 backend: Optional[str] = None, eval_batch_size: Optional[int] = None,
                 keep_models: Optional[bool] = None, log: Optional[Callable[[str], None]] = None) -> None:
        from .pipeline import sigma_search

        self.path = Path(run_dir)
        log = log or (lambda s: None)
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise CertssbError(f"{cfg_path} not found: --out must be a run directory written by "
                               "`certssb train` or `certssb run`")
        saved = check_compatible(self.path)  # another run format or a newer certssb: refused
        cfg = RunConfig.from_dict(saved["config"])
        for key, value in (("bound", bound), ("alpha", alpha), ("device", device), ("backend", backend),
                           ("eval_batch_size", eval_batch_size)):
            if value is not None:
                setattr(cfg, key, value)
        cfg.out = str(self.path)
        self.cfg = cfg = cfg.resolve()
        if method is None:
            method = "cert-ssb" if "cert-ssb" in cfg.methods else cfg.methods[0]
        if method not in ("cert-ssb", "rab"):
            raise CertssbError(f"unknown method {method!r}; choose cert-ssb or rab")
        self.method = method
        self.mode = "rab" if method == "rab" else "paper"
        self.device = resolve_device(cfg.device)
        self.ens = self._ensemble()
        spec = self.ens.spec
        self.image_shape = (spec.in_channels, *spec.image_size)
        self.num_classes = spec.num_classes
        self.models = spec.models
        self.search = None
        self.base = None
        base_sha = None
        if method == "cert-ssb":
            sig_path = self.path / "sigma.safetensors"
            sig = load_tensors(sig_path)
            if "train" not in sig or sig["train"].numel() == 0 or not bool(torch.isfinite(sig["train"]).all()):
                raise CheckpointError(f"{sig_path} holds no valid training sigmas; rerun `certssb train`")
            self.sigma_train_min = float(sig["train"].min())
            self.search = sigma_search(cfg)
            self.search.validate()
            base_path = self.path / "models" / "base.safetensors"
            state = load_tensors(base_path)
            base_sha = sha256_file(base_path)
            self.base = build_model(spec.arch, spec.in_channels, spec.num_classes, spec.image_size)
            try:
                self.base.load_state_dict(state)
            except RuntimeError as e:
                raise CheckpointError(f"{base_path} does not fit the {spec.arch} architecture: {e}") from None
            self.base.to(self.device).eval()
        else:
            self.sigma_train_min = float(cfg.sigma0)
        self.trigger_norm = self._trigger_norm()
        weights = 4 * count_parameters(build_model(spec.arch, spec.in_channels, spec.num_classes, spec.image_size))
        self.model_bytes = weights * spec.models
        if keep_models is None:
            keep_models = self.model_bytes <= MODEL_MEMORY_SHARE * _free_bytes(self.device)
        self._groups = list(self.ens.iter_groups(device=self.device)) if keep_models else None
        if not keep_models:
            log(f"stream: the {spec.models} models ({self.model_bytes / 2**20:.0f} MiB) are re-read for every chunk")
        manifest = read_json(self.ens.manifest_path)
        self.fingerprint = {
            "run_config": _sha_json(saved["config"]), "method": method, "bound": cfg.bound, "alpha": cfg.alpha,
            "models": spec.models, "ensemble": spec.fingerprint,
            "model_sha256": _sha_json(sorted((k, v["sha256"]) for k, v in manifest["finished"].items())),
            "base_sha256": base_sha, "sigma0": cfg.sigma0, "sigma_train_min": self.sigma_train_min,
            "search": None if self.search is None else self.search.as_dict(), "seed": cfg.seed,
            "eval_batch_size": cfg.eval_batch_size, "backend": cfg.backend, "device": self.device.type,
            "image_shape": list(self.image_shape), "num_classes": self.num_classes,
            "trigger_norm": self.trigger_norm}

    def _ensemble(self) -> EnsembleDir:
        """The method's EnsembleDir, its spec read from the manifest (no dataset needed)."""
        folder = self.path / "models" / self.method
        path = folder / "manifest.json"
        if not path.is_file():
            raise CheckpointError(f"{self.path} has no trained {self.method} models ({path} missing); run "
                                  f"`certssb train --method {self.method}` first or pick another --method")
        m = read_json(path)
        if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
            raise CheckpointError(f"{path} is from an incompatible certssb version (manifest format "
                                  f"{m.get('format') if isinstance(m, dict) else None!r}, this build reads "
                                  f"{MANIFEST_FORMAT}); retrain the run with this version")
        try:
            spec = EnsembleSpec(method=m["method"], arch=m["arch"], in_channels=int(m["in_channels"]),
                                num_classes=int(m["num_classes"]), image_size=tuple(m["image_size"]),
                                models=int(m["models"]), schedule=Schedule(**m["schedule"]), seed=int(m["seed"]),
                                fingerprint=m["fingerprint"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path} is incomplete ({e}); rerun `certssb train`") from None
        if spec.method != self.method or spec.models != self.cfg.models or spec.seed != self.cfg.seed:
            raise CheckpointError(f"{path} does not belong to this run's config (method {spec.method}, "
                                  f"{spec.models} models, seed {spec.seed}); rerun `certssb train`")
        return EnsembleDir(folder, spec)

    def _trigger_norm(self) -> float:
        """The trigger's L2 norm for the poison budget: nominal delta for additive triggers, else
        the measured max of the run's summary (the nominal delta when the run has none yet)."""
        cfg = self.cfg
        if cfg.trigger not in ADDITIVE_TRIGGERS and (self.path / "summary.json").is_file():
            try:
                return float(read_json(self.path / "summary.json")["attack"]["trigger_l2"]["max"])
            except (CheckpointError, KeyError, TypeError, ValueError):
                pass
        return float(cfg.delta)

    # ---------------------------------------------------------------- per chunk
    def sigma(self, x: torch.Tensor, start: int = 0, id_offset: int = STREAM_ID_OFFSET) -> torch.Tensor:
        """sigma [b] float32 of inputs x at stream positions start..: sigma0 (rab), else the sigma search."""
        b = x.shape[0]
        if self.method == "rab":
            return torch.full((b,), float(self.cfg.sigma0), dtype=torch.float32)
        if start < 0 or id_offset < 0 or id_offset + start + b > (1 << 32):
            raise CertssbError(f"stream positions {start}..{start + b - 1} do not fit the sigma-search ids "
                               f"(offset {id_offset}, ids below 2^32); certify at most "
                               f"{(1 << 32) - id_offset} inputs per stream")
        ids = torch.arange(start, start + b, dtype=torch.int64) + int(id_offset)
        with using_backend(self.cfg.backend):
            return optimize_sigma(self.base, x, ids, self.search, seed=self.cfg.seed,
                                  batch_size=max(1, self.cfg.eval_batch_size // self.search.draws),
                                  device=self.device)

    def votes(self, x: torch.Tensor, sigma: torch.Tensor) -> Votes:
        """Votes of every model on x with noise levels sigma (exact integer accumulators)."""
        groups = self._groups if self._groups is not None else self.ens.iter_groups(device=self.device)
        with using_backend(self.cfg.backend):
            return collect_votes(groups, x, sigma, seed=self.cfg.seed, num_classes=self.num_classes,
                                 batch_size=self.cfg.eval_batch_size, device=self.device)

    def certify(self, x: torch.Tensor, start: int = 0, id_offset: int = STREAM_ID_OFFSET) -> Certificates:
        """Certificates (before any storage update) of inputs x [b, C, H, W] at stream positions start.."""
        x = check_inputs(x, self.image_shape, where=f"inputs from stream position {start}")
        sigma = self.sigma(x, start, id_offset)
        votes = self.votes(x, sigma)
        with using_backend(self.cfg.backend):
            return certify_votes(votes, sigma, bound=self.cfg.bound, alpha=self.cfg.alpha, mode=self.mode,
                                 sigma_train_min=self.sigma_train_min)


# ============================================================================ inputs
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
            self._files = _list_images(self.path)
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


def _list_images(folder: Path) -> list[Path]:
    from ..data.loading import IMAGE_EXTENSIONS
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


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


def _rechunk(batches: Iterable, shape: Sequence[int], num_classes: int,
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


def _inputs_sha256(x: torch.Tensor, y: Optional[torch.Tensor]) -> str:
    h = hashlib.sha256(np.ascontiguousarray(x.numpy()).data)
    if y is not None:
        h.update(b"labels")
        h.update(np.ascontiguousarray(y.numpy()).data)
    return h.hexdigest()


# ============================================================================ chunk files
def _content_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the tensors (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def _chunk_path(out: Path, i: int) -> Path:
    return out / "chunks" / f"chunk-{i:05d}.safetensors"


def read_chunk(path: str | os.PathLike, expected_sha256: Optional[str] = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, info) of a chunk file, verified against the file checksum (if given) and its
    embedded content checksum; CheckpointError when it is missing, truncated or altered."""
    from safetensors import safe_open

    tensors = load_tensors(path, expected_sha256=expected_sha256)
    try:
        with safe_open(str(path), "pt") as f:
            info = json.loads((f.metadata() or {})["certssb"])
    except Exception:
        raise CheckpointError(f"{path} is not a certssb stream chunk (no metadata); delete it") from None
    if not isinstance(info, dict) or info.get("format") != CHUNK_FORMAT or info.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a stream chunk of this certssb version; delete it")
    if _content_sha256(tensors) != info.get("content_sha256"):
        raise CheckpointError(f"{path} does not match its content checksum (altered); it will be redone")
    return tensors, info


# ============================================================================ progress and store
def _sha_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _recover(out: Path, job_sha: str, log: Callable[[str], None]) -> list[dict]:
    """Progress entries rebuilt from the chunk files themselves (progress.json lost or corrupt):
    the longest run of consecutive chunks of this job whose content checksums hold."""
    entries: list[dict] = []
    start = 0
    while True:
        path = _chunk_path(out, len(entries))
        if not path.is_file():
            break
        try:
            _, info = read_chunk(path)
        except CheckpointError as e:
            log(f"stream: {e}")
            break
        if info.get("job_sha256") != job_sha or info.get("index") != len(entries) or info.get("start") != start:
            break
        entries.append({"index": info["index"], "start": start, "n": info["n"],
                        "inputs_sha256": info["inputs_sha256"], "sha256": sha256_file(path),
                        "stored": info["stored"], "counts": info["counts"]})
        start += info["n"]
    return entries


def _diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Names of the settings that differ between two job records (nested keys joined by dots)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return [prefix.rstrip(".") or "job"] if old != new else []
    out = []
    for k in sorted(set(old) | set(new)):
        out += _diff_keys(old.get(k), new.get(k), f"{prefix}{k}.")
    return out


def _load_progress(out: Path, job: dict, job_sha: str, log: Callable[[str], None]) -> tuple[list[dict], bool]:
    """(verified entries of finished chunks, finished flag) of an earlier run of this job."""
    path = out / "progress.json"
    entries: list[dict] = []
    finished = False
    if path.is_file():
        try:
            prog = read_json(path)
            ok = (isinstance(prog, dict) and prog.get("format") == PROGRESS_FORMAT
                  and isinstance(prog.get("chunks"), list))
        except CheckpointError:
            ok = False
        if not ok:
            log(f"stream: {path} is unreadable; recovering the finished chunks from their own checksums")
            entries = _recover(out, job_sha, log)
        else:
            if prog.get("job_sha256") != job_sha:
                diff = _diff_keys(prog.get("job", {}), job)
                raise CertssbError(f"{out} holds a stream job with other settings (differing: {', '.join(diff)}); "
                                   "rerun with the same arguments to continue it, or use another output folder")
            entries = prog["chunks"]
            finished = bool(prog.get("finished"))
    elif (out / "chunks").is_dir():
        entries = _recover(out, job_sha, log)
    good: list[dict] = []
    for e in entries:  # a chunk whose file is missing or altered is redone, with every chunk after it
        p = _chunk_path(out, len(good))
        if e.get("index") != len(good) or not p.is_file() or sha256_file(p) != e.get("sha256"):
            log(f"stream: chunk {len(good)} is missing or does not match its checksum; redoing it and every "
                "chunk after it")
            finished = False
            break
        good.append(e)
    return good, finished and len(good) == len(entries)


_ST_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.int64: "I64"}


def _pieces(parts: dict[str, list[torch.Tensor]], order: list[str]) -> Iterator[memoryview]:
    """The data buffer of a safetensors file, as the raw bytes of its tensors' pieces in file order."""
    for name in order:
        for t in parts[name]:
            if t.numel():
                yield t.detach().cpu().contiguous().numpy().data


def _write_safetensors(path: Path, parts: dict[str, list[torch.Tensor]], metadata: dict[str, str]) -> str:
    """Write a safetensors file atomically from tensors given in pieces (each entry the concatenation
    of its pieces along dim 0), streaming: no copy of the data is made. Returns the file's sha256.

    Lays the file out as safetensors (0.8) does (header: __metadata__, then the tensors by
    decreasing alignment, then name; compact JSON padded with spaces to 8 bytes), so the bytes
    equal `save_tensors` of the concatenated tensors (a test checks it)."""
    infos = {}
    for name, pieces in parts.items():
        t0 = pieces[0]
        rows = sum(int(t.shape[0]) for t in pieces)
        infos[name] = (t0.dtype, [rows, *t0.shape[1:]], t0.element_size())
    order = sorted(parts, key=lambda k: (-infos[k][2], k))
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name in order:
        dtype, shape, size = infos[name]
        nbytes = int(np.prod(shape)) * size
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    # the checksum `fileio.save_tensors` embeds (a first pass over the same memory: no copy)
    header["__metadata__"] = {**metadata, CHECKSUM_KEY: content_digest(header, _pieces(parts, order))}
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    head += b" " * (-len(head) % 8)
    h = hashlib.sha256()
    f = AtomicFile(path, binary=True)
    try:
        for data in [len(head).to_bytes(8, "little"), head, *_pieces(parts, order)]:
            f.write(data)
            h.update(data)
        f.commit()
    except BaseException:
        f.abort()
        raise
    return h.hexdigest()


def _store_meta(dim: int, n: int, counts: dict) -> dict[str, str]:
    """The metadata `RegionStore.save` writes (its file format), for a store of n balls."""
    return {STORE_META_KEY: json.dumps({"format": STORE_FORMAT_NAME, "version": STORE_FORMAT_VERSION,
                                        "dim": dim, "n": n, "counts": counts})}


def _save_store(store: RegionStore, path: Path) -> str:
    """`store.save(path)` without serializing the store in memory first (same bytes); returns the sha256."""
    parts = {"centres": [store.centres], "labels": [store.labels], "radii": [store.radii],
             "queries": [store.queries]}
    return _write_safetensors(path, parts, _store_meta(store.dim, len(store), store.counts))


def _store_from_chunks(out: Path, base: Optional[RegionStore], dim: int, entries: list[dict]) -> RegionStore:
    """The store after the finished chunks: `base` (or empty) plus every chunk's appended rows.

    Rebuilt through the store's own file format and `RegionStore.load`, which validates it;
    decisions do not depend on how the store was built, so the continued stream is exact."""
    parts: dict[str, list[torch.Tensor]] = {
        "centres": [torch.zeros(0, dim, dtype=torch.float32)], "labels": [torch.zeros(0, dtype=torch.int64)],
        "radii": [torch.zeros(0, dtype=torch.float64)], "queries": [torch.zeros(0, dtype=torch.int64)]}
    if base is not None and len(base):
        for k, t in (("centres", base.centres), ("labels", base.labels), ("radii", base.radii),
                     ("queries", base.queries)):
            parts[k].append(t)
    for e in entries:
        tensors, _ = read_chunk(_chunk_path(out, e["index"]), e["sha256"])
        for k in parts:
            parts[k].append(tensors[f"seg_{k}"])
    counts = entries[-1]["counts"] if entries else (base.counts if base is not None else None)
    tmp = out / ".store-resume.safetensors"
    _write_safetensors(tmp, parts, _store_meta(dim, sum(int(t.shape[0]) for t in parts["labels"]), counts))
    del parts
    try:
        store = RegionStore.load(tmp)
    finally:
        tmp.unlink(missing_ok=True)
    store.source = None
    return store


def _reserve(store: RegionStore, n: int, total: Optional[int]) -> None:
    """Room for n more balls: the whole stream at once when its length is known (untouched pages
    cost no memory), else the next power of two, so the store is copied O(log N) times."""
    need = len(store) + n
    store.reserve(max(need, len(store) + total) if total else 1 << max(need - 1, 1).bit_length())


# ============================================================================ the job
@dataclass
class _Tally:
    """Running totals of the summary (from the chunk files, so they are the same after a resume)."""

    radii: Sequence[float]
    n: int = 0
    abstained: int = 0
    correct: int = 0
    correct_raw: int = 0
    radius_sum: float = 0.0
    sigma_min: float = math.inf
    sigma_max: float = -math.inf
    sigma_sum: float = 0.0
    labelled: bool = False

    def __post_init__(self) -> None:
        self.kinds = {k: 0 for k in KINDS}
        self.cert = {radius_key(r): 0 for r in self.radii}
        self.cert_raw = {radius_key(r): 0 for r in self.radii}
        self.predicted: dict[int, int] = {}

    def add(self, t: dict[str, torch.Tensor]) -> None:
        n = int(t["idx"].numel())
        ab = t["abstain"]
        self.n += n
        self.abstained += int(ab.sum())
        self.radius_sum += float(t["radius"].sum())
        s = t["sigma"]
        if n:
            self.sigma_min = min(self.sigma_min, float(s.min()))
            self.sigma_max = max(self.sigma_max, float(s.max()))
            self.sigma_sum += float(s.sum())
        for code, c in zip(*torch.unique(t["region_update"], return_counts=True)):
            if int(code) >= 0:
                self.kinds[KINDS[int(code)]] += int(c)
        for cls, c in zip(*torch.unique(t["predict"][~ab], return_counts=True)):
            self.predicted[int(cls)] = self.predicted.get(int(cls), 0) + int(c)
        if "label" in t:
            self.labelled = True
            for suffix, pred, rad, acc in (("", t["predict"], t["radius"], self.cert),
                                           ("_raw", t["predict_raw"], t["radius_raw"], self.cert_raw)):
                ok = (pred == t["label"]) & ~ab
                if suffix:
                    self.correct_raw += int(ok.sum())
                else:
                    self.correct += int(ok.sum())
                for r in self.radii:
                    acc[radius_key(r)] += int((ok if r == 0 else ok & (rad > r)).sum())

    def summary(self) -> dict:
        n = max(self.n, 1)
        out = {"inputs": self.n, "abstain_rate": self.abstained / n, "mean_radius": self.radius_sum / n,
               "sigma": {"min": self.sigma_min if self.n else None, "mean": self.sigma_sum / n if self.n else None,
                         "max": self.sigma_max if self.n else None},
               "predicted": {str(k): v for k, v in sorted(self.predicted.items())},
               "region_update": dict(self.kinds)}
        if self.labelled:
            out["accuracy"] = self.correct / n
            out["certified_accuracy"] = {k: v / n for k, v in self.cert.items()}
            out["no_update"] = {"accuracy": self.correct_raw / n,
                                "certified_accuracy": {k: v / n for k, v in self.cert_raw.items()}}
        return out


def _csv_lines(t: dict[str, torch.Tensor]) -> str:
    """The CSV rows of one chunk (columns `certssb.report.metrics.CSV_COLUMNS`; label, correct and target
    empty for unlabelled inputs, region_update and query_order empty without the storage update)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = {k: v.tolist() for k, v in t.items() if not k.startswith("seg_")}
    labelled = "label" in cols
    for j in range(len(cols["idx"])):
        row = []
        for k in CSV_COLUMNS:
            if k == "correct":
                row.append(int(cols["predict"][j] == cols["label"][j] and not cols["abstain"][j]) if labelled else "")
            elif k == "region_update":
                code = cols["region_update"][j]
                row.append(KINDS[code] if code >= 0 else "")
            elif k == "query_order":
                q = cols["query_order"][j]
                row.append(q if q >= 0 else "")
            elif k not in cols:
                row.append("")
            else:
                row.append(csv_cell(cols[k][j]))
        w.writerow(row)
    return buf.getvalue()


def certify_stream(run: RunCertifier | str | os.PathLike, batches: Iterable, out_dir: str | os.PathLike, *,
                   chunk_size: int = 1000, storage_update: Optional[bool] = None,
                   regions: RegionStore | str | os.PathLike | None = None, id_offset: int = STREAM_ID_OFFSET,
                   total: Optional[int] = None, progress: bool = False, log: Optional[Callable[[str], None]] = None,
                   **run_options: Any) -> dict:
    """Certify a stream of inputs chunk by chunk into `out_dir`, resuming an interrupted job there.

    Args:
        run: a `RunCertifier`, or a run directory (then `run_options` go to RunCertifier:
            method, bound, alpha, device, backend, eval_batch_size, keep_models).
        batches: an iterable of input batches: tensors [b, C, H, W] (uint8 pixels or floats in
            [0, 1]), or (x, y) pairs with task labels y [b] (all batches or none); an
            `InputFile` yields such pairs. Batches are regrouped into chunks of `chunk_size`.
        out_dir: where the chunks, progress.json and the final outputs go.
        storage_update: run the storage-update certifier over the stream (default: the run's
            setting, for cert-ssb only, as the pipeline's headline numbers).
        regions: a region store (or its file) that the storage update continues; default empty.
        id_offset: SIGMA-stream id of stream position 0 (Cert-SSB's sigma search).
        total: the number of inputs, if known (progress bar, one reservation of the store).
    Returns:
        the summary (also in out_dir/summary.json) plus "seconds", "inputs_per_s",
        "chunks_resumed" (finished chunks found) and "chunks_done" (chunks computed now).

    Memory is O(chunk_size x (D + M)) plus the loaded models and the store; a rerun after a
    kill continues from the last finished chunk and ends with identical outputs.
    """
    t_start = time.perf_counter()
    log = log or (lambda s: None)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise CertssbError(f"--chunk-size must be an integer >= 1, got {chunk_size!r}")
    if not isinstance(run, RunCertifier):
        run = RunCertifier(run, log=log, **run_options)
    elif run_options:
        raise CertssbError(f"options {sorted(run_options)} apply to a run directory, not to a loaded RunCertifier")
    if storage_update is None:
        storage_update = bool(run.cfg.storage_update and run.method == "cert-ssb")
    base_store: Optional[RegionStore] = None
    if regions is not None and not storage_update:
        log("stream: the storage update is off, so the region store passed is not used")
    if regions is not None and storage_update:
        base_store = regions if isinstance(regions, RegionStore) else RegionStore.load(regions)
        dim = int(np.prod(run.image_shape))
        if base_store.dim is not None and base_store.dim != dim:
            raise CertssbError(f"--regions holds inputs with {base_store.dim} features but the run's have {dim}; "
                               "pass a store written for the same dataset and image size")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    job = {"run": run.fingerprint, "chunk_size": chunk_size, "storage_update": bool(storage_update),
           "regions": None if base_store is None else {
               "n": len(base_store), "queries": base_store.n_queries,
               "sha256": _content_sha256({"c": base_store.centres, "l": base_store.labels,
                                          "r": base_store.radii, "q": base_store.queries})},
           "id_offset": int(id_offset)}
    job_sha = _sha_json(job)
    with run_lock(out, "certssb certify-stream"):  # one job per output folder
        return _run_job(run, batches, out, job, job_sha, chunk_size, bool(storage_update), base_store,
                        int(id_offset), total, progress, log, t_start)


def _run_job(run: RunCertifier, batches: Iterable, out: Path, job: dict, job_sha: str, chunk_size: int,
             storage_update: bool, base_store: Optional[RegionStore], id_offset: int, total: Optional[int],
             progress: bool, log: Callable[[str], None], t_start: float) -> dict:
    for folder in (out, out / "chunks"):  # temporary files of writes a kill interrupted (we hold the lock)
        for tmp in folder.glob(".*.tmp") if folder.is_dir() else []:
            tmp.unlink(missing_ok=True)
    entries, finished = _load_progress(out, job, job_sha, log)
    resumed = len(entries)
    for stale in sorted((out / "chunks").glob("chunk-*.safetensors")) if (out / "chunks").is_dir() else []:
        try:
            if int(stale.stem.split("-")[1]) >= resumed:  # uncommitted, damaged, or after a damaged one
                stale.unlink()
        except ValueError:
            pass
    if resumed:
        log(f"stream: continuing after {resumed} finished chunks ({sum(e['n'] for e in entries)} inputs)")
    dim = int(np.prod(run.image_shape))
    stores: list[RegionStore] = []

    def get_store() -> Optional[RegionStore]:
        """The store after the finished chunks, built on first use (a finished job may not need it)."""
        if not storage_update:
            return None
        if not stores:
            if resumed:
                stores.append(_store_from_chunks(out, base_store, dim, entries[:resumed]))
            else:
                stores.append(base_store.copy() if base_store is not None else RegionStore(dim=dim))
        return stores[0]

    progress_path = out / "progress.json"

    def commit(done_finished: bool, outputs: Optional[dict] = None) -> None:
        atomic_write_json(progress_path, {
            "format": PROGRESS_FORMAT, "version": FORMAT_VERSION, "job_sha256": job_sha, "job": job,
            "done": sum(e["n"] for e in entries), "chunks": entries, "finished": done_finished,
            **({"outputs": outputs} if outputs else {})})

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc=f"certify stream ({run.method})", unit="input", leave=False)
    computed = 0
    t_compute = 0.0
    start = 0
    index = 0
    try:
        for x, y in _rechunk(batches, run.image_shape, run.num_classes, chunk_size):
            n = x.shape[0]
            in_sha = _inputs_sha256(x, y)
            if index < resumed:
                e = entries[index]
                if e["n"] != n or e["inputs_sha256"] != in_sha:
                    raise CertssbError(f"inputs {start}..{start + n - 1} differ from the ones chunk {index} of the "
                                       f"interrupted job in {out} was computed from; pass the same inputs to "
                                       "continue it, or use another output folder")
            else:
                t0 = time.perf_counter()
                if finished:  # more inputs than the finished job had
                    raise CertssbError(f"{out} holds a finished job over {start} inputs but more inputs came; "
                                       "use another output folder for a longer stream")
                entries.append(_certify_chunk(run, x, y, start, index, out, get_store(), id_offset, job_sha,
                                              in_sha, total))
                commit(False)
                computed += 1
                t_compute += time.perf_counter() - t0
            start += n
            index += 1
            if bar is not None:
                bar.update(n)
    finally:
        if bar is not None:
            bar.close()
    if index < resumed:
        raise CertssbError(f"the inputs end after {start} inputs but the interrupted job in {out} had already "
                           f"certified {sum(e['n'] for e in entries)}; pass the same inputs to continue it")
    summary = _finish(run, out, entries, get_store, job, finished and computed == 0, commit)
    seconds = time.perf_counter() - t_start
    done_now = sum(e["n"] for e in entries[resumed:])
    return {**summary, "seconds": round(seconds, 3),
            "inputs_per_s": round(done_now / t_compute, 1) if t_compute > 0 else None,
            "chunks_resumed": resumed, "chunks_done": computed}


def _certify_chunk(run: RunCertifier, x: torch.Tensor, y: Optional[torch.Tensor], start: int, index: int,
                   out: Path, store: Optional[RegionStore], id_offset: int, job_sha: str, in_sha: str,
                   total: Optional[int]) -> dict:
    """Certify one chunk, apply the storage update (when `store` is given), write its file; returns
    its progress entry."""
    n = x.shape[0]
    cert = run.certify(x, start, id_offset)
    t: dict[str, torch.Tensor] = {
        "idx": torch.arange(start, start + n, dtype=torch.int64), "predict_raw": cert.predict.long(),
        "radius_raw": cert.radius.double(), "sigma": cert.sigma.double(), "pA_lower": cert.pa_lower.double(),
        "pB_upper": cert.pb_upper.double(), "abstain": cert.abstain.bool(),
        "radius_conservative": cert.radius_conservative.double()}
    if y is not None:
        t["label"] = y.long()
    counts = None
    stored = 0
    if store is not None:
        _reserve(store, n, total - start if total else None)
        n0, q0 = len(store), store.n_queries
        labels, radii, kinds = store.certify_stream(x.reshape(n, -1), t["predict_raw"], t["radius_raw"],
                                                    t["abstain"], progress=False)
        t["predict"], t["radius"] = labels.long(), radii.double()
        t["region_update"] = torch.tensor([KINDS.index(k) for k in kinds], dtype=torch.int8)
        t["query_order"] = torch.arange(q0, q0 + n, dtype=torch.int64)
        stored = len(store) - n0
        t["seg_centres"] = store.centres[n0:].clone()
        t["seg_labels"], t["seg_radii"] = store.labels[n0:].clone(), store.radii[n0:].clone()
        t["seg_queries"] = store.queries[n0:].clone()
        counts = store.counts
    else:
        t["predict"], t["radius"] = t["predict_raw"].clone(), t["radius_raw"].clone()
        t["region_update"] = torch.full((n,), -1, dtype=torch.int8)
        t["query_order"] = torch.full((n,), -1, dtype=torch.int64)
    t["poison_budget"] = poison_budget(t["radius"], run.trigger_norm)
    info = {"format": CHUNK_FORMAT, "version": FORMAT_VERSION, "index": index, "start": start, "n": n,
            "job_sha256": job_sha, "inputs_sha256": in_sha, "stored": stored, "counts": counts,
            "content_sha256": _content_sha256(t)}
    sha = save_tensors(_chunk_path(out, index), t, metadata={"certssb": json.dumps(info)})
    return {"index": index, "start": start, "n": n, "inputs_sha256": in_sha, "sha256": sha, "stored": stored,
            "counts": counts}


def _finish(run: RunCertifier, out: Path, entries: list[dict], get_store: Callable[[], Optional[RegionStore]],
            job: dict, already: bool, commit: Callable[[bool, Optional[dict]], None]) -> dict:
    """certificates.csv (part by part), regions.safetensors and summary.json from the chunk files."""
    paths = {"csv": out / "certificates.csv", "summary": out / "summary.json", "regions": out / "regions.safetensors"}
    if already:
        try:
            prog = read_json(out / "progress.json")
            outs = prog.get("outputs", {})
            if all(paths[k].is_file() and sha256_file(paths[k]) == v for k, v in outs.items()) and outs:
                return read_json(paths["summary"])
        except CheckpointError:
            pass
    tally = _Tally(run.cfg.radii)
    csv_file = AtomicFile(paths["csv"])
    try:
        csv_file.write(",".join(CSV_COLUMNS) + "\n")
        for e in entries:
            tensors, _ = read_chunk(_chunk_path(out, e["index"]), e["sha256"])
            tally.add(tensors)
            csv_file.write(_csv_lines(tensors))
        csv_file.commit()
    except BaseException:
        csv_file.abort()
        raise
    summary = {"format": "certssb.runner.stream-summary", "run": str(run.path), "method": run.method, "mode": run.mode,
               "bound": run.cfg.bound, "alpha": run.cfg.alpha, "models": run.models,
               "storage_update": job["storage_update"], "chunks": len(entries), "chunk_size": job["chunk_size"],
               "trigger_norm": run.trigger_norm, **tally.summary()}
    outputs = {}
    store = get_store()
    if store is not None:
        outputs["regions"] = _save_store(store, paths["regions"])
    atomic_write_json(paths["summary"], summary)
    outputs["summary"] = sha256_file(paths["summary"])
    outputs["csv"] = sha256_file(paths["csv"])
    commit(True, outputs)
    return summary


def format_summary(summary: dict, out_dir: str | os.PathLike) -> str:
    """A few printable lines about a finished stream job (the CLI's output)."""
    n = summary["inputs"]
    lines = [f"certified {n} inputs with {summary['method']} (M={summary['models']}, {summary['bound']}, "
             f"alpha={summary['alpha']}) in {summary['chunks']} chunks: abstain {100 * summary['abstain_rate']:.1f}%, "
             f"mean radius {summary['mean_radius']:.4f}"]
    if "accuracy" in summary:
        ca = summary["certified_accuracy"]
        lines.append(f"accuracy {100 * summary['accuracy']:.1f}%; certified accuracy "
                     + ", ".join(f"r={k}: {100 * v:.1f}%" for k, v in ca.items()))
    if summary["storage_update"]:
        ru = summary["region_update"]
        lines.append(f"storage update: {ru['trim']} trimmed, {ru['align']} aligned, {ru['none']} unchanged")
    if summary.get("chunks_resumed") and not summary.get("chunks_done"):
        lines.append(f"the job in {out_dir} was already complete: nothing was recomputed")
    elif summary.get("chunks_resumed"):
        lines.append(f"continued an interrupted job: {summary['chunks_resumed']} chunks were already done")
    if summary.get("inputs_per_s"):
        lines.append(f"{summary['inputs_per_s']:.1f} inputs/s over the chunks computed now")
    lines.append(f"outputs: {out_dir}/certificates.csv, summary.json"
                 + (", regions.safetensors" if summary["storage_update"] else ""))
    return "\n".join(lines)
