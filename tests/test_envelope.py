"""certssb.report.envelope (RAB's envelope over sigma0, the fair comparison) and the pages' kept cell copies,
on hand-built cell directories (no training)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from certssb.cli import main
from certssb.report.envelope import envelope, fair_rows, nearest_sigma0, task_key, verdict
from certssb.errors import CertssbError
from certssb.report.cells import KEPT_DIR, find_cells, find_kept_cells
from certssb.report.pages import write_pages

RADII = ("0.0", "0.25", "0.5", "0.75")


def _curve(values):
    return dict(zip(RADII, values))


def _method(values, cons=None, median=None):
    cur = _curve(values)
    m = {"clean": {"certified_accuracy": cur, "accuracy": values[0], "abstain_rate": 0.0},
         "triggered": {"certified_accuracy": cur, "attack_success_rate": 0.0, "robust_accuracy": values[0]},
         "variants": {"storage_update": {"clean": {"certified_accuracy": cur},
                                         "triggered": {"certified_accuracy": cur}},
                      "no_update": {"clean": {"certified_accuracy": cur},
                                    "triggered": {"certified_accuracy": cur}}}}
    if cons is not None:
        for v in m["variants"].values():
            for split in ("clean", "triggered"):
                v[split]["certified_accuracy_conservative"] = _curve(cons)
    if median is not None:
        st = {"min": median / 2, "median": median, "max": median}
        m["sigma"] = {"train": st, "clean": st, "triggered": st}
    return m


def _summary(sigma0, rab=None, ssb=None, cons=None, median=None, n=200):
    methods = {}
    if rab is not None:
        methods["rab"] = _method(rab)
    if ssb is not None:
        methods["cert-ssb"] = _method(ssb, cons, median)
    return {"config": {"sigma0": sigma0, "models": 100, "epochs": 2, "out": "/somewhere/cell",
                       "data_dir": "/private/data"},
            "dataset": {"name": "digits", "n_test": n, "n_triggered": n, "n_train": 1000},
            "attack": {"trigger": "onepixel", "delta": 1.0, "n_poisoned": 20, "trigger_l2": {"max": 1.0},
                       "target": 0},
            "methods": methods}


def write_cell(root: Path, name: str, point: dict, summaries: dict, experiment="fake-exp", scale="cpu") -> Path:
    """A finished grid cell directory as `run_grid` leaves it: cell.json and <bound>/summary.json."""
    d = root / experiment / scale / name
    for bound, s in summaries.items():
        (d / bound).mkdir(parents=True, exist_ok=True)
        (d / bound / "summary.json").write_text(json.dumps(s))
    rec = {"format": 1, "status": "done", "experiment": experiment, "scale": scale, "reduced": scale != "full",
           "cell": name, "point": point, "config": {"sigma0": point.get("sigma0", 0.25), "data_dir": "/private"},
           "overrides": {"device": "cpu", "data_dir": "/private"}, "bounds": list(summaries),
           "seconds": {"train": 10.0, **{f"certify_{b}": 1.0 for b in summaries}},
           "hardware": {"cpu": "test cpu", "torch_threads": 1, "torch": "x", "host": "secret-host"},
           "finished": "today"}
    (d / "cell.json").write_text(json.dumps(rec))
    return d


def fake_grid(root: Path) -> None:
    """Two triggers; one-pixel has RAB at three sigma0 and Cert-SSB at 0.25 (median sigma 0.48)."""
    write_cell(root, "trigger-onepixel_sigma0-0.25", {"trigger": "onepixel", "sigma0": 0.25},
               {"hoeffding": _summary(0.25, rab=[0.9, 0.5, 0.0, 0.0], ssb=[0.88, 0.8, 0.3, 0.0],
                                      cons=[0.88, 0.1, 0.0, 0.0], median=0.48)})
    write_cell(root, "trigger-onepixel_sigma0-0.5", {"trigger": "onepixel", "sigma0": 0.5},
               {"hoeffding": _summary(0.5, rab=[0.85, 0.8, 0.2, 0.0], ssb=[0.8, 0.8, 0.8, 0.4],
                                      cons=[0.8, 0.3, 0.0, 0.0], median=0.9)})
    write_cell(root, "method-rab_sigma0-1", {"method": "rab", "sigma0": 1.0},
               {"hoeffding": _summary(1.0, rab=[0.7, 0.7, 0.6, 0.1])})
    write_cell(root, "trigger-blending_sigma0-0.25", {"trigger": "blending", "sigma0": 0.25},
               {"hoeffding": _summary(0.25, rab=[0.95, 0.2, 0.0, 0.0], ssb=[0.9, 0.3, 0.0, 0.0],
                                      cons=[0.9, 0.0, 0.0, 0.0], median=0.5)})


def test_envelope_takes_the_best_sigma0_per_radius():
    curves = {0.25: {"0.0": 0.9, "0.25": 0.5, "0.5": 0.0},
              0.5: {"0.0": 0.85, "0.25": 0.8, "0.5": 0.2},
              1.0: {"0.0": 0.7, "0.25": 0.8, "0.5": 0.6, "0.75": 0.1}}
    env = envelope(curves)
    assert env == {"0.0": (0.9, 0.25), "0.25": (0.8, 0.5), "0.5": (0.6, 1.0), "0.75": (0.1, 1.0)}
    assert envelope({}) == {}
    assert nearest_sigma0([0.12, 0.25, 0.5, 1.0], 0.48) == 0.5
    assert nearest_sigma0([0.25, 0.5], 0.375) == 0.25  # a tie goes to the smaller sigma0
    assert nearest_sigma0([], 0.3) is None


def test_verdict_counts_inputs_and_stops_where_both_are_zero():
    v = verdict({"0.0": 0.88, "0.25": 0.8, "0.5": 0.3, "0.75": 0.0, "1.0": 0.0},
                {"0.0": 0.9, "0.25": 0.8, "0.5": 0.6, "0.75": 0.0, "1.0": 0.0}, n=200)
    assert v.beats == [] and v.ties == ["0.25"] and v.loses == [("0.0", 4), ("0.5", 60)]
    assert v.both_zero_from == "0.75"
    assert v.text(200) == ("ties at r = 0.25; loses at r = 0.0 (-4), 0.5 (-60); neither certifies any input "
                           "from r = 0.75 (gaps in test inputs of 200)")
    # without the number of inputs: percentage points; a difference below one input is a tie
    assert verdict({"0.0": 0.5}, {"0.0": 0.25}, None).beats == [("0.0", 25.0)]
    assert verdict({"0.0": 0.5001}, {"0.0": 0.5}, 1000).ties == ["0.0"]


def test_fair_rows_group_by_task_not_by_sigma0(tmp_path):
    fake_grid(tmp_path)
    cells = find_cells(tmp_path)
    # tasks are keyed by the axes other than sigma0 and method: the RAB-only cell without a trigger
    # axis joins neither trigger's task
    keys = {c["cell"]: task_key(c) for c in cells}
    assert keys["trigger-onepixel_sigma0-0.25"] == keys["trigger-onepixel_sigma0-0.5"]
    assert keys["trigger-onepixel_sigma0-0.25"] != keys["trigger-blending_sigma0-0.25"]
    rows = {r.cell["cell"]: r for r in fair_rows(cells, "hoeffding")}
    assert set(rows) == {"trigger-onepixel_sigma0-0.25", "trigger-onepixel_sigma0-0.5",
                         "trigger-blending_sigma0-0.25"}  # RAB-only cells get no row
    r = rows["trigger-onepixel_sigma0-0.25"]
    assert r.grid == [0.25, 0.5] and r.rab_same["0.25"] == 0.5
    assert r.env == {"0.0": (0.9, 0.25), "0.25": (0.8, 0.5), "0.5": (0.2, 0.5), "0.75": (0.0, 0.25)}
    assert r.nearest == 0.5 and r.rab_nearest["0.25"] == 0.8  # median sigma 0.48 -> RAB at 0.5
    v = r.verdict()
    assert v.loses == [("0.0", 4)] and v.ties == ["0.25"] and v.beats == [("0.5", 20)]
    assert r.verdict(conservative=True).loses == [("0.0", 4), ("0.25", 140), ("0.5", 40)]
    b = rows["trigger-blending_sigma0-0.25"]
    assert b.grid == [0.25] and b.env_curve == b.rab_same  # one sigma0: the envelope is RAB itself
    assert fair_rows(cells, "clopper-pearson") == []


def test_rab_only_extra_cells_join_a_task_without_axes(tmp_path):
    # the published setting: no axes, Cert-SSB at sigma0 0.12, RAB-only extra cells at other sigma0
    write_cell(tmp_path, "default", {}, {"hoeffding": _summary(0.12, ssb=[0.99, 0.9, 0.0, 0.0], median=0.24)})
    for s0, vals in ((0.12, [0.99, 0.0, 0.0, 0.0]), (0.25, [0.99, 0.95, 0.0, 0.0])):
        write_cell(tmp_path, f"method-rab_sigma0-{s0:g}", {"method": "rab", "sigma0": s0},
                   {"hoeffding": _summary(s0, rab=vals)})
    (row,) = fair_rows(find_cells(tmp_path), "hoeffding")
    assert row.grid == [0.12, 0.25] and row.rab_same["0.25"] == 0.0 and row.nearest == 0.25
    assert row.env["0.25"] == (0.95, 0.25) and row.ssb_cons == {}
    assert row.verdict().loses == [("0.25", 10)]


def test_pages_keep_cells_and_render_from_the_kept_copy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no experiments/ here: pages fall back to the dataset name
    runs, docs = tmp_path / "grid", tmp_path / "docs"
    fake_grid(runs)
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- results:start (generated by `certssb pages --readme README.md`) -->\n"
                      "old\n<!-- results:end -->\nb\n")
    write_pages(runs, docs, readme=readme)
    page = (docs / "other.md").read_text()
    block = readme.read_text()
    kept = sorted(p.relative_to(docs).as_posix() for p in (docs / KEPT_DIR).rglob("*") if p.is_file())
    assert kept == sorted(f"{KEPT_DIR}/fake-exp/cpu/{c}/{f}" for c in
                          ("trigger-onepixel_sigma0-0.25", "trigger-onepixel_sigma0-0.5", "method-rab_sigma0-1",
                           "trigger-blending_sigma0-0.25") for f in ("cell.json", "hoeffding.json"))
    for p in (docs / KEPT_DIR).rglob("*.json"):  # JSON only, small, no machine paths or host name
        text = p.read_text()
        assert "/private" not in text and "/somewhere" not in text and "secret-host" not in text
        assert len(text) < 20_000
    # the page's fair-comparison section: envelope, RAB at the median sigma, both Cert-SSB radii, verdict
    assert "### Against RAB's envelope (fake-exp, cpu scale)" in page
    assert ("| radius | RAB at sigma0 0.25 | RAB envelope (best sigma0) | RAB at sigma0 0.5 (nearest median "
            "sigma 0.480) | Cert-SSB | Cert-SSB, conservative |") in page
    assert "| 0.25 | 50.0 | 80.0 (0.5) | 80.0 | 80.0 | 10.0 |" in page
    assert ("Against the envelope, Cert-SSB beats it at r = 0.5 (+20); ties at r = 0.25; loses at r = 0.0 (-4)"
            in page)
    assert "holds without the paper's assumption" not in page and "can only shrink" not in page
    # the README block: readable rows, four numbers per radius, REDUCED label, link to the page
    assert "old" not in block and block.startswith("a\n") and block.endswith("b\n")
    assert ("| fake-exp | cpu (REDUCED) | trigger onepixel | 0.25 | 100 | 90.0 / 90.0 / 88.0 / 88.0 | "
            "50.0 / 80.0 / 80.0 / 10.0 | 0.0 / 20.0 / 30.0 / 0.0 | - | 1 / 1 / 1 | [other](docs/other.md) |") in block
    assert "all_to_all" not in block and "sigma0-0.25" not in block

    # without the run directories the same pages come back from the kept copy alone
    before = page
    import shutil
    shutil.rmtree(runs)
    (docs / "other.md").unlink()
    write_pages(runs, docs, readme=readme)
    assert (docs / "other.md").read_text() == before
    assert readme.read_text() == block
    assert len(find_kept_cells(docs)) == 4

    # a rerun of one cell replaces its kept copy; the other kept cells stay on the page
    write_cell(runs, "trigger-blending_sigma0-0.25", {"trigger": "blending", "sigma0": 0.25},
               {"hoeffding": _summary(0.25, rab=[0.5, 0.1, 0.0, 0.0], ssb=[0.6, 0.4, 0.0, 0.0],
                                      cons=[0.6, 0.0, 0.0, 0.0], median=0.5)})
    write_pages(runs, docs)
    page = (docs / "other.md").read_text()
    assert "| 0.0 | 50.0 | 50.0 (0.25) | 50.0 | 60.0 | 60.0 |" in page
    assert "trigger onepixel, sigma0 0.5; hoeffding" in page


def test_pages_without_runs_or_kept_cells_is_an_error(tmp_path, capsys):
    with pytest.raises(CertssbError, match="not a directory"):
        write_pages(tmp_path / "nothing", tmp_path / "docs")
    assert main(["pages", "--runs", str(tmp_path / "nothing"), "--docs", str(tmp_path / "docs")]) == 2
    assert "holds no kept cells" in capsys.readouterr().err
