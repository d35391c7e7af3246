"""Untrusted and damaged files: nothing a user may receive is unpickled, paths named
inside a run directory cannot leave it, and truncated or altered files are never used.

A malicious pickle whose __reduce__ runs `os.system("touch MARKER")` is planted where a checkpoint, a
sigma file, a region store, a CIFAR-10 batch and a user weights file should be: each is refused with a
clear error and MARKER never appears. Then every truncation and every single-byte change of a
checkpoint, a sigma file and a region store is tried: each is refused (or, where a byte does not
change the content, loads the same tensors).
"""
from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from certssb.runner import rundir
from certssb.runner.rundir import RUN_FORMAT
from certssb import RegionStore, RunConfig, load_task
from certssb.cli import main
from certssb.smoothing.ensemble import EnsembleDir, EnsembleSpec, load_user_model, load_user_weights, model_file
from certssb.errors import CheckpointError, DataError
from certssb.core.files import CHECKSUM_KEY, atomic_write_json, load_tensors, save_tensors, sha256_bytes
from certssb.smoothing.training import Schedule


class Evil:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def marker(tmp_path) -> Path:
    # the payload is real: a plain unpickler runs it
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Evil(probe)))
    assert probe.exists()
    m = tmp_path / "MARKER"
    yield m
    assert not m.exists(), "a malicious pickle was executed"


def _spec(models: int = 2) -> EnsembleSpec:
    return EnsembleSpec(method="rab", arch="digits-cnn", in_channels=1, num_classes=2, image_size=(8, 8),
                        models=models, schedule=Schedule(epochs=1, batch_size=8, lr=1e-3), seed=0,
                        fingerprint="fp", group_size=models)


def _forge_ensemble(root: Path, files: dict[int, tuple[str, bytes | None]], models: int = 2) -> EnsembleDir:
    """An ensemble folder as an attacker would make it: model files, a group record and a manifest
    whose sha256 entries match the planted bytes. files: {k: (name in the record, bytes or None)}."""
    spec = _spec(models)
    ens = EnsembleDir(root / "models" / "rab", spec)
    ens.path.mkdir(parents=True, exist_ok=True)
    entries = {}
    for k, (name, data) in files.items():
        if data is not None:
            (ens.path / model_file(k)).write_bytes(data)
        entries[str(k)] = {"file": name, "sha256": sha256_bytes(data or b"")}
    header = spec.manifest_header()
    atomic_write_json(ens.path / "groups" / "group-00000.json",
                      {"header": header, "group": 0, "group_size": models, "models": [0, models], "files": entries})
    atomic_write_json(ens.manifest_path, {**header, "group_size": models,
                                          "finished": {k: {**e, "group": 0} for k, e in entries.items()}})
    return ens


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return _spec().new_model(0).state_dict()


# ----------------------------------------------------------------------------- malicious pickles
def test_pickle_as_a_checkpoint_is_refused_even_with_a_matching_checksum(tmp_path, marker):
    evil = pickle.dumps(Evil(marker))
    ens = _forge_ensemble(tmp_path, {0: (model_file(0), evil), 1: (model_file(1), evil)})
    assert set(ens.finished(verify=False)) == {0, 1}  # the forged record vouches for both files
    with pytest.raises(CheckpointError, match="is not a valid safetensors file"):
        ens.load(0)
    with pytest.raises(CheckpointError, match="is not a valid safetensors file"):
        list(ens.iter_groups())
    assert ens.finished(verify=True) == {}  # never trusted: training would rebuild them


def test_pickle_as_a_sigma_file_is_refused(tmp_path, marker, capsys):
    path = tmp_path / "sigma.safetensors"
    path.write_bytes(pickle.dumps(Evil(marker)))
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        rundir.load_sigma(path, {"train": 4})
    with pytest.raises(CheckpointError):
        load_tensors(path)
    # the certify command on a run directory holding it: exit 2, nothing run
    out = _run_dir_with_sigma(tmp_path, path.read_bytes())
    assert main(["certify", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "sigma.safetensors is truncated or not a safetensors file" in err and "Traceback" not in err


def test_pickle_as_a_region_store_is_refused(tmp_path, marker, capsys):
    path = tmp_path / "regions-cert-ssb-clean.safetensors"
    path.write_bytes(pickle.dumps({"centres": Evil(marker)}))
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        RegionStore.load(path)
    out = _run_dir_with_sigma(tmp_path, None)
    assert main(["certify", "--out", str(out), "--regions", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "not a safetensors file" in err and "Traceback" not in err


def test_pickle_as_a_cifar_batch_is_refused(tmp_path, marker):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(d / name, "wb") as f:
            pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}, f, protocol=2)
    assert load_task("cifar10", data_dir=d, classes=[0, 1]).x_train.shape == (10, 3, 32, 32)  # protocol 2 reads
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3], b"x": Evil(marker)}, f)
    with pytest.raises(DataError, match=r"test_batch: refusing to unpickle global (posix|os|nt)\.system"):
        load_task("cifar10", data_dir=d)


@pytest.mark.parametrize("payload,refused", [
    (lambda: {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3], b"f": getattr}, "builtins.getattr"),
    (lambda: {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3], b"m": np.ma.masked_array([1])},
     "numpy.ma.core"),
    (lambda: {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3], b"s": {1, 2}.__class__},
     "builtins.set"),
    (lambda: {b"data": torch.zeros(4, 3072, dtype=torch.uint8), b"labels": [0, 1, 2, 3]}, "torch"),
], ids=["getattr", "numpy-subclass", "a-class", "torch-tensor"])
def test_cifar_unpickler_allows_numpy_arrays_and_plain_values_only(tmp_path, payload, refused):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(d / name, "wb") as f:
            pickle.dump(payload() if name == "data_batch_1" else
                        {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}, f)
    with pytest.raises(DataError, match=f"refusing to unpickle global {refused}"):
        load_task("cifar10", data_dir=d)


def test_cifar_unpickler_refuses_codecs_beyond_latin1(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    bad = (b"\x80\x02}q\x00(C\x04dataq\x01c_codecs\nencode\nq\x02X\x03\x00\x00\x00abcq\x03X\x06\x00\x00\x00base64"
           b"q\x04\x86q\x05Rq\x06u.")
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (d / name).write_bytes(bad)
    with pytest.raises(DataError, match="refusing _codecs.encode"):
        load_task("cifar10", data_dir=d)


# ----------------------------------------------------------------------------- user-supplied weights
def test_user_weights_load_only_tensors(tmp_path, marker):
    state = _state()
    # accepted: safetensors, a torch state dict (also nested under "state_dict")
    save_tensors(tmp_path / "w.safetensors", state)
    torch.save(state, tmp_path / "w.pt")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "ckpt.pt")
    for name in ("w.safetensors", "w.pt", "ckpt.pt"):
        loaded = load_user_weights(tmp_path / name)
        assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    model = load_user_model(tmp_path / "w.pt", "digits-cnn", 1, 2, (8, 8))
    assert not model.training and torch.equal(model.state_dict()["features.0.weight"], state["features.0.weight"])

    # refused, and nothing runs: a plain pickle, a torch file whose pickle names os.system,
    # a whole pickled module, a file of something else
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Evil(marker)))
    torch.save({"w": torch.zeros(2), "x": Evil(marker)}, tmp_path / "evil.pt")
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    (tmp_path / "text.txt").write_text("hello")
    cases = {"evil.pkl": "neither a safetensors file nor a torch zip file",
             "evil.pt": "refused by torch.load(weights_only=True)",
             "module.pt": "refused by torch.load(weights_only=True)",
             "list.pt": "does not hold a state dict",
             "text.txt": "neither a safetensors file nor a torch zip file",
             "missing.pt": "does not exist"}
    for name, fragment in cases.items():
        with pytest.raises(CheckpointError) as info:
            load_user_weights(tmp_path / name)
        assert fragment in str(info.value), str(info.value)
    with zipfile.ZipFile(tmp_path / "evil.pt") as z:  # the planted file really holds the payload
        assert any(b"system" in z.read(n) for n in z.namelist() if n.endswith(".pkl"))
    with pytest.raises(CheckpointError, match="does not fit the digits-cnn architecture"):
        load_user_model(tmp_path / "w.pt", "digits-cnn", 1, 3, (8, 8))


# ----------------------------------------------------------------------------- paths in a run directory
@pytest.mark.parametrize("name,why", [
    ("../../etc/passwd", "climbs out"),
    ("/etc/passwd", "absolute path"),
    ("sub/../../../x", "climbs out"),
    ("C:\\Windows\\x", "absolute path"),
    ("..", "climbs out"),
    ("model-00001.safetensors", "expected 'model-00000.safetensors'"),
    (7, "not a file name"),
])
def test_record_paths_cannot_leave_the_run_directory(tmp_path, name, why):
    good = save_tensors(tmp_path / "tmp.safetensors", _state()) and (tmp_path / "tmp.safetensors").read_bytes()
    ens = _forge_ensemble(tmp_path, {0: (name, good), 1: (model_file(1), good)})
    for action in (lambda: ens.finished(), lambda: ens.load(0), lambda: list(ens.iter_groups()),
                   lambda: ens.train(torch.rand(8, 1, 8, 8), torch.arange(8) % 2, torch.full((8,), 0.25),
                                     progress=False)):
        with pytest.raises(CheckpointError) as info:
            action()
        msg = str(info.value)  # the manifest's copy of the entry or the group record: whichever is read first
        assert why in msg and ("group-00000.json" in msg or "manifest.json" in msg), msg


def test_manifest_paths_cannot_leave_the_run_directory(tmp_path):
    good = save_tensors(tmp_path / "tmp.safetensors", _state()) and (tmp_path / "tmp.safetensors").read_bytes()
    ens = _forge_ensemble(tmp_path, {0: (model_file(0), good)}, models=1)
    manifest = json.loads(ens.manifest_path.read_text())
    manifest["finished"]["0"]["file"] = "/etc/passwd"
    ens.manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"manifest.json names '/etc/passwd', an absolute path"):
        ens.train(torch.rand(8, 1, 8, 8), torch.arange(8) % 2, torch.full((8,), 0.25), progress=False)


def test_a_model_file_symlinked_out_of_the_run_directory_is_refused(tmp_path):
    outside = tmp_path / "elsewhere" / "weights.safetensors"
    outside.parent.mkdir()
    save_tensors(outside, _state())
    ens = _forge_ensemble(tmp_path / "run", {0: (model_file(0), None)}, models=1)
    (ens.path / model_file(0)).symlink_to(outside)
    rec = ens.path / "groups" / "group-00000.json"
    data = json.loads(rec.read_text())
    data["files"]["0"]["sha256"] = sha256_bytes(outside.read_bytes())  # the checksum even matches
    rec.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="resolves \\(through a symlink\\) to .*elsewhere"):
        ens.load(0)
    # a symlink that stays inside the run directory is fine
    inside = ens.path / "real.safetensors"
    inside.write_bytes(outside.read_bytes())
    (ens.path / model_file(0)).unlink()
    (ens.path / model_file(0)).symlink_to(inside)
    assert isinstance(ens.load(0), nn.Module)


# ----------------------------------------------------------------------------- damaged files are never used
def _kinds(tmp_path: Path) -> dict[str, tuple[Path, object]]:
    """{kind: (file, load)} for a checkpoint (verified against its recorded sha256, as the ensemble does),
    a sigma file and a region store (verified by their embedded checksum)."""
    ckpt = tmp_path / "model.safetensors"
    torch.manual_seed(0)
    sha = save_tensors(ckpt, nn.Linear(6, 2).state_dict())
    sig = tmp_path / "sigma.safetensors"
    save_tensors(sig, {"train": torch.rand(6) + 0.1, "clean": torch.rand(3) + 0.1, "triggered": torch.rand(2) + 0.1})
    store = RegionStore(4)
    for i in range(3):
        store.update(torch.full((4,), float(i)), i % 2, 0.5)
    reg = tmp_path / "regions.safetensors"
    store.save(reg)
    return {"checkpoint": (ckpt, lambda p: load_tensors(p, expected_sha256=sha)),
            "sigma": (sig, lambda p: rundir.load_sigma(p, {"train": 6, "clean": 3, "triggered": 2})),
            "regions": (reg, lambda p: RegionStore.load(p))}


def _content(obj) -> dict[str, torch.Tensor]:
    if isinstance(obj, RegionStore):
        return {"c": obj.centres, "l": obj.labels, "r": obj.radii, "q": obj.queries}
    return obj


@pytest.mark.parametrize("kind", ["checkpoint", "sigma", "regions"])
def test_every_truncation_and_byte_change_is_detected(tmp_path, kind):
    path, load = _kinds(tmp_path)[kind]
    raw = path.read_bytes()
    reference = _content(load(path))
    refused = same = 0
    for cut in range(len(raw)):  # every truncation
        path.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError):
            load(path)
        refused += 1
    for i in range(len(raw)):  # every position, two different byte changes
        for change in (0x01, 0xFF):
            damaged = bytearray(raw)
            damaged[i] ^= change
            path.write_bytes(bytes(damaged))
            try:
                got = _content(load(path))
            except CheckpointError:
                refused += 1
                continue
            # a change that loads must not change a single tensor
            assert set(got) == set(reference) and all(torch.equal(got[k], reference[k]) for k in got), (kind, i)
            same += 1
    assert refused == 3 * len(raw) - same and same <= 4, (kind, refused, same)
    path.write_bytes(raw)
    load(path)


def test_files_from_before_embedded_checksums_still_load(tmp_path):
    from safetensors.torch import save

    path = tmp_path / "old.safetensors"
    path.write_bytes(save({"train": torch.full((3,), 0.25)}, metadata={"certssb": "sigma"}))
    assert torch.equal(load_tensors(path)["train"], torch.full((3,), 0.25))
    with pytest.raises(CheckpointError, match="carries no content checksum"):
        load_tensors(path, require_checksum=True)
    # a damaged checksum entry (its name changed by one byte) is not mistaken for an old file
    save_tensors(path, {"train": torch.full((3,), 0.25)})
    raw = path.read_bytes()
    path.write_bytes(raw.replace(CHECKSUM_KEY.encode(), CHECKSUM_KEY.replace("sha", "shb").encode()))
    with pytest.raises(CheckpointError, match="checksum entry is damaged"):
        load_tensors(path)


def _run_dir_with_sigma(tmp_path: Path, sigma: bytes | None) -> Path:
    """A run directory that `certssb certify` reaches the sigma stage of: config, no-defense metrics
    and (if given) the bytes of sigma.safetensors; no models."""
    out = tmp_path / "run"
    cfg = RunConfig(method="cert-ssb", models=2, epochs=1, max_train=100, max_test=20, out=str(out))
    atomic_write_json(out / "config.json", {"format": RUN_FORMAT, "certssb": "0.0.1", "config": cfg.to_dict()})
    atomic_write_json(out / "no_defense.json", {"fingerprint": "x", "metrics": {}})
    if sigma is not None:
        (out / "sigma.safetensors").write_bytes(sigma)
    return out


def test_a_damaged_sigma_file_is_never_used_by_certify(tmp_path, capsys):
    good = tmp_path / "good.safetensors"
    save_tensors(good, {"train": torch.full((100,), 0.25), "clean": torch.full((20,), 0.25),
                        "triggered": torch.full((18,), 0.25)})
    raw = bytearray(good.read_bytes())
    raw[-3] ^= 0x04  # one bit of one sigma value
    out = _run_dir_with_sigma(tmp_path, bytes(raw))
    assert main(["certify", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "sigma.safetensors does not match its embedded checksum" in err and "Traceback" not in err
    assert not (out / "summary.json").exists()
