"""Ensemble training: fixed noise per (model, sample), checkpoints, resume, damage detection."""
import pytest
import torch

from certssb.ensemble import EnsembleDir, EnsembleSpec, _fixed_noise, model_file
from certssb import ensemble as ensemble_mod
from certssb.errors import CheckpointError, CertssbError
from certssb.fileio import read_json
from certssb.noise import Stream, normal
from certssb.training import Schedule


def _spec(models=3, fingerprint="fp", seed=0):
    return EnsembleSpec(method="rab", arch="digits-cnn", in_channels=1, num_classes=3, image_size=(8, 8),
                        models=models, schedule=Schedule(epochs=2, batch_size=8, lr=1e-3), seed=seed,
                        fingerprint=fingerprint)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(24, 1, 8, 8, generator=g), torch.arange(24) % 3


def test_training_noise_is_fixed_per_model_and_sample(monkeypatch):
    x = torch.rand(5, 1, 2, 2)
    sigma = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    idx = torch.tensor([4, 0, 2])
    cached = _fixed_noise(x, sigma, seed=7, k=2, device="cpu")
    expect = x[idx] + sigma[idx].view(-1, 1, 1, 1) * normal(7, int(Stream.TRAIN), 2, idx, 4).view(3, 1, 2, 2)
    assert torch.allclose(cached(x[idx], idx, 0), expect)
    assert torch.equal(cached(x[idx], idx, 0), cached(x[idx], idx, 5))  # same every epoch
    monkeypatch.setattr(ensemble_mod, "NOISE_CACHE_ELEMENTS", 0)  # regenerate per batch instead
    regen = _fixed_noise(x, sigma, seed=7, k=2, device="cpu")
    assert torch.equal(regen(x[idx], idx, 3), cached(x[idx], idx, 0))


def test_train_save_resume_and_detect_damage(tmp_path, data):
    x, y = data
    ens = EnsembleDir(tmp_path / "rab", _spec())
    stats = ens.train(x, y, torch.full((24,), 0.25), progress=False)
    assert stats["trained"] == 3 and stats["reused"] == 0
    manifest = read_json(tmp_path / "rab" / "manifest.json")
    assert set(manifest["finished"]) == {"0", "1", "2"}
    first = {k: m.state_dict() for k, m in ens.iter_models()}
    # resume: nothing to do
    assert ens.train(x, y, torch.full((24,), 0.25), progress=False)["trained"] == 0
    # damage one file: retrained, to the same weights (training is deterministic)
    path = tmp_path / "rab" / model_file(1)
    path.write_bytes(path.read_bytes()[:100])
    assert set(ens.finished()) == {0, 2}
    assert ens.train(x, y, torch.full((24,), 0.25), progress=False)["trained"] == 1
    again = dict(ens.iter_models())[1].state_dict()
    for key in first[1]:
        assert torch.equal(first[1][key], again[key])


def test_models_differ_and_share_nothing_but_order(tmp_path, data):
    x, y = data
    ens = EnsembleDir(tmp_path / "rab", _spec(models=2))
    ens.train(x, y, torch.full((24,), 0.25), progress=False)
    m0, m1 = (m for _, m in ens.iter_models())
    assert not torch.equal(m0.features[0].weight, m1.features[0].weight)


def test_manifest_of_another_run_is_refused(tmp_path, data):
    x, y = data
    EnsembleDir(tmp_path / "rab", _spec()).train(x, y, torch.full((24,), 0.25), progress=False)
    with pytest.raises(CheckpointError, match="different run.*fingerprint"):
        EnsembleDir(tmp_path / "rab", _spec(fingerprint="other")).train(
            x, y, torch.full((24,), 0.25), progress=False)


def test_missing_models_and_bad_sigma(tmp_path, data):
    x, y = data
    ens = EnsembleDir(tmp_path / "rab", _spec())
    with pytest.raises(CheckpointError, match="3 of 3 rab models are missing"):
        list(ens.iter_models())
    with pytest.raises(CertssbError, match="sigma must have shape"):
        ens.train(x, y, torch.full((5,), 0.25), progress=False)


def test_a_pickle_in_place_of_a_checkpoint_is_never_executed(tmp_path, data):
    x, y = data
    ens = EnsembleDir(tmp_path / "rab", _spec(models=1))
    ens.train(x, y, torch.full((24,), 0.25), progress=False)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    import pickle
    (tmp_path / "rab" / model_file(0)).write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError):
        ens.load(0)
    assert not marker.exists()
