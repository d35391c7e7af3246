"""The run-directory lock: one writer per run directory, released by the OS when the holder dies."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from certssb.runner import pipeline
from certssb import RunConfig
from certssb.cli import main
from certssb.core.distributed import Dist
from certssb.errors import CertssbError
from certssb.core.files import atomic_write_json
from certssb.runner.lock import LOCK_NAME, holder, run_lock

HOLDER = """
import sys, time
from certssb.runner.lock import run_lock
with run_lock(sys.argv[1], "certssb run"):
    print("locked", flush=True)
    time.sleep(120)
"""


def _start_holder(out: Path) -> subprocess.Popen:
    """A second process that takes the lock of `out` and sleeps; returns once it holds it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if line.strip() != "locked":
        proc.kill()
        raise AssertionError(f"lock holder failed to start: {line!r} {proc.stderr.read()}")
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()


def test_second_process_is_refused_until_the_holder_is_killed(tmp_path, capsys):
    out = tmp_path / "run"
    proc = _start_holder(out)
    try:
        info = holder(out)
        assert info["pid"] == proc.pid and info["host"] == socket.gethostname()
        assert info["command"] == "certssb run" and "T" in info["started"]
        # the Python API
        with pytest.raises(CertssbError) as refused:
            with run_lock(out, "certssb report"):
                pass
        msg = str(refused.value)
        assert f"pid {proc.pid} on host {socket.gethostname()}" in msg and "certssb run" in msg
        assert info["started"] in msg and "wait for it to finish, or pass another --out" in msg
        # the pipeline (nothing is written: config.json would be the first file)
        with pytest.raises(CertssbError, match=f"in use by pid {proc.pid}"):
            pipeline.run(RunConfig(models=2, epochs=1, out=str(out)), progress=False, log=lambda s: None)
        assert not (out / "config.json").exists()
        # the CLI: report (after its own "no summary.json" check) and certify
        atomic_write_json(out / "summary.json", {"config": {"radii": [0.0]}, "methods": {}})
        assert main(["report", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("certssb: error: run directory") and f"pid {proc.pid}" in err
        assert "Traceback" not in err
    finally:
        _kill(proc)
    # SIGKILL leaves the record but the OS dropped the lock: the next process takes it
    assert holder(out)["pid"] == proc.pid
    with run_lock(out, "certssb report") as mine:
        assert mine["pid"] == os.getpid() and holder(out)["pid"] == os.getpid()
    assert main(["report", "--out", str(out)]) == 0


def test_lock_is_reentrant_in_one_process_and_released_after(tmp_path):
    out = tmp_path / "run"
    with run_lock(out, "certssb certify") as outer:
        with run_lock(out, "certssb run") as inner:  # the CLI's certify around pipeline.run
            assert inner["pid"] == outer["pid"] == os.getpid()
        with run_lock(out, "certssb report"):
            pass
        assert holder(out)["command"] == "certssb certify"
    # released: a child process can take it now
    proc = _start_holder(out)
    try:
        assert holder(out)["pid"] == proc.pid
    finally:
        _kill(proc)
    assert (out / LOCK_NAME).is_file()  # never deleted (see certssb.runner.lock)


def test_only_rank_0_takes_the_lock(tmp_path, monkeypatch):
    out = tmp_path / "run"
    proc = _start_holder(out)
    try:
        with run_lock(out, "certssb run", enabled=False) as info:
            assert info is None
        ran = []
        monkeypatch.setattr(pipeline, "_run", lambda cfg, dist, **kw: ran.append(dist.rank) or {})
        monkeypatch.setattr(Dist, "from_env", classmethod(lambda cls: Dist(rank=1, world=2)))
        assert pipeline.run(RunConfig(models=2, epochs=1, out=str(out))) == {}
        monkeypatch.setattr(Dist, "from_env", classmethod(lambda cls: Dist(rank=0, world=2)))
        with pytest.raises(CertssbError, match="in use by"):
            pipeline.run(RunConfig(models=2, epochs=1, out=str(out)))
        assert ran == [1]
    finally:
        _kill(proc)


def test_two_racing_processes_one_wins(tmp_path):
    out, release = tmp_path / "run", tmp_path / "release"
    code = ("import os, sys, time\nfrom certssb.runner.lock import run_lock\nfrom certssb.errors import CertssbError\n"
            "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
            "try:\n    with run_lock(sys.argv[1], 'certssb run'):\n        print('won', flush=True)\n"
            "        while not os.path.exists(sys.argv[3]):\n            time.sleep(0.05)\n"
            "except CertssbError:\n    print('refused', flush=True)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    start = str(time.time() + 6)  # both try at the same moment, once certssb is imported
    procs = [subprocess.Popen([sys.executable, "-c", code, str(out), start, str(release)],
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    try:
        results = sorted(p.stdout.readline().strip() for p in procs)  # the winner holds until released
    finally:
        release.write_text("")
        for p in procs:
            p.communicate(timeout=60)
    assert results == ["refused", "won"]


def test_a_symlinked_lock_file_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, out / LOCK_NAME)
    with pytest.raises(CertssbError, match="is a symlink"):
        with run_lock(out, "certssb run"):
            pass
    assert victim.read_text() == "precious"


def test_out_that_is_a_file_is_a_clear_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CertssbError, match="cannot create the run directory"):
        with run_lock(f, "certssb run"):
            pass
    assert holder(tmp_path) is None
