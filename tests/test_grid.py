"""certssb.experiments.grid and certssb.report.pages: experiment files, cells, resume, results pages."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from certssb.cli import main
from certssb.errors import CertssbError
from certssb.experiments.grid import Experiment, cell_name, parse_only, run_grid
from certssb.report.cells import find_cells
from certssb.report.pages import compare_methods, write_pages
from certssb.report.readme_block import published_headline

REPO = Path(__file__).resolve().parents[1]


def tiny_experiment(**over) -> dict:
    exp = {
        "name": "digits-tiny", "title": "digits, tiny", "page": "digits",
        "base": {"dataset": "digits", "classes": [0, 1], "poison_rate": 0.05, "seed": 3,
                 "sigma_steps": 1, "sigma_draws": 1, "max_train": 160, "max_test": 40},
        "axes": {"sigma0": [0.25, 0.5]},
        "bounds": ["hoeffding", "clopper-pearson"],
        "scales": {"full": {"models": 3, "epochs": 1}, "cpu": {"models": 2, "epochs": 1, "axes": {"sigma0": [0.5]}}},
    }
    exp.update(over)
    return exp


def test_shipped_experiment_files_are_valid():
    files = sorted((REPO / "experiments").glob("*.json"))
    assert len(files) >= 6
    names = set()
    for f in files:
        exp = Experiment.load(f)
        assert exp.name == f.stem  # the CLI finds an experiment by its name
        names.add(exp.name)
        full = exp.cells("full")
        if exp.page != "digits":  # the paper's tasks: the paper's M at full scale
            assert full and all(c.config["models"] in (200, 1000) for c in full)
        assert set(exp.bounds) <= {"hoeffding", "clopper-pearson"}
    # the paper's layout: both binary tasks, the ImageNette tasks, multi-class and the published setting
    assert {"mnist-1v0", "cifar10-airplane-bird", "imagenette-2class", "imagenette-10class",
            "mnist-10class", "cifar10-10class", "mnist-1v0-published"} <= names
    mnist = Experiment.load(REPO / "experiments" / "mnist-1v0.json")
    assert len(mnist.cells("full")) == 12  # 3 triggers x 4 sigma0
    assert {c.point["sigma0"] for c in mnist.cells("cpu")} == {0.12, 0.25, 0.5, 1.0}  # RAB's envelope
    pub = Experiment.load(REPO / "experiments" / "mnist-1v0-published.json")
    extra = [c for c in pub.cells("cpu") if c.point.get("method") == "rab"]
    assert [c.name for c in extra] == [f"method-rab_sigma0-{s}" for s in ("0.12", "0.25", "0.5", "1")]
    assert all(c.config["models"] == 500 and c.config["trigger"] == "onepixel" for c in extra)
    assert pub.cells("smoke")[0].name == "default" and len(pub.cells("smoke")) == 1


def test_cells_names_and_only_filter():
    exp = Experiment.from_dict(tiny_experiment())
    cells = exp.cells("full")
    assert [c.name for c in cells] == ["sigma0-0.25", "sigma0-0.5"]
    assert all(c.config["method"] == "both" and c.config["models"] == 3 for c in cells)
    assert [c.name for c in exp.cells("full", parse_only(["sigma0=0.50"]))] == ["sigma0-0.5"]
    assert [c.name for c in exp.cells("cpu")] == ["sigma0-0.5"]
    assert cell_name({"trigger": "onepixel", "sigma0": 1.0}) == "trigger-onepixel_sigma0-1"


@pytest.mark.parametrize("change, message", [
    ({"bounds": ["chernoff"]}, "unknown bound"),
    ({"base": {"dataset": "digits", "out": "x"}}, "the grid owns"),
    ({"base": {"dataset": "digits", "sigma_zero": 1}}, "unknown settings"),
    ({"axes": {"sigma0": []}}, "has no values"),
    ({"scales": {}}, "\"scales\" is empty"),
    ({"scales": {"cpu": {"axes": {"trigger": ["onepixel"]}}}}, "does not sweep"),
    ({"name": "../escape"}, "folder name"),
    ({"colour": "red"}, "unknown keys"),
    ({"axes": {"sigma0": [0.25, -1.0]}}, "sigma0"),
    ({"scales": {"full": {"models": 0}}}, "--models"),
    ({"extra_cells": [{"sigma_zero": 1}]}, "unknown settings"),
    ({"extra_cells": [{}]}, "non-empty objects"),
    ({"extra_cells": [{"method": "rab", "sigma0": -1.0}]}, "sigma0"),
])
def test_bad_experiment_files_are_refused(change, message):
    with pytest.raises(CertssbError, match=message):
        Experiment.from_dict(tiny_experiment(**change))


def test_unknown_scale_and_no_matching_cell():
    exp = Experiment.from_dict(tiny_experiment())
    with pytest.raises(CertssbError, match="no scale 'gpu'"):
        exp.cells("gpu")
    with pytest.raises(CertssbError, match="no cell matches"):
        run_grid([exp], "full", "unused", only={"sigma0": ["7"]}, dry_run=True, log=lambda s: None)


def test_grid_runs_resumes_and_writes_pages(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # pages look for experiments/<name>.json here: none, by design
    exp = Experiment.from_dict(tiny_experiment())
    logs: list[str] = []
    done = run_grid([exp], "full", tmp_path / "grid", progress=False, log=logs.append,
                    overrides={"device": "cpu"})
    assert [d["status"] for d in done] == ["done", "done"]
    cell_dir = tmp_path / "grid" / "digits-tiny" / "full" / "sigma0-0.25"
    rec = json.loads((cell_dir / "cell.json").read_text())
    assert rec["status"] == "done" and rec["reduced"] is False and rec["bounds"] == ["hoeffding", "clopper-pearson"]
    for bound in rec["bounds"]:
        s = json.loads((cell_dir / bound / "summary.json").read_text())
        assert s["config"]["bound"] == bound and set(s["methods"]) == {"rab", "cert-ssb"}
        assert (cell_dir / bound / "certificates-cert-ssb-clean.csv").exists()
    # one training serves both bounds: same models, different certificates only where the bound differs
    assert not (cell_dir / "summary.json").exists()
    again = run_grid([exp], "full", tmp_path / "grid", progress=False, log=logs.append)
    assert [d["status"] for d in again] == ["skipped", "skipped"]
    # a changed setting is not mistaken for the finished cell
    exp2 = Experiment.from_dict(tiny_experiment(scales={"full": {"models": 2, "epochs": 1}}))
    planned = run_grid([exp2], "full", tmp_path / "grid", dry_run=True, log=logs.append)
    assert [d["status"] for d in planned] == ["planned", "planned"]

    cells = find_cells(tmp_path / "grid")
    assert len(cells) == 2
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start (generated by `certssb pages --readme README.md`) -->\n"
                      "old\n<!-- results:end -->\ntail\n")
    paths = write_pages(tmp_path / "grid", tmp_path / "docs", readme=readme)
    page = (tmp_path / "docs" / "digits.md").read_text()
    s = json.loads((cell_dir / "hoeffding" / "summary.json").read_text())
    rab0 = s["methods"]["rab"]["clean"]["certified_accuracy"]["0.0"]
    assert f"| 0.0 | {100 * rab0:.1f} |" in page  # the table's first number is the summary's
    assert "digits-tiny" in page and "### sigma0 0.25; clopper-pearson" in page
    assert (tmp_path / "docs" / "digits-digits-tiny-full-hoeffding.png").stat().st_size > 1000
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("tail\n") and "old" not in text
    assert "| digits-tiny | full | trigger blending | 0.25 | 3 |" in text  # readable rows, not folder names
    assert (tmp_path / "docs" / "cells" / "digits-tiny" / "full" / "sigma0-0.25" / "hoeffding.json").exists()
    assert readme in paths


def test_compare_methods_reports_where_cert_ssb_is_below_rab():
    def method(curve):
        return {"clean": {"certified_accuracy": curve}, "triggered": {"certified_accuracy": curve},
                "variants": {"storage_update": {"clean": {"certified_accuracy": curve},
                                                "triggered": {"certified_accuracy": curve}}}}
    s = {"methods": {"rab": method({"0.0": 0.9, "0.25": 0.5}), "cert-ssb": method({"0.0": 0.95, "0.25": 0.4})}}
    worse = compare_methods(s)
    assert worse == ["clean r=0.25: 40.0% < 50.0%", "triggered r=0.25: 40.0% < 50.0%"]
    s["methods"]["cert-ssb"] = method({"0.0": 0.95, "0.25": 0.5})
    assert compare_methods(s) == []
    # a gap hidden by one decimal gets two, and the number of inputs behind it
    s["methods"]["cert-ssb"] = method({"0.0": 0.9, "0.25": 0.4996})
    s["dataset"] = {"n_test": 2500, "n_triggered": 5000}
    assert compare_methods(s) == ["clean r=0.25: 49.96% < 50.00% (1 of 2500 inputs)",
                                  "triggered r=0.25: 49.96% < 50.00% (2 of 5000 inputs)"]


def test_published_headline_puts_ours_beside_the_published_figures(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # experiments/ is looked up relative to the working directory, as the CLI does
    (tmp_path / "experiments").mkdir()
    pub = {"source": "paper X", "method": "cert-ssb", "split": "clean", "bound": "hoeffding",
           "certified_accuracy": {"0.0": 0.9995, "0.25": 0.9943}}
    (tmp_path / "experiments" / "digits-tiny.json").write_text(json.dumps(tiny_experiment(published=pub)))
    curve = {"0.0": 0.9986, "0.25": 0.7905, "0.5": 0.0}
    summary = {"config": {"models": 500, "epochs": 1},
               "methods": {"cert-ssb": {"variants": {"storage_update": {"clean": {"certified_accuracy": curve}}}}}}
    cell = {"experiment": "digits-tiny", "scale": "cpu", "cell": "default", "summaries": {"hoeffding": summary}}
    line = published_headline(cell, "docs/results/digits.md")
    assert line.startswith("- digits, tiny: ours (M = 500, 1 epoch(s), cpu scale (reduced)) 99.86 / 79.05 "
                           "against the published 99.95 / 99.43 at r = 0.0 / 0.25 (paper X)")
    assert "docs/results/digits.md" in line
    # no line without the bound the figures were published with, or for an experiment without published figures
    assert published_headline({**cell, "summaries": {"clopper-pearson": summary}}, "p.md") is None
    (tmp_path / "experiments" / "digits-tiny.json").write_text(json.dumps(tiny_experiment()))
    assert published_headline(cell, "p.md") is None


def test_cli_grid_dry_run_and_errors(tmp_path, capsys):
    f = tmp_path / "exp.json"
    f.write_text(json.dumps(tiny_experiment()))
    assert main(["grid", str(f), "--dry-run", "--out", str(tmp_path / "g")]) == 0
    out = capsys.readouterr()
    assert "2 planned" in out.out and "sigma0-0.25: would run" in out.err
    assert main(["grid", str(tmp_path / "missing.json")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["grid", str(f), "--only", "sigma0"]) == 2
    assert "AXIS=VALUE" in capsys.readouterr().err
    assert main(["pages", "--runs", str(tmp_path / "nothing"), "--docs", str(tmp_path / "docs")]) == 2
    assert "not a directory" in capsys.readouterr().err


# Every shipped experiment runs end to end on its real dataset at the smoke scale (M = 2, a few hundred
# images): the files name classes, triggers and schedules the loaders and the pipeline accept. ImageNette
# decodes 224px JPEGs for 90 s, so it is slow-marked.
_SMOKE = [pytest.param(n, marks=pytest.mark.slow) if n.startswith("imagenette") else n
          for n in sorted(f.stem for f in (REPO / "experiments").glob("*.json"))]


@pytest.mark.parametrize("name", _SMOKE)
def test_shipped_experiment_runs_at_smoke_scale_on_real_data(name, data_root, tmp_path, monkeypatch):
    exp = Experiment.load(REPO / "experiments" / f"{name}.json")
    if "smoke" not in exp.scales:
        pytest.skip(f"{name} has no smoke scale")
    monkeypatch.setenv("CERTSSB_DATA", str(data_root))
    done = run_grid([exp], "smoke", tmp_path / "grid", progress=False, log=lambda *_: None)
    assert done and all(d["status"] == "done" for d in done)
    for cell in find_cells(tmp_path / "grid"):
        assert set(cell["summaries"]) == set(exp.bounds)
        for s in cell["summaries"].values():
            assert set(s["methods"]) == ({"rab", "cert-ssb"} if exp.base.get("method", "both") == "both"
                                         else {exp.base["method"]})
            assert s["attack"]["all_to_all"] == bool(cell["point"].get("all_to_all", False))
            assert s["config"]["models"] == exp.scales["smoke"]["models"]
