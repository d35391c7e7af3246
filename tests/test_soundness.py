"""The empirical soundness check (certssb.experiments.soundness, scripts/empirical_soundness.py).

The smoke run must produce a well-formed, self-consistent report (tried >=
changed, every counted input certified beyond the backdoor's joint norm,
perturbations inside the ball really inside it); the check must be able to
fail: perturbations far above the radius and a huge backdoor DO change
predictions, and the consistency checker rejects inconsistent reports; and
retraining with the same seeds reproduces the ensemble exactly (the property
the backdoor comparison relies on).
"""
from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from certssb.data import load_task
from certssb.errors import CertssbError
from certssb.experiments.soundness import (SoundnessConfig, backdoor_check, certify_inputs, check_report,
                               class_means, format_markdown, margin_gradient, perturbation_check,
                               plant_backdoor, train_ensemble, unit_directions)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import empirical_soundness  # noqa: E402

SMALL = SoundnessConfig(dataset="digits", classes=[0, 1], models=4, epochs=1, batch_size=16, lr=3e-3,
                        alpha=0.2, max_test=60, poisoned=8).resolved()


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("soundness")
    rc = empirical_soundness.main(["--smoke", "--quiet", "--json", str(out / "s.json"), "--md", str(out / "s.md")])
    assert rc == 0
    return json.loads((out / "s.json").read_text()), (out / "s.md").read_text()


@pytest.fixture(scope="module")
def small():
    task = load_task("digits", classes=[0, 1], max_test=60, seed=0)
    ens = train_ensemble(task.x_train, task.y_train, SMALL, num_classes=2, arch="digits-cnn")
    return task, ens, certify_inputs(ens, task.x_test, SMALL)


# ----------------------------------------------------------------------------- the smoke run
def test_smoke_report_is_well_formed_and_consistent(smoke_report):
    report, page = smoke_report
    check_report(report)  # tried >= changed >= contradicted, norms inside / outside the ball, eps
    assert report["smoke"] is True and report["models"] == 6 and report["bound"] == "clopper-pearson"
    clean = report["clean"]
    assert clean["inputs"] > 0 and 0 < clean["certified"] <= clean["inputs"]
    rows = report["test_time"]["rows"]
    assert {r["direction"] for r in rows} == {"random", "gradient"}
    inside = [r for r in rows if r["inside_certificate"]]
    assert len(inside) == 2 and all(r["tried"] == clean["certified"] for r in inside)
    assert all(r["max_norm_over_radius"] < 1 for r in inside)
    assert all(r["max_norm_over_radius"] > 1 for r in rows if not r["inside_certificate"])
    bd = report["backdoor"]
    assert bd["poisoned"] == 8 and bd["labels_changed"] == 0
    joint_train_test = math.hypot(bd["train_norm"], bd["test_norm"])
    assert joint_train_test < bd["eps"]
    for name in ("mean", "gradient"):
        t = bd["triggers"][name]
        assert 0 <= t["changed"] <= t["tried"] <= t["tried_all"] == clean["inputs"]
        assert t["tried"] > 0 and t["min_radius_counted"] >= bd["eps"] > t["max_joint_norm"]
        assert len(t["changed_idx"]) == t["changed"]
    for key in ("train", "certify", "test_time", "backdoor", "total"):
        assert report["seconds"][key] >= 0
    assert "## Test-time perturbations" in page and "## Backdoor" in page
    assert f"| random | 0.999 | yes | {clean['certified']} |" in page


def test_check_report_rejects_inconsistent_reports(smoke_report):
    report, _ = smoke_report
    bad = copy.deepcopy(report)
    bad["test_time"]["rows"][0]["changed"] = bad["test_time"]["rows"][0]["tried"] + 1
    with pytest.raises(AssertionError):
        check_report(bad)
    bad = copy.deepcopy(report)
    bad["test_time"]["rows"][0]["max_norm_over_radius"] = 1.5  # an "inside" row outside the ball
    with pytest.raises(AssertionError):
        check_report(bad)
    bad = copy.deepcopy(report)
    bad["backdoor"]["triggers"]["mean"]["max_joint_norm"] = bad["backdoor"]["eps"]  # not below eps
    with pytest.raises(AssertionError):
        check_report(bad)
    bad = copy.deepcopy(report)
    bad["backdoor"]["triggers"]["mean"]["min_radius_counted"] = 0.5 * bad["backdoor"]["eps"]
    with pytest.raises(AssertionError):
        check_report(bad)


# ----------------------------------------------------------------------------- the check can fail
def test_perturbations_far_above_the_radius_are_detected(small):
    task, ens, cert = small
    x = task.x_test
    assert (~cert.abstain).sum() > 0
    means = class_means(task.x_train, task.y_train, 2)
    toward = (means[1 - cert.predict] - x.double()).reshape(x.shape)
    u, _ = unit_directions(toward, toward)
    norms = 1.5 * toward.reshape(x.shape[0], -1).norm(dim=1)  # past the other class's mean
    far = perturbation_check(ens, x, cert, u, norms, SMALL)
    assert far["max_norm_over_radius"] > 5
    assert far["changed"] > far["tried"] // 2 and far["contradicted"] > 0
    # gradient direction: also flips at a large multiple of the radius
    grad = margin_gradient(ens, x, cert.predict, SMALL)
    g, _ = unit_directions(-grad, u)
    res = perturbation_check(ens, x, cert, g, 40.0 * cert.radius, SMALL)
    assert res["changed"] > 0
    # and nothing at all moves when the norm is 0
    still = perturbation_check(ens, x, cert, g, torch.zeros(x.shape[0], dtype=torch.float64), SMALL)
    assert still["changed"] == 0 and still["tried"] == int((~cert.abstain).sum())


def test_huge_backdoor_changes_predictions(small):
    """eps far above every radius: nothing is counted, but the predictions DO change."""
    task, ens, cert = small
    cfg = SoundnessConfig(**{**SMALL.__dict__, "poisoned": 120, "train_share": 0.5}).resolved()
    out = backdoor_check(ens, task, cert, cfg, eps=12.0, arch="digits-cnn")
    for t in out["triggers"].values():
        assert t["tried"] == 0  # no radius reaches 12
        assert t["changed_all"] > 0


def test_retraining_with_the_same_seeds_reproduces_the_votes(small):
    task, ens, cert = small
    again = train_ensemble(task.x_train, task.y_train, SMALL, num_classes=2, arch="digits-cnn")
    cert2 = certify_inputs(again, task.x_test, SMALL)
    assert torch.equal(cert2.predict, cert.predict) and torch.equal(cert2.pa_lower, cert.pa_lower)
    for (_, g1), (_, g2) in zip(ens.groups, again.groups):
        for s1, s2 in zip(g1.state_dicts(), g2.state_dicts()):
            assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_plant_backdoor_moves_only_target_samples_by_the_joint_norm():
    task = load_task("digits", classes=[0, 1], seed=0)
    x_p, pick, measured = plant_backdoor(task.x_train, task.y_train, train_norm=0.3, poisoned=10, target=1)
    assert pick.numel() == 10 and (task.y_train[pick] == 1).all()
    moved = (x_p != task.x_train).reshape(x_p.shape[0], -1).any(dim=1)
    assert set(moved.nonzero().flatten().tolist()) <= set(pick.tolist())
    assert measured == pytest.approx(0.3, rel=1e-5)
    d = (x_p[pick] - task.x_train[pick]).reshape(10, -1).double().norm(dim=1)
    torch.testing.assert_close(d, torch.full((10,), 0.3 / math.sqrt(10), dtype=torch.float64), rtol=1e-5, atol=0)
    with pytest.raises(CertssbError, match="target label"):
        plant_backdoor(task.x_train, task.y_train, train_norm=0.3, poisoned=3, target=5)


# ----------------------------------------------------------------------------- errors and the page
@pytest.mark.parametrize("argv,match", [
    (["--alpha", "1.5"], "alpha"),
    (["--models", "0"], "models"),
    (["--classes", "1,x"], "classes"),
    (["--sigma", "-1"], "sigma"),
])
def test_script_refuses_bad_arguments(argv, match, capsys):
    assert empirical_soundness.main(argv + ["--quiet", "--md", ""]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and "Traceback" not in err


def test_format_markdown_of_a_skipped_backdoor(smoke_report):
    report, _ = smoke_report
    r = copy.deepcopy(report)
    r["backdoor"] = {"skipped": "no test input was certified: nothing to compare"}
    check_report(r)
    page = format_markdown(r, "x.json")
    assert "Skipped: no test input was certified" in page and "Full numbers: x.json" in page


def test_render_writes_the_page_again_from_a_saved_report(smoke_report, tmp_path):
    report, page = smoke_report
    (tmp_path / "r.json").write_text(json.dumps(report))
    assert empirical_soundness.main(["--render", str(tmp_path / "r.json"), "--md", str(tmp_path / "p.md")]) == 0
    again = (tmp_path / "p.md").read_text()
    assert again.split("## Run")[0] == page.split("## Run")[0]  # same tables; only the JSON path differs
    assert "Machine load" in again and "OMP_NUM_THREADS=" in again
