"""The run directory: one object to open a trained run, and the check that refuses one this certssb cannot continue.

`config.json` records the on-disk layout version ("format", `RUN_FORMAT`) and
the certssb version that wrote it. `check_compatible(out)` is called before a
command reads or writes a run directory (run, train, certify, report): a
directory of another format, or written by a newer certssb, is refused with a
message that says what to do, instead of being misread or half overwritten.
A folder without config.json (a new run) passes.

`RunDir.open(path, overrides)` is how `certify`, `certify-stream` and the
streaming job read a trained run: its config (with command-line overrides), the
Cert-SSB sigma file, an ensemble's manifest, the base model, the no-defense
baseline and the trigger norm of the poison budget. The layout:

    config.json            {"format", "certssb", "torch", "python", "config"}
    no_defense.json        the plain model's metrics (and the fingerprint that produced them)
    sigma.safetensors      per-sample sigma of the train / clean / triggered splits (Cert-SSB)
    models/base.safetensors, models/no-defense.safetensors, models/<method>/manifest.json + groups
    summary.json, table.txt, certified_accuracy.png, certificates-<method>-<split>.csv,
    regions-<method>-<split>.safetensors  (the certification outputs)
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import torch

from ..attacks import training_trigger_norm
from ..core.files import load_tensors, read_json, sha256_file
from ..errors import CertssbError, CheckpointError
from ..models import build_model
from ..smoothing.ensemble import MANIFEST_FORMAT, EnsembleDir, EnsembleSpec
from ..smoothing.training import Schedule
from .config import RunConfig

# On-disk layout of a run directory. Bump it when files change meaning; it also keys
# every stage's fingerprint (certssb.runner.pipeline), so a bump retrains everything.
# 2: Gaussian noise from 53-bit uniforms (one Philox call per pair of normals).
RUN_FORMAT = 2


def package_version() -> str:
    """The installed certssb version ("unknown" when no metadata is found)."""
    try:
        from importlib.metadata import version
        return version("certssb")
    except Exception:
        return "unknown"


def _version_tuple(text: object) -> Optional[tuple[int, ...]]:
    """(major, minor, patch, ...) of a version string's leading release numbers, else None."""
    if not isinstance(text, str):
        return None
    m = re.match(r"^\s*v?(\d+(?:\.\d+)*)", text)
    return tuple(int(p) for p in m.group(1).split(".")) if m else None


def _newer(saved: object, current: str) -> bool:
    a, b = _version_tuple(saved), _version_tuple(current)
    if a is None or b is None:
        return False  # "unknown" on either side: nothing to compare
    width = max(len(a), len(b))
    return a + (0,) * (width - len(a)) > b + (0,) * (width - len(b))


def check_compatible(out: str | os.PathLike, current_version: Optional[str] = None) -> Optional[dict]:
    """Raise CheckpointError if `out` is a run directory this certssb must not touch.

    Refused: a config.json that is not valid JSON or not a certssb run record; a
    "format" other than RUN_FORMAT; a directory written by a newer certssb than
    `current_version` (default: the installed one). Returns the parsed config.json,
    or None when there is none (a new run directory).

    Example::

        check_compatible("runs/demo")  # None for a fresh folder, else its config.json
    """
    out = Path(out)
    path = out / "config.json"
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} is a file, not a run directory; pass a folder to --out")
    if not path.exists():
        return None
    saved = read_json(path)
    current = current_version if current_version is not None else package_version()
    if not isinstance(saved, dict) or "format" not in saved or not isinstance(saved.get("config"), dict):
        raise CheckpointError(f"{path} is not a certssb run record (no 'format' and 'config'); "
                              f"{out} is not a certssb run directory: pass another --out")
    fmt, by = saved.get("format"), saved.get("certssb", "unknown")
    if isinstance(fmt, bool) or not isinstance(fmt, int):
        raise CheckpointError(f"{path} has an invalid run format {fmt!r}; the file is corrupt: "
                              "use a fresh --out directory")
    if fmt > RUN_FORMAT or _newer(by, current):
        raise CheckpointError(
            f"{out} was written by certssb {by} (run format {fmt}); this is certssb {current} "
            f"(run format {RUN_FORMAT}), which cannot safely read or continue it: upgrade certssb "
            f"(pip install -U certssb) or use a fresh --out directory")
    if fmt < RUN_FORMAT:
        raise CheckpointError(
            f"{out} was written by certssb {by} in the older run format {fmt}; this certssb "
            f"({current}) writes format {RUN_FORMAT} and cannot continue it: rerun into a fresh --out "
            f"directory, or use certssb {by} to work with this one")
    return saved


def load_sigma(path: str | os.PathLike, sizes: dict[str, Optional[int]]) -> dict[str, torch.Tensor]:
    """The sigma vectors of a run (sigma.safetensors), verified: checksum, one float vector [n] per
    split of `sizes` ({"train": n, ...}; n None: any non-zero length), every value finite and > 0.
    CheckpointError otherwise."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} is missing: this run has no Cert-SSB noise levels yet; run "
                              "`certssb train` (or `run`) with the same settings first")
    sig = load_tensors(path)
    for split, n in sizes.items():
        v = sig.get(split)
        if (v is None or not v.is_floating_point() or v.dim() != 1
                or (tuple(v.shape) != (n,) if n is not None else v.numel() == 0)):
            got = "missing" if v is None else f"{v.dtype} {list(v.shape)}"
            want = f"[{n}]" if n is not None else "[n], n > 0"
            raise CheckpointError(f"{path}: sigma of split {split!r} is {got}, expected float {want}; the "
                                  "file belongs to another run or is damaged: delete it and rerun `certssb train`")
        if v.numel() and not bool((torch.isfinite(v) & (v > 0)).all()):
            raise CheckpointError(f"{path}: sigma of split {split!r} holds values that are not finite and > 0; "
                                  "the file is damaged: delete it and rerun `certssb train`")
    return sig


class RunDir:
    """A trained run directory, opened for reading: `RunDir.open(path, overrides)`.

    `config` is the run's RunConfig with the overrides applied and `out` set to the
    directory (not yet resolved: `config.resolve()` fills the dataset defaults);
    `saved` is the parsed config.json. Nothing is written. The pipeline, which holds
    the config already, wraps its output folder as `RunDir(out, cfg)`.
    """

    def __init__(self, path: str | os.PathLike, config: RunConfig, saved: Optional[dict] = None) -> None:
        self.path, self.config, self.saved = Path(path), config, saved if saved is not None else {}

    @classmethod
    def open(cls, path: str | os.PathLike, overrides: Optional[dict] = None) -> "RunDir":
        """Open a run directory written by `certssb train` / `run`; overrides: config fields to
        replace (None values are ignored). Refuses a missing config.json and another run format."""
        path = Path(path)
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise CertssbError(f"{cfg_path} not found: --out must be a run directory written by "
                               "`certssb train` or `certssb run`")
        saved = check_compatible(path)  # another run format or a newer certssb: refused
        cfg = RunConfig.from_dict(saved["config"])
        for key, value in (overrides or {}).items():
            if value is not None:
                setattr(cfg, key, value)
        cfg.out = str(path)
        return cls(path, cfg, saved)

    def sigma(self, sizes: dict[str, Optional[int]]) -> dict[str, torch.Tensor]:
        """The run's Cert-SSB sigma vectors, verified (`load_sigma`)."""
        return load_sigma(self.path / "sigma.safetensors", sizes)

    def no_defense(self) -> dict:
        """The no-defense baseline's metrics."""
        path = self.path / "no_defense.json"
        if not path.exists():
            raise CertssbError(f"{self.path} has no trained run (no_defense.json missing); run `certssb train` first")
        return read_json(path)["metrics"]

    def ensemble(self, method: str):
        """The method's EnsembleDir, its spec read from the manifest (no dataset needed), checked
        against this run's config (method, M, seed)."""
        folder = self.path / "models" / method
        path = folder / "manifest.json"
        if not path.is_file():
            raise CheckpointError(f"{self.path} has no trained {method} models ({path} missing); run "
                                  f"`certssb train --method {method}` first or pick another --method")
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
        cfg = self.config.resolve()
        if spec.method != method or spec.models != cfg.models or spec.seed != cfg.seed:
            raise CheckpointError(f"{path} does not belong to this run's config (method {spec.method}, "
                                  f"{spec.models} models, seed {spec.seed}); rerun `certssb train`")
        return EnsembleDir(folder, spec)

    def base_model(self, arch: str, in_channels: int, num_classes: int, image_size: tuple[int, int]):
        """(the base model of the sigma search, loaded; the sha256 of its file)."""
        path = self.path / "models" / "base.safetensors"
        state = load_tensors(path)
        model = build_model(arch, in_channels, num_classes, image_size)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"{path} does not fit the {arch} architecture: {e}") from None
        return model, sha256_file(path)

    def trigger_norm(self) -> float:
        """The poison budget's trigger norm (`certssb.attacks.training_trigger_norm`), the measured one read from the
        run's summary.json (the nominal delta when the run has none yet)."""
        cfg = self.config.resolve()
        measured = None
        if (self.path / "summary.json").is_file():
            try:
                measured = float(read_json(self.path / "summary.json")["attack"]["trigger_l2"]["max"])
            except (CheckpointError, KeyError, TypeError, ValueError):
                pass
        return training_trigger_norm(cfg.trigger or "", cfg.delta, measured)


__all__ = ["RUN_FORMAT", "RunDir", "package_version", "check_compatible", "load_sigma"]
