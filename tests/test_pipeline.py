"""End to end: a tiny `certssb run` on the embedded digits, resume, certify-only, report."""
import json
import math

import pytest
import torch

from certssb.runner import pipeline
from certssb.runner.config import RunConfig
from certssb.report.certificates import read_certificates_csv
from certssb.runner.regenerate import regenerate

TINY = dict(dataset="digits", models=12, epochs=6, base_epochs=6, sigma_steps=2, sigma_draws=4,
            alpha=0.1, bound="clopper-pearson", poison_rate=0.1, seed=1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    logs = []
    summary = pipeline.run(RunConfig(**TINY, out=str(out)), progress=False, log=logs.append)
    return out, summary, logs


def test_summary_has_every_key(tiny_run):
    out, summary, _ = tiny_run
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    for key in ("config", "dataset", "attack", "no_defense", "methods"):
        assert key in summary
    assert set(summary["dataset"]) >= {"name", "classes", "n_train", "n_test"}
    assert set(summary["attack"]) >= {"trigger", "delta", "trigger_l2", "poison_rate", "n_poisoned", "target"}
    assert set(summary["no_defense"]) >= {"clean_accuracy", "attack_success_rate"}
    assert set(summary["methods"]) == {"rab", "cert-ssb"}
    for m in summary["methods"].values():
        assert set(m) >= {"models", "bound", "sigma", "clean", "triggered", "storage_update", "seconds"}
        assert set(m["sigma"]) >= {"min", "median", "max"}
        assert set(m["clean"]) >= {"accuracy", "abstain_rate", "certified_accuracy"}
        assert set(m["triggered"]) >= {"robust_accuracy", "attack_success_rate", "certified_accuracy"}
        assert set(m["storage_update"]) >= {"trimmed", "aligned"}
        assert m["models"] == 12 and m["bound"] == "clopper-pearson"
    assert summary["methods"]["cert-ssb"]["mode"] == "paper"
    assert "certified_accuracy_conservative" in summary["methods"]["cert-ssb"]["clean"]
    for name in ("config.json", "sigma.safetensors", "models/rab/manifest.json", "certified_accuracy.png",
                 "table.txt", "certificates-rab-clean.csv", "certificates-cert-ssb-triggered.csv"):
        assert (out / name).exists(), name


def test_curves_never_increase_with_radius(tiny_run):
    _, summary, _ = tiny_run
    for m in summary["methods"].values():
        for variant in (m, m["variants"]["no_update"], m["variants"]["storage_update"]):
            for split in ("clean", "triggered"):
                for key in ("certified_accuracy", "certified_accuracy_conservative"):
                    curve = variant[split].get(key)
                    if curve:
                        values = [curve[k] for k in sorted(curve, key=float)]
                        assert all(a >= b for a, b in zip(values, values[1:])), values


def test_result_is_not_trivial(tiny_run):
    _, summary, _ = tiny_run
    assert summary["no_defense"]["clean_accuracy"] > 0.7
    assert summary["no_defense"]["attack_success_rate"] > 0.3  # the attack works without defense
    rab = summary["methods"]["rab"]
    assert rab["clean"]["certified_accuracy"]["0.0"] > 0.5  # smoothed classifier accurate at radius 0
    assert rab["triggered"]["attack_success_rate"] < summary["no_defense"]["attack_success_rate"]
    ssb = summary["methods"]["cert-ssb"]
    assert ssb["sigma"]["min"] >= 0.125 - 1e-6 and ssb["sigma"]["max"] <= 0.5 + 1e-6
    assert rab["sigma"]["min"] == rab["sigma"]["max"] == 0.25


def test_certificate_csv_is_consistent(tiny_run):
    out, summary, _ = tiny_run
    rows, kinds = read_certificates_csv(out / "certificates-cert-ssb-clean.csv")
    n = summary["dataset"]["n_test"]
    assert rows["idx"].tolist() == list(range(n))
    assert len(kinds) == n and set(kinds) <= {"none", "trim", "align", "abstain"}
    assert torch.all((rows["pA_lower"] + rows["pB_upper"] - 1).abs() < 1e-5)
    assert torch.all(rows["radius"][rows["abstain"]] == 0)
    # the storage update only ever shrinks a region
    assert torch.all(rows["radius"] <= rows["radius_raw"] + 1e-6)
    assert torch.all(rows["radius_conservative"] <= rows["radius_raw"] + 1e-6)
    keep = [k == "none" for k in kinds]
    assert torch.equal(rows["predict"][keep], rows["predict_raw"][keep])
    # poison budget r: delta * sqrt(r + 1) < R <= delta * sqrt(r + 2)
    delta = summary["attack"]["delta"]
    for r, b in zip(rows["radius"].tolist(), rows["poison_budget"].tolist()):
        assert (b == -1 and r <= delta * 1.0001) or (delta * math.sqrt(b + 1) < r * 1.0001)


def test_rerun_resumes_and_gives_identical_certificates(tiny_run, tmp_path):
    out, summary, _ = tiny_run
    before = (out / "certificates-cert-ssb-clean.csv").read_text()
    # damage one model: it must be detected by checksum and retrained, nothing else
    victim = out / "models" / "rab" / "model-00003.safetensors"
    victim.write_bytes(victim.read_bytes()[:-10])
    logs = []
    again = pipeline.run(RunConfig(**TINY, out=str(out)), progress=False, log=logs.append)
    text = "\n".join(logs)
    assert "no-defense baseline: reused" in text and "sigma: reused" in text
    assert "rab: 1 models trained, 11 reused" in text
    assert "cert-ssb: 0 models trained, 12 reused" in text
    assert (out / "certificates-cert-ssb-clean.csv").read_text() == before
    assert again["methods"]["rab"]["clean"] == summary["methods"]["rab"]["clean"]


def test_certify_only_and_report(tiny_run):
    out, summary, _ = tiny_run
    cfg = RunConfig(**{**TINY, "bound": "hoeffding"}, out=str(out))
    s2 = pipeline.run(cfg, train=False, progress=False, log=lambda s: None)
    assert s2["methods"]["rab"]["bound"] == "hoeffding"
    regenerated = regenerate(out, radii=[0.0, 0.1])
    assert list(regenerated["methods"]["rab"]["clean"]["certified_accuracy"]) == ["0.0", "0.1"]
    # restore the tiny run's summary for other tests
    pipeline.run(RunConfig(**TINY, out=str(out)), train=False, progress=False, log=lambda s: None)


def test_cert_ssb_with_sigma_pinned_to_sigma0_is_rab(tmp_path):
    """Both methods share models' seeds, data order and noise streams, so Cert-SSB whose sigma search
    may not move (sigma_min = sigma_max = sigma0) must certify exactly what RAB certifies before its
    storage update: a check that the comparison on the results pages is like for like."""
    cfg = RunConfig(**{**TINY, "models": 6, "epochs": 3, "base_epochs": 3, "sigma_min": 0.25, "sigma_max": 0.25},
                    out=str(tmp_path))
    pipeline.run(cfg, progress=False, log=lambda s: None)
    for split in ("clean", "triggered"):
        rab, _ = read_certificates_csv(tmp_path / f"certificates-rab-{split}.csv")
        ssb, _ = read_certificates_csv(tmp_path / f"certificates-cert-ssb-{split}.csv")
        assert torch.all(ssb["sigma"] == 0.25) and torch.all(rab["sigma"] == 0.25)
        assert torch.equal(ssb["predict_raw"], rab["predict"]) and torch.equal(ssb["abstain"], rab["abstain"])
        torch.testing.assert_close(ssb["pA_lower"], rab["pA_lower"], rtol=0, atol=1e-6)
        torch.testing.assert_close(ssb["radius_raw"], rab["radius"], rtol=0, atol=1e-6)


def test_too_few_models_for_the_bound_is_said_up_front(tiny_run):
    out, summary, logs = tiny_run
    assert not any(line.startswith("warning: with M=") for line in logs)  # 12 models certify at alpha 0.1
    need = pipeline.min_models_to_certify("hoeffding", 1e-6, 10)
    assert need > 12
    for m, certifies in ((need - 1, False), (need, True)):
        assert (pipeline.radius_ceiling("hoeffding", m, 1e-6, 10, 1.0)["pA_lower"] > 0.5) is certifies
    logs2: list[str] = []
    cfg = RunConfig(**{**TINY, "bound": "hoeffding", "alpha": 1e-6}, out=str(out))
    s2 = pipeline.run(cfg, train=False, progress=False, log=logs2.append)
    warning = [line for line in logs2 if line.startswith("warning: with M=12 models the hoeffding bound")]
    assert warning and f"--models {need} or more" in warning[0] and "(clopper-pearson: --models" in warning[0]
    assert s2["methods"]["rab"]["clean"]["abstain_rate"] == 1.0  # what the warning predicted
    pipeline.run(RunConfig(**TINY, out=str(out)), train=False, progress=False, log=lambda s: None)


@pytest.mark.parametrize("bound", ["clopper-pearson", "hoeffding"])
def test_kernel_and_reference_backends_give_the_same_certificates(tiny_run, bound):
    out, _, _ = tiny_run
    rows = {}
    for backend in ("reference", "kernels"):
        cfg = RunConfig(**{**TINY, "bound": bound, "backend": backend}, out=str(out))
        pipeline.run(cfg, train=False, progress=False, log=lambda s: None)
        rows[backend] = {f"{m}-{split}": read_certificates_csv(out / f"certificates-{m}-{split}.csv")
                         for m in ("rab", "cert-ssb") for split in ("clean", "triggered")}
    for key, (ref, ref_kinds) in rows["reference"].items():
        ker, ker_kinds = rows["kernels"][key]
        assert ref_kinds == ker_kinds, key
        for col in ("predict", "abstain", "predict_raw"):
            assert torch.equal(ref[col], ker[col]), (key, col)
        for col in ("radius", "pA_lower", "radius_conservative"):
            torch.testing.assert_close(ker[col], ref[col], rtol=1e-9, atol=1e-12, msg=f"{key} {col}")
    pipeline.run(RunConfig(**TINY, out=str(out)), train=False, progress=False, log=lambda s: None)


def test_real_mnist_one_vs_zero(data_root, tmp_path):
    """The paper's MNIST 1-vs-0 task on the real IDX files (skipped when the data is absent)."""
    if not (data_root / "mnist").exists():
        pytest.skip("MNIST not in the shared data folder")
    cfg = RunConfig(dataset="mnist", data_dir=str(data_root / "mnist"), classes=[1, 0], trigger="onepixel",
                    poison_rate=0.05, max_train=1500, max_test=300, models=8, epochs=4, batch_size=32, sigma_steps=1,
                    sigma_draws=2, bound="clopper-pearson", alpha=0.05, out=str(tmp_path / "mnist"))
    summary = pipeline.run(cfg, progress=False, log=lambda s: None)
    assert summary["dataset"]["class_names"] == ["1", "0"]
    assert summary["attack"]["trigger_l2"]["mean"] == pytest.approx(1.0, abs=1e-4)  # RAB's pixel: not clipped
    assert summary["attack"]["target"] == 0 and summary["attack"]["n_poisoned"] == 75
    assert summary["no_defense"]["clean_accuracy"] > 0.95
    assert summary["no_defense"]["attack_success_rate"] > 0.5
    for m in summary["methods"].values():
        assert m["clean"]["certified_accuracy"]["0.0"] > 0.9
        assert m["triggered"]["attack_success_rate"] < 0.1
