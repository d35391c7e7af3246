"""The ensemble of smoothed models (docs/ARCHITECTURE.md sections 5 and 7): train in groups, checkpoint, resume, load.

Model k trains on {(x_i + sigma_i * eps_train(k, i), y_i)}: the noise of sample
i for model k is fixed for all epochs (RAB's semantics). Models differ only in
their noise draws and init seeds; all share the mini-batch order. RAB and
Cert-SSB models with the same k share init seed and eps, and differ only in
sigma, so the comparison isolates the noise levels.

Training runs in groups of G consecutive models (group g: models
[g*G, min((g+1)*G, M))), each trained at once as one
`certssb.models.grouped.GroupedModel` (`certssb.smoothing.training.train_group`). G is
`--group-size`, else chosen from free memory (`choose_group_size`) and then
recorded: a resumed or sharded run reuses the recorded G, so the partition
and every model's arithmetic depend only on the run config.

On disk (`<run>/models/<method>/`): one safetensors file per model (loads into
`certssb.models.build_model`), `groups/group-NNNNN.json` per finished group
(its models' files and sha256: the group's commit record, written atomically
after the model files) and `manifest.json` (the run's header, the group size
and the index of finished models). A rerun verifies every listed file against
its checksum and retrains each group with a missing, truncated or altered
file; a killed run therefore resumes with the same command. Under torchrun
each rank trains and writes only its own groups (`certssb.core.distributed.shard`).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.distributed import Dist, shard
from ..errors import CheckpointError, CertssbError
from ..core.files import atomic_write_json, load_tensors, read_json, safe_child, save_tensors
from ..models import build_model
from .noise import check_noise_inputs
from ..core.seeding import derive_seed
from .engine import Engine
from .pretrained import PretrainedInit
from .training import GroupNoise, Schedule, train_group
from ..models.grouped import GroupedModel, activation_floats, from_states

MANIFEST_FORMAT = 2
# Largest automatic group on a CPU: beyond this, larger groups only cost memory.
CPU_GROUP_CAP = 32
# Largest automatic group on a GPU.
GPU_GROUP_CAP = 1024
# Share of free memory a group may plan to use.
MEMORY_SHARE = {"cpu": 0.5, "cuda": 0.7}
# The fixed noisy training set of a group is drawn once and kept (CPU only) when it
# takes at most this share of free memory; otherwise it is redrawn per batch.
NOISE_CACHE_SHARE = 0.25


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
    group_size: Optional[int] = None  # None: recorded in the manifest, else chosen from free memory
    engine: Engine = Engine()  # how groups compute (certssb.smoothing.engine); recorded in the manifest
    # --init-weights: every model starts from this backbone (its sha256 is in `fingerprint`)
    init: Optional[PretrainedInit] = field(default=None, compare=False)

    def new_model(self, k: int) -> nn.Module:
        """Model k with its own deterministic initialisation (shared across methods); with `init`,
        the pretrained backbone over it (the head keeps model k's own seeded init)."""
        torch.manual_seed(derive_seed(self.seed, "init", k))
        model = build_model(self.arch, self.in_channels, self.num_classes, self.image_size)
        return model if self.init is None else self.init.apply(model)

    def manifest_header(self) -> dict:
        header = {"format": MANIFEST_FORMAT, "method": self.method, "arch": self.arch,
                  "in_channels": self.in_channels, "num_classes": self.num_classes,
                  "image_size": list(self.image_size), "models": self.models,
                  "schedule": self.schedule.as_dict(), "seed": self.seed,
                  "fingerprint": self.fingerprint}
        if not self.engine.is_default:  # fp32 manifests stay as they were
            header["engine"] = self.engine.name
        return header


def model_file(k: int) -> str:
    return f"model-{k:05d}.safetensors"


def group_ranges(models: int, group_size: int) -> list[range]:
    """The partition of models 0..M-1 into consecutive groups of `group_size` (the last may be smaller)."""
    if group_size < 1:
        raise CertssbError(f"--group-size must be >= 1, got {group_size}")
    return [range(s, min(s + group_size, models)) for s in range(0, models, group_size)]


# Keys of the manifest header that must match for checkpoints to be reused.
_HEADER_KEYS = ("format", "method", "arch", "in_channels", "num_classes", "image_size", "schedule", "seed",
                "fingerprint")


class EnsembleDir:
    """The folder of one method's models, their group records and the manifest."""

    def __init__(self, path: str | Path, spec: EnsembleSpec):
        self.path = Path(path)
        self.spec = spec
        self.manifest_path = self.path / "manifest.json"

    # ------------------------------------------------------------------ manifest and records
    def _check_header(self, saved: dict, where: Path) -> None:
        header = self.spec.manifest_header()
        for key in _HEADER_KEYS:
            if saved.get(key) != header.get(key):
                raise CheckpointError(
                    f"{where} was written for a different run ({key}: {saved.get(key)!r} != "
                    f"{header.get(key)!r}); use a new --out directory or delete {self.path} to retrain")

    def _load_manifest(self) -> dict:
        if not self.manifest_path.exists():
            return {**self.spec.manifest_header(), "group_size": None, "finished": {}}
        manifest = read_json(self.manifest_path)
        if not isinstance(manifest, dict):
            raise CheckpointError(f"{self.manifest_path} is not a manifest (not a JSON object); delete it "
                                  "and rerun")
        self._check_header(manifest, self.manifest_path)
        manifest["models"] = self.spec.models
        finished = manifest.setdefault("finished", {})
        if not isinstance(finished, dict):
            raise CheckpointError(f"{self.manifest_path}: 'finished' is not an object; delete it and rerun")
        for k, entry in finished.items():  # never followed, but a path out of the folder means tampering
            if isinstance(entry, dict) and "file" in entry:
                safe_child(self.path, entry["file"], source=self.manifest_path)
        return manifest

    def recorded_group_size(self) -> Optional[int]:
        """The group size this folder's models were trained with, if any were."""
        if not self.manifest_path.exists():
            return None
        g = self._load_manifest().get("group_size")
        return int(g) if g is not None else None

    def _record_path(self, g: int) -> Path:
        return self.path / "groups" / f"group-{g:05d}.json"

    def _read_record(self, g: int, ks: range, group_size: int) -> Optional[dict]:
        """Group g's record if it exists and belongs to this run and partition, else None."""
        path = self._record_path(g)
        if not path.exists():
            return None
        try:
            rec = read_json(path)
        except CheckpointError:
            return None  # unreadable record: the group is retrained
        if not isinstance(rec, dict) or not isinstance(rec.get("header", {}), dict):
            return None  # not a record: the group is retrained
        try:
            self._check_header(rec.get("header", {}), path)
        except CheckpointError:
            return None
        if rec.get("group_size") != group_size or rec.get("models") != [ks.start, ks.stop]:
            return None
        return rec

    def _model_path(self, k: int, entry: object, source: Path) -> Path:
        """The file of model k named by a record or manifest entry, refused (CheckpointError) unless
        it is this folder's model_file(k): no absolute path, no '..', no symlink out of the folder."""
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise CheckpointError(f"{source}: the entry of model {k} is malformed ({entry!r}); delete "
                                  f"{source} and rerun to retrain its models")
        name = entry.get("file", model_file(k))
        path = safe_child(self.path, name, source=source)
        if name != model_file(k):
            raise CheckpointError(f"{source} names {name!r} for model {k}, expected {model_file(k)!r}; the "
                                  f"run directory was altered: delete {source} and rerun")
        return path

    def _valid_models(self, rec: Optional[dict], ks: range, verify: bool) -> dict[int, str]:
        """{k: sha256} of the group's models whose files exist and (verify) match their checksum.

        A record naming a file outside this folder raises CheckpointError (never followed)."""
        if rec is None:
            return {}
        out = {}
        files = rec.get("files", {})
        source = self._record_path(rec.get("group", -1)) if isinstance(rec.get("group"), int) else self.path
        if not isinstance(files, dict):
            raise CheckpointError(f"{source}: 'files' is not an object; delete {source} and rerun")
        for k in ks:
            entry = files.get(str(k))
            if entry is None:
                continue
            path = self._model_path(k, entry, source)
            if verify:
                try:
                    load_tensors(path, expected_sha256=entry["sha256"])
                except CheckpointError:
                    continue  # damaged or missing: the group is retrained
            elif not path.is_file():
                continue
            out[k] = entry["sha256"]
        return out

    def finished(self, verify: bool = True) -> dict[int, str]:
        """{k: sha256} of the models whose files exist and match their recorded checksum."""
        g_size = self.recorded_group_size()
        if g_size is None:
            return {}
        out: dict[int, str] = {}
        for g, ks in enumerate(group_ranges(self.spec.models, g_size)):
            out.update(self._valid_models(self._read_record(g, ks, g_size), ks, verify))
        return out

    def _write_manifest(self, group_size: int, extra: Optional[dict] = None) -> None:
        """manifest.json: header, group size and the index of finished models (from the records)."""
        finished = {}
        for g, ks in enumerate(group_ranges(self.spec.models, group_size)):
            rec = self._read_record(g, ks, group_size)
            if rec is not None:
                for k, entry in rec["files"].items():
                    finished[k] = {**entry, "group": g}
        atomic_write_json(self.manifest_path, {**self.spec.manifest_header(), "group_size": group_size,
                                               **(extra or {}), "finished": finished})

    # ------------------------------------------------------------------ training
    def resolve_group_size(self, x: torch.Tensor, device: torch.device, dist: Optional[Dist] = None) -> int:
        """The group size to train with: --group-size, else the recorded one, else from free memory.

        Under torchrun rank 0 decides and every rank takes its value, so all
        ranks use one partition. A size that differs from the one recorded in
        this folder is refused: the models already trained would not be the
        ones this partition gives.
        """
        recorded = self.recorded_group_size()
        requested = self.spec.group_size
        if dist is None or dist.is_main:
            if requested is not None:
                size = requested
            elif recorded is not None:
                size = recorded
            else:
                size = choose_group_size(self.spec, x, device)
            size = max(1, min(int(size), self.spec.models))
        else:
            size = 0
        if dist is not None:
            size = dist.broadcast_int(size)
        if recorded is not None and recorded != size:
            raise CheckpointError(
                f"{self.path} was trained with --group-size {recorded}, not {size}; rerun with "
                f"--group-size {recorded} (or without it) to resume, or use a new --out directory")
        return size

    def train(self, x: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor, *,
              device: torch.device | str = "cpu", progress: bool = True,
              dist: Optional[Dist] = None) -> dict:
        """Train the groups (of this rank) not yet finished.

        Returns {"trained": models (re)written, "reused": models kept, "groups_trained",
        "group_size", "seconds"}; counts are this rank's.
        """
        spec = self.spec
        device = torch.device(device)
        if not isinstance(sigma, torch.Tensor) or sigma.shape != (x.shape[0],):
            got = list(sigma.shape) if isinstance(sigma, torch.Tensor) else type(sigma).__name__
            raise CertssbError(f"sigma must have shape [{x.shape[0]}], got {got}")
        check_noise_inputs(x, sigma)  # finite images, finite sigma > 0
        self.path.mkdir(parents=True, exist_ok=True)
        manifest = self._load_manifest()  # refuses a folder of another run
        trained_with = manifest.get("engine")  # None: fp32, the default (manifests before engines)
        if manifest.get("finished") and trained_with != spec.manifest_header().get("engine"):
            # the M models must be draws of one training procedure (docs/THEORY.md section 7.2)
            raise CheckpointError(
                f"{self.path} holds models trained with engine {trained_with or 'fp32'}, not "
                f"{spec.engine.name}; rerun with --engine {trained_with or 'fp32'} to resume, or use a new --out")
        g_size = self.resolve_group_size(x, device, dist)
        ranges = group_ranges(spec.models, g_size)
        mine = shard(list(enumerate(ranges)), dist)
        # every rank records the header and group size (its run folder may be on its own machine)
        self._write_manifest(g_size)
        todo, valid = [], {}
        for g, ks in mine:
            ok = self._valid_models(self._read_record(g, ks, g_size), ks, verify=True)
            valid.update(ok)
            if len(ok) < len(ks):
                todo.append((g, ks))
        cache = device.type == "cpu" and GroupNoise.nbytes(x, g_size) <= NOISE_CACHE_SHARE * free_bytes(device)
        t0 = time.perf_counter()
        written = 0
        bar = tqdm(total=sum(len(ks) for _, ks in todo) * spec.schedule.epochs,
                   desc=f"train {spec.method} models", unit="model-epoch", disable=not progress, leave=False)
        for g, ks in todo:
            t_group = time.perf_counter()
            group = GroupedModel([spec.new_model(k) for k in ks])
            train_group(group, x, y, sigma, models=ks, schedule=spec.schedule, seed=spec.seed,
                        device=device, cache_noise=cache, progress=_Scaled(bar, len(ks)), engine=spec.engine)
            files = {}
            for k, state in zip(ks, group.state_dicts()):
                path = self.path / model_file(k)
                if k in valid:  # intact: retraining gave the same weights, keep the file
                    files[str(k)] = {"file": model_file(k), "sha256": valid[k]}
                    continue
                sha = save_tensors(path, state, metadata={"certssb": "model", "method": spec.method,
                                                          "k": str(k), "group": str(g)})
                files[str(k)] = {"file": model_file(k), "sha256": sha}
                written += 1
            # the commit point: written after every model file of the group
            atomic_write_json(self._record_path(g), {
                "header": spec.manifest_header(), "group": g, "group_size": g_size,
                "models": [ks.start, ks.stop], "files": files,
                "seconds": round(time.perf_counter() - t_group, 3), "device": str(device),
                "engine": spec.engine.as_dict()})
            if dist is None or not dist.enabled:
                self._write_manifest(g_size)
        bar.close()
        if dist is not None and dist.enabled:
            dist.barrier()
            if dist.is_main:
                self._write_manifest(g_size)
        mine_models = sum(len(ks) for _, ks in mine)
        return {"trained": written, "reused": mine_models - written, "groups_trained": len(todo),
                "group_size": g_size, "seconds": time.perf_counter() - t0}

    # ------------------------------------------------------------------ loading
    def load(self, k: int, sha256: str | None = None, device: torch.device | str = "cpu") -> nn.Module:
        """Model k (a plain `build_model` module) in eval mode, verified against its recorded checksum."""
        if sha256 is None:
            sha256 = self.finished(verify=False).get(k)
            if sha256 is None:
                raise CheckpointError(f"model {k} of {self.spec.method} is not finished in {self.path}; "
                                      f"run `certssb train` (or `run`) first")
        state = self._load_state(k, sha256)
        model = self.spec.new_model(k)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"{self.path / model_file(k)} does not fit the {self.spec.arch} "
                                  f"architecture: {e}") from None
        return model.to(device).eval()

    def _load_state(self, k: int, sha256: str) -> dict[str, torch.Tensor]:
        path = safe_child(self.path, model_file(k), source=self.path)  # a symlink out of the folder is refused
        return load_tensors(path, expected_sha256=sha256)

    def iter_models(self, device: torch.device | str = "cpu") -> Iterator[tuple[int, nn.Module]]:
        """All M models in index order, one at a time; fails if any is missing."""
        done = self._require_all()
        for k in range(self.spec.models):
            yield k, self.load(k, done[k], device=device)

    def _require_all(self, ks: Optional[Sequence[int]] = None) -> dict[int, str]:
        done = self.finished(verify=False)
        wanted = range(self.spec.models) if ks is None else ks
        missing = [k for k in wanted if k not in done]
        if missing:
            raise CheckpointError(f"{len(missing)} of {self.spec.models} {self.spec.method} models are "
                                  f"missing in {self.path} (first: {missing[0]}); rerun training")
        return done

    def group_ranges(self) -> list[range]:
        """The recorded partition into groups (for certification and sharding)."""
        g_size = self.recorded_group_size()
        if g_size is None:
            raise CheckpointError(f"{self.path} has no trained {self.spec.method} models; run "
                                  f"`certssb train` (or `run`) first")
        return group_ranges(self.spec.models, g_size)

    def iter_groups(self, device: torch.device | str = "cpu",
                    dist: Optional[Dist] = None) -> Iterator[tuple[list[int], GroupedModel]]:
        """(model indices, GroupedModel in eval mode on `device`) for each group (of this rank).

        Every model file is read once and verified against its checksum.
        """
        ranges = shard(self.group_ranges(), dist)
        done = self._require_all([k for ks in ranges for k in ks])
        spec = self.spec
        for ks in ranges:
            states = [self._load_state(k, done[k]) for k in ks]
            try:
                group = from_states(spec.arch, spec.in_channels, spec.num_classes, spec.image_size, states)
            except RuntimeError as e:
                raise CheckpointError(f"a model file in {self.path} does not fit the {spec.arch} "
                                      f"architecture: {e}") from None
            yield list(ks), group.to(device=device, memory_format=torch.channels_last).eval()


class _Scaled:
    """A tqdm-like counter that advances `bar` by `n` per update (a group epoch = n model-epochs)."""

    def __init__(self, bar, n: int):
        self.bar, self.n = bar, n

    def update(self, k: int = 1) -> None:
        self.bar.update(k * self.n)


def free_bytes(device: torch.device) -> int:
    """Free memory of the device: CUDA's mem_get_info, else MemAvailable of /proc/meminfo."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def model_memory(spec: EnsembleSpec, sample_shape: Sequence[int], batch_size: int) -> int:
    """Estimated bytes one model of a group needs in training (float32).

    Parameters, gradients and Adam's two moments (4 x params), the activations
    of a mini-batch measured by one forward pass (x3: saved for backward, their
    gradients, workspace) and the noisy inputs.
    """
    model = build_model(spec.arch, spec.in_channels, spec.num_classes, spec.image_size)
    params = sum(p.numel() for p in model.parameters())
    per_sample = activation_floats(model, sample_shape)
    d = int(torch.tensor(list(sample_shape)).prod())
    act = spec.engine.activation_bytes  # bf16 activations take half
    return 4 * 4 * params + batch_size * (act * 3 * per_sample + 4 * 2 * d)


def choose_group_size(spec: EnsembleSpec, x: torch.Tensor, device: torch.device) -> int:
    """The largest group that fits MEMORY_SHARE of the device's free memory, capped (CPU 32, GPU 1024)."""
    device = torch.device(device)
    per_model = model_memory(spec, tuple(x.shape[1:]), spec.schedule.batch_size)
    budget = MEMORY_SHARE.get(device.type, 0.5) * free_bytes(device)
    cap = GPU_GROUP_CAP if device.type == "cuda" else CPU_GROUP_CAP
    return int(max(1, min(cap, spec.models, budget // max(per_model, 1))))


# --------------------------------------------------------------------------- user-supplied weights
_STATE_KEYS = ("state_dict", "model_state_dict", "model")


def load_user_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a file a user was given, read without running any code from it.

    Accepted: safetensors (read by `certssb.core.files.load_tensors`), or a torch zip file
    (`torch.save(model.state_dict(), path)`, torch >= 1.6) read with
    ``torch.load(weights_only=True)``: only tensors, containers and plain values can be
    rebuilt, so a pickle that would import os.system, eval or a model class is refused
    before anything runs. A dict holding the state dict under "state_dict",
    "model_state_dict" or "model" is unwrapped. Everything else (a plain pickle, a
    legacy non-zip torch file, a whole pickled nn.Module, an archive of anything
    but a flat {name: tensor} mapping) raises CheckpointError saying how to convert it.

    Returns {parameter name: CPU tensor}. Example::

        state = load_user_weights("mnist-model-0.safetensors")
        model = build_model("mnist-cnn", 1, 10, (28, 28)); model.load_state_dict(state)
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file; pass a .safetensors or torch "
                              "state-dict file")
    with open(path, "rb") as f:
        head = f.read(16)
    convert = ("save the weights as safetensors (safetensors.torch.save_file(model.state_dict(), "
               "'w.safetensors')) or as a torch state dict (torch.save(model.state_dict(), 'w.pt'))")
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: u64 header size, then a JSON header
        return load_tensors(path)
    if not head.startswith(b"PK\x03\x04"):
        raise CheckpointError(f"{path} is neither a safetensors file nor a torch zip file (a plain pickle or "
                              f"a legacy torch file could run code when read, so it is refused): {convert}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError (a forbidden global), RuntimeError (a damaged archive), ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} was refused by torch.load(weights_only=True): {first[:300]}. Only "
                              f"tensors can be loaded from a file you were given: {convert}") from None
    if isinstance(obj, dict):
        for key in _STATE_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if (not isinstance(obj, dict) or not obj
            or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())):
        raise CheckpointError(f"{path} does not hold a state dict ({{name: tensor}}, got "
                              f"{type(obj).__name__}): {convert}")
    return {k: v.detach().cpu() for k, v in obj.items()}


def load_user_model(path: str | os.PathLike, arch: str, in_channels: int, num_classes: int,
                    image_size: tuple[int, int]) -> nn.Module:
    """`build_model(arch, ...)` with weights from `load_user_weights(path)`, in eval mode.

    CheckpointError if the file is refused or its tensors do not fit the architecture.
    Example::

        models = [load_user_model(p, "mnist-cnn", 1, 2, (28, 28)) for p in paths]
        cert = certssb.certify_models(models, x, 0.25, num_classes=2)
    """
    model = build_model(arch, in_channels, num_classes, image_size)
    try:
        model.load_state_dict(load_user_weights(path))
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit the {arch} architecture: {str(e)[:500]}") from None
    return model.eval()


__all__ = ["EnsembleSpec", "EnsembleDir", "model_file", "group_ranges", "choose_group_size", "model_memory",
           "load_user_weights", "load_user_model"]
