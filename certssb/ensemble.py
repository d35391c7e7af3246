"""The ensemble of smoothed models (DESIGN.md 1.4): train, checkpoint, resume, load.

Model k trains on {(x_i + sigma_i * eps_train(k, i), y_i)}: the noise of sample
i for model k is fixed for all epochs (RAB's semantics). Models differ only in
their noise draws and init seeds; all share the mini-batch order. RAB and
Cert-SSB models with the same k share init seed and eps, and differ only in
sigma, so the comparison isolates the noise levels.

On disk (`<run>/models/<method>/`): one safetensors file per model and
`manifest.json` listing the finished ones with their sha256. A rerun verifies
each listed file and trains only what is missing or damaged.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import CheckpointError, CertssbError
from .fileio import atomic_write_json, load_tensors, read_json, save_tensors
from .models import build_model
from .noise import Stream, normal
from .seeding import derive_seed
from .training import Schedule, train_classifier

MANIFEST_FORMAT = 1
# Above this many noise elements per model, noise is regenerated per batch instead
# of being generated once per model (same values either way).
NOISE_CACHE_ELEMENTS = 64 * 1024 * 1024


@dataclass(frozen=True)
class EnsembleSpec:
    """What defines the models of one method; its fingerprint guards resume."""

    method: str
    arch: str
    in_channels: int
    num_classes: int
    image_size: tuple[int, int]
    models: int
    schedule: Schedule
    seed: int
    fingerprint: str  # hash of everything upstream (data, attack, sigma) that the models depend on

    def new_model(self, k: int) -> nn.Module:
        """Model k with its own deterministic initialisation (shared across methods)."""
        torch.manual_seed(derive_seed(self.seed, "init", k))
        return build_model(self.arch, self.in_channels, self.num_classes, self.image_size)

    def manifest_header(self) -> dict:
        return {"format": MANIFEST_FORMAT, "method": self.method, "arch": self.arch,
                "in_channels": self.in_channels, "num_classes": self.num_classes,
                "image_size": list(self.image_size), "models": self.models,
                "schedule": self.schedule.as_dict(), "seed": self.seed,
                "fingerprint": self.fingerprint}


def model_file(k: int) -> str:
    return f"model-{k:05d}.safetensors"


class EnsembleDir:
    """The folder of one method's models and its manifest."""

    def __init__(self, path: str | Path, spec: EnsembleSpec):
        self.path = Path(path)
        self.spec = spec
        self.manifest_path = self.path / "manifest.json"

    def _load_manifest(self) -> dict:
        if not self.manifest_path.exists():
            return {**self.spec.manifest_header(), "finished": {}}
        manifest = read_json(self.manifest_path)
        header = self.spec.manifest_header()
        for key in ("format", "method", "arch", "num_classes", "schedule", "seed", "fingerprint"):
            if manifest.get(key) != header[key]:
                raise CheckpointError(
                    f"{self.manifest_path} was written for a different run ({key}: "
                    f"{manifest.get(key)!r} != {header[key]!r}); use a new --out directory "
                    f"or delete {self.path} to retrain")
        manifest["models"] = header["models"]
        return manifest

    def finished(self, verify: bool = True) -> dict[int, str]:
        """{k: sha256} of the models whose files exist and match their checksum."""
        out = {}
        for key, entry in self._load_manifest()["finished"].items():
            k = int(key)
            path = self.path / model_file(k)
            if verify:
                try:
                    load_tensors(path, expected_sha256=entry["sha256"])
                except CheckpointError:
                    continue  # damaged or missing: retrain it
            out[k] = entry["sha256"]
        return out

    def _record(self, manifest: dict, k: int, sha: str, seconds: float) -> None:
        manifest["finished"][str(k)] = {"file": model_file(k), "sha256": sha, "seconds": round(seconds, 3)}
        atomic_write_json(self.manifest_path, manifest)

    def train(self, x: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor, *,
              device: torch.device | str = "cpu", progress: bool = True) -> dict:
        """Train the models not yet finished. Returns {"trained", "reused", "seconds"}."""
        spec = self.spec
        if sigma.shape != (x.shape[0],):
            raise CertssbError(f"sigma must have shape [{x.shape[0]}], got {list(sigma.shape)}")
        self.path.mkdir(parents=True, exist_ok=True)
        manifest = self._load_manifest()
        done = self.finished()
        manifest["finished"] = {str(k): manifest["finished"][str(k)] for k in done}
        todo = [k for k in range(spec.models) if k not in done]
        t0 = time.perf_counter()
        bar = tqdm(total=len(todo) * spec.schedule.epochs, desc=f"train {spec.method} models",
                   unit="epoch", disable=not progress, leave=False)
        for k in todo:
            t_model = time.perf_counter()
            model = spec.new_model(k)
            noise_fn = _fixed_noise(x, sigma, seed=spec.seed, k=k, device=device)
            train_classifier(model, x, y, schedule=spec.schedule, seed=spec.seed,
                             noise_fn=noise_fn, device=device, progress=bar)
            sha = save_tensors(self.path / model_file(k), _state(model),
                               metadata={"certssb": "model", "method": spec.method, "k": str(k)})
            self._record(manifest, k, sha, time.perf_counter() - t_model)
        bar.close()
        return {"trained": len(todo), "reused": len(done), "seconds": time.perf_counter() - t0}

    def load(self, k: int, sha256: str | None = None, device: torch.device | str = "cpu") -> nn.Module:
        """Model k in eval mode, verified against its recorded checksum."""
        if sha256 is None:
            entry = self._load_manifest()["finished"].get(str(k))
            if entry is None:
                raise CheckpointError(f"model {k} of {self.spec.method} is not finished in {self.path}; "
                                      f"run `certssb train` (or `run`) first")
            sha256 = entry["sha256"]
        state = load_tensors(self.path / model_file(k), expected_sha256=sha256)
        model = self.spec.new_model(k)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"{self.path / model_file(k)} does not fit the {self.spec.arch} "
                                  f"architecture: {e}") from None
        return model.to(device).eval()

    def iter_models(self, device: torch.device | str = "cpu") -> Iterator[tuple[int, nn.Module]]:
        """All M models in index order; fails if any is missing."""
        done = self.finished(verify=False)
        missing = [k for k in range(self.spec.models) if k not in done]
        if missing:
            raise CheckpointError(f"{len(missing)} of {self.spec.models} {self.spec.method} models are "
                                  f"missing in {self.path} (first: {missing[0]}); rerun training")
        for k in range(self.spec.models):
            yield k, self.load(k, done[k], device=device)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _fixed_noise(x: torch.Tensor, sigma: torch.Tensor, *, seed: int, k: int, device):
    """noise_fn for model k: x_i + sigma_i * eps(TRAIN, k, i), the same every epoch."""
    n = x.shape[0]
    d = x[0].numel()
    shape = x.shape[1:]
    sigma_dev = sigma.to(device)
    if n * d <= NOISE_CACHE_ELEMENTS:
        eps = normal(seed, int(Stream.TRAIN), k, torch.arange(n), d, device=device)  # [N, D]

        def fn(xb, idx, epoch):
            return xb + sigma_dev[idx].view(-1, *[1] * len(shape)) * eps[idx].view(-1, *shape)
    else:
        def fn(xb, idx, epoch):
            e = normal(seed, int(Stream.TRAIN), k, idx, d, device=device)
            return xb + sigma_dev[idx].view(-1, *[1] * len(shape)) * e.view(-1, *shape)
    return fn
