"""The command line: subcommands, printed table, exit codes and messages without tracebacks."""
import json
import subprocess
import sys

import pytest

from certssb.cli import main

TINY = ["--models", "4", "--epochs", "2", "--sigma-steps", "1", "--sigma-draws", "2", "--alpha", "0.2",
        "--max-train", "400", "--max-test", "100", "--quiet"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["run", *TINY, "--out", str(out)]) == 0
    return out


def test_run_prints_table_and_writes_run_dir(run_dir, capsys):
    assert main(["report", "--out", str(run_dir), "--radii", "0,0.05"]) == 0
    out = capsys.readouterr().out
    assert "radius" in out and "rab clean" in out and "cert-ssb triggered" in out
    assert "no defense" in out and str(run_dir) in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["methods"]["rab"]["clean"]["certified_accuracy"]) == ["0.0", "0.05"]
    assert summary["config"]["max_train"] == 400


def test_certify_subcommand_changes_the_bound(run_dir, capsys):
    assert main(["certify", "--out", str(run_dir), "--bound", "clopper-pearson", "--quiet"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["methods"]["cert-ssb"]["bound"] == "clopper-pearson"
    assert "cert-ssb clean" in capsys.readouterr().out


def test_train_subcommand_then_certify(tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["train", *TINY, "--method", "rab", "--out", str(out)]) == 0
    assert "certssb certify" in capsys.readouterr().out
    assert not (out / "summary.json").exists()
    assert main(["certify", "--out", str(out), "--quiet"]) == 0
    assert (out / "certificates-rab-clean.csv").exists()


@pytest.mark.parametrize("args,message", [
    (["run", "--classes", "1,1"], "repeat"),
    (["run", "--alpha", "2"], "alpha"),
    (["run", "--sigma0", "-1"], "sigma0"),
    (["run", "--models", "0"], "models"),
    (["run", "--device", "tpu"], "device"),
    (["run", "--poison-rate", "0.00001"], "selects no sample"),
    (["run", "--dataset", "mnist", "--data-dir", "/nonexistent/place"], "/nonexistent/place"),
    (["run", "--classes", "3,42"], "42"),
    (["certify", "--out", "/nonexistent/run"], "config.json"),
    (["report", "--out", "/nonexistent/run"], "summary.json"),
])
def test_user_errors_exit_2_with_a_message(args, message, tmp_path, capsys):
    if args[0] == "run":
        args = args + ["--out", str(tmp_path / "o"), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "certssb: error:" in err and message in err.split("certssb: error:")[1]
    assert "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="alpha"):
        main(["run", "--alpha", "2", "--debug", "--out", str(tmp_path / "o")])


def test_module_entry_point_and_help():
    res = subprocess.run([sys.executable, "-m", "certssb", "run", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    for flag in ("--dataset", "--data-dir", "--classes", "--trigger", "--delta", "--poison-rate", "--target",
                 "--all-to-all", "--method", "--sigma0", "--models", "--epochs", "--bound", "--alpha",
                 "--radii", "--seed", "--device", "--out"):
        assert flag in res.stdout
    res = subprocess.run([sys.executable, "-m", "certssb", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and "certssb" in res.stdout
