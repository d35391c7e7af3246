"""Ensemble training in groups: checkpoints, group records, resume (also after SIGKILL), damage detection."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from certssb.smoothing import ensemble as ensemble_mod
from certssb.smoothing.ensemble import EnsembleDir, EnsembleSpec, choose_group_size, group_ranges, model_file, model_memory
from certssb.errors import CheckpointError, CertssbError
from certssb.core.files import load_tensors, read_json
from certssb.smoothing.training import Schedule
from certssb.models.grouped import GroupedModel

REPO = Path(__file__).resolve().parents[1]


def _spec(models=3, fingerprint="fp", seed=0, group_size=2):
    return EnsembleSpec(method="rab", arch="digits-cnn", in_channels=1, num_classes=3, image_size=(8, 8),
                        models=models, schedule=Schedule(epochs=2, batch_size=8, lr=1e-3), seed=seed,
                        fingerprint=fingerprint, group_size=group_size)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(24, 1, 8, 8, generator=g), torch.arange(24) % 3


def _sigma(n=24):
    return torch.full((n,), 0.25)


def test_group_partition():
    assert group_ranges(7, 3) == [range(0, 3), range(3, 6), range(6, 7)]
    assert group_ranges(2, 5) == [range(0, 2)]
    with pytest.raises(CertssbError, match="group-size must be >= 1"):
        group_ranges(3, 0)


def test_train_save_resume_and_detect_damage(tmp_path, data):
    x, y = data
    ens = EnsembleDir(tmp_path / "rab", _spec())
    stats = ens.train(x, y, _sigma(), progress=False)
    assert stats["trained"] == 3 and stats["reused"] == 0 and stats["group_size"] == 2
    manifest = read_json(tmp_path / "rab" / "manifest.json")
    assert set(manifest["finished"]) == {"0", "1", "2"} and manifest["group_size"] == 2
    records = sorted(p.name for p in (tmp_path / "rab" / "groups").iterdir())
    assert records == ["group-00000.json", "group-00001.json"]
    first = {k: m.state_dict() for k, m in ens.iter_models()}
    # resume: nothing to do
    assert ens.train(x, y, _sigma(), progress=False)["trained"] == 0
    # truncate model 1: its group (models 0, 1) is retrained, to the same weights, and only
    # the damaged file is rewritten
    path = tmp_path / "rab" / model_file(1)
    mtime0 = (tmp_path / "rab" / model_file(0)).stat().st_mtime_ns
    path.write_bytes(path.read_bytes()[:100])
    assert set(ens.finished()) == {0, 2}
    stats = ens.train(x, y, _sigma(), progress=False)
    assert (stats["trained"], stats["reused"], stats["groups_trained"]) == (1, 2, 1)
    assert (tmp_path / "rab" / model_file(0)).stat().st_mtime_ns == mtime0
    again = dict(ens.iter_models())
    for k in range(3):
        for key in first[k]:
            assert torch.equal(first[k][key], again[k].state_dict()[key])
    # alter a byte of model 2 (same length): detected by its checksum, retrained
    path = tmp_path / "rab" / model_file(2)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    assert set(ens.finished()) == {0, 1}
    with pytest.raises(CheckpointError, match="checksum"):
        ens.load(2)
    assert ens.train(x, y, _sigma(), progress=False)["trained"] == 1
    assert torch.equal(ens.load(2).state_dict()["features.0.weight"], first[2]["features.0.weight"])
    # a damaged group record: the whole group is retrained
    (tmp_path / "rab" / "groups" / "group-00000.json").write_text("{not json")
    assert set(ens.finished()) == {2}
    assert ens.train(x, y, _sigma(), progress=False)["trained"] == 2


def test_groups_load_once_and_match_single_models(tmp_path, data):
    x, y = data
    ens = EnsembleDir(tmp_path / "rab", _spec(models=5, group_size=2))
    ens.train(x, y, _sigma(), progress=False)
    groups = list(ens.iter_groups())
    assert [ks for ks, _ in groups] == [[0, 1], [2, 3], [4]]
    xb = torch.rand(4, 1, 8, 8)
    for ks, group in groups:
        assert isinstance(group, GroupedModel) and not group.training
        out = group(xb.expand(len(ks), *xb.shape))
        for j, k in enumerate(ks):
            assert torch.allclose(out[j], ens.load(k)(xb), atol=1e-5)


def test_group_size_is_recorded_and_a_different_one_is_refused(tmp_path, data):
    x, y = data
    EnsembleDir(tmp_path / "rab", _spec(group_size=2)).train(x, y, _sigma(), progress=False)
    auto = EnsembleDir(tmp_path / "rab", _spec(group_size=None))
    assert auto.recorded_group_size() == 2
    assert auto.train(x, y, _sigma(), progress=False)["trained"] == 0  # resumes with the recorded size
    with pytest.raises(CheckpointError, match="trained with --group-size 2, not 3"):
        EnsembleDir(tmp_path / "rab", _spec(group_size=3)).train(x, y, _sigma(), progress=False)


def test_automatic_group_size_follows_free_memory(monkeypatch, data):
    x, _ = data
    spec = _spec(models=100, group_size=None)
    per_model = model_memory(spec, (1, 8, 8), 8)
    assert per_model > 4 * 4 * sum(p.numel() for p in spec.new_model(0).parameters())
    monkeypatch.setattr(ensemble_mod, "free_bytes", lambda device: int(per_model * 10 / 0.5))
    assert choose_group_size(spec, x, torch.device("cpu")) == 10
    monkeypatch.setattr(ensemble_mod, "free_bytes", lambda device: 1)
    assert choose_group_size(spec, x, torch.device("cpu")) == 1
    monkeypatch.setattr(ensemble_mod, "free_bytes", lambda device: 1 << 50)
    assert choose_group_size(spec, x, torch.device("cpu")) == ensemble_mod.CPU_GROUP_CAP
    assert choose_group_size(_spec(models=3, group_size=None), x, torch.device("cpu")) == 3


def test_models_differ(tmp_path, data):
    x, y = data
    ens = EnsembleDir(tmp_path / "rab", _spec(models=2))
    ens.train(x, y, _sigma(), progress=False)
    m0, m1 = (m for _, m in ens.iter_models())
    assert not torch.equal(m0.features[0].weight, m1.features[0].weight)


def test_manifest_of_another_run_is_refused(tmp_path, data):
    x, y = data
    EnsembleDir(tmp_path / "rab", _spec()).train(x, y, _sigma(), progress=False)
    with pytest.raises(CheckpointError, match="different run.*fingerprint"):
        EnsembleDir(tmp_path / "rab", _spec(fingerprint="other")).train(x, y, _sigma(), progress=False)


def test_missing_models_and_bad_sigma(tmp_path, data):
    x, y = data
    ens = EnsembleDir(tmp_path / "rab", _spec())
    with pytest.raises(CheckpointError, match="3 of 3 rab models are missing"):
        list(ens.iter_models())
    with pytest.raises(CheckpointError, match="no trained rab models"):
        list(ens.iter_groups())
    with pytest.raises(CertssbError, match="sigma must have shape"):
        ens.train(x, y, torch.full((5,), 0.25), progress=False)


def test_a_pickle_in_place_of_a_checkpoint_is_never_executed(tmp_path, data):
    x, y = data
    ens = EnsembleDir(tmp_path / "rab", _spec(models=1))
    ens.train(x, y, _sigma(), progress=False)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle
    (tmp_path / "rab" / model_file(0)).write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError):
        ens.load(0)
    with pytest.raises(CheckpointError):
        list(ens.iter_groups())
    assert not marker.exists()


# ----------------------------------------------------------------------------- SIGKILL and resume
RUN_ARGS = ["--method", "rab", "--models", "8", "--group-size", "2", "--epochs", "6", "--max-train", "300",
            "--max-test", "40", "--bound", "clopper-pearson", "--alpha", "0.2", "--device", "cpu", "--quiet"]


def _cli(out: Path, command: str = "run") -> list[str]:
    return [sys.executable, "-m", "certssb", command, *RUN_ARGS, "--out", str(out)]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # same arithmetic in every run
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_a_run_killed_mid_training_resumes_to_identical_certificates(tmp_path):
    """SIGKILL once a group is finished; the same command then completes to the same certificates."""
    ref = tmp_path / "uninterrupted"
    subprocess.run(_cli(ref), check=True, env=_env(), cwd=REPO, capture_output=True, timeout=300)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(out, "train"), env=_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first_record = out / "models" / "rab" / "groups" / "group-00000.json"
    deadline = time.monotonic() + 240
    while not first_record.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "training ended before it could be killed; make the run longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    records = list((out / "models" / "rab" / "groups").glob("group-*.json"))
    assert 1 <= len(records) < 4  # killed between the first and the last group
    done = subprocess.run(_cli(out), check=True, env=_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert "reused" in done.stderr
    for split in ("clean", "triggered"):
        name = f"certificates-rab-{split}.csv"
        assert (out / name).read_text() == (ref / name).read_text(), name
    for k in range(8):  # the very same weights
        a = load_tensors(out / "models" / "rab" / model_file(k))
        b = load_tensors(ref / "models" / "rab" / model_file(k))
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), k
