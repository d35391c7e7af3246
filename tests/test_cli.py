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


def test_certify_continues_a_region_store(run_dir, tmp_path, capsys):
    import csv
    import shutil

    import torch

    from certssb.core.files import sha256_file
    from certssb.certify.region_search import resolve_backend
    from certssb.certify.regions import RegionStore

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    # a memory of earlier queries on 8x8 digits: 5 stored balls and 2 abstentions
    g = torch.Generator().manual_seed(0)
    before = RegionStore()
    before.certify_stream(torch.rand(7, 1, 8, 8, generator=g), torch.tensor([0, 1, 2, 0, 1, 2, 0]),
                          torch.full((7,), 0.5),
                          torch.tensor([False, True, False, False, True, False, False]))
    memory = run / "regions-cert-ssb-clean.safetensors"  # continued AND rewritten by this call
    before.save(memory)
    digest = sha256_file(memory)
    assert main(["certify", "--out", str(run), "--regions", str(memory), "--quiet"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    for method in ("rab", "cert-ssb"):
        for split in ("clean", "triggered"):
            after = RegionStore.load(run / f"regions-{method}-{split}.safetensors")
            # the memory is kept as it was; this run's queries are numbered after it
            assert torch.equal(after.centres[:5], before.centres) and torch.equal(after.radii[:5], before.radii)
            assert torch.equal(after.labels[:5], before.labels) and torch.equal(after.queries[:5], before.queries)
            after.check_invariant()
            with open(run / f"certificates-{method}-{split}.csv") as f:
                order = sorted(int(r["query_order"]) for r in csv.DictReader(f))
            assert order == list(range(7, 7 + len(order)))
            assert after.n_queries == 7 + len(order)
            assert summary["methods"][method]["storage_update"][split]["backend"] == resolve_backend("auto", "cpu")
        cont = summary["methods"][method]["storage_update"]["continued"]
        assert cont == {"n": 5, "queries": 7, "path": str(memory), "sha256": digest}
    # a missing file and a store of another input size are user errors
    assert main(["certify", "--out", str(run), "--regions", str(tmp_path / "nope.safetensors"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    small = RegionStore(3)
    small.update(torch.zeros(3), 0, 1.0)
    small.save(tmp_path / "small.safetensors")
    assert main(["certify", "--out", str(run), "--regions", str(tmp_path / "small.safetensors"), "--quiet"]) == 2
    assert "features" in capsys.readouterr().err


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
