"""Streaming certification (certssb.runner.stream): results, resume after a kill, corruption, input checks, CLI.

Also the resumable votes of the pipeline's own certification (certssb.certify.votes.VoteCheckpoint).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from certssb.runner import pipeline
from certssb.certify.votes import VoteCheckpoint, Votes
from certssb.cli import main
from certssb.runner.config import RunConfig
from certssb.data import load_task
from certssb.errors import CertssbError, CheckpointError, DataError
from certssb.core.files import load_tensors
from certssb.smoothing.noise import SPLIT_OFFSETS
from certssb.certify.regions import RegionStore
from certssb.runner import stream, stream_inputs
from certssb.runner.stream import InputFile, RunCertifier, certify_stream, check_inputs, read_chunk

REPO = Path(__file__).resolve().parents[1]
RUN_CFG = dict(dataset="digits", classes=[0, 1], models=6, epochs=4, base_epochs=4, sigma_steps=1, sigma_draws=2,
               alpha=0.2, bound="clopper-pearson", max_train=300, max_test=60, seed=3, group_size=3)
N_STREAM = 96
CHUNK = 8
OUTPUTS = ("certificates.csv", "regions.safetensors", "summary.json", "progress.json")


class Killed(BaseException):
    """Stands for the process dying at an injected point (not an Exception: nothing may catch it)."""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream") / "run"
    pipeline.run(RunConfig(**RUN_CFG, out=str(out)), progress=False, log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def task():
    return load_task("digits", classes=[0, 1], max_train=300, max_test=60, seed=3)


@pytest.fixture(scope="module")
def stream_files(task, tmp_path_factory):
    """An .npz of N_STREAM inputs (the test digits plus small noise, labels y) and a region store
    planted so that the stream's storage update trims and aligns regions."""
    d = tmp_path_factory.mktemp("inputs")
    g = torch.Generator().manual_seed(7)
    base = task.x_test[torch.arange(N_STREAM) % task.x_test.shape[0]]
    x = (base + 0.03 * torch.randn(base.shape, generator=g)).clamp(0, 1)
    y = task.y_test[torch.arange(N_STREAM) % task.x_test.shape[0]]
    np.savez(d / "inputs.npz", x=x.numpy(), y=y.numpy())
    # balls of both labels at / near some stream inputs: conflicts for either prediction
    cen, lab = [], []
    for j in range(0, 60, 6):
        direction = torch.randn(64, generator=g)
        cen += [x[j].reshape(-1), x[j + 1].reshape(-1) + 0.2 * direction / direction.norm()]
        lab += [0, 1]
    store = RegionStore(dim=64)
    store.certify_stream(torch.stack(cen), torch.tensor(lab), torch.full((len(lab),), 0.1),
                         torch.zeros(len(lab), dtype=torch.bool))
    store.save(d / "planted.safetensors")
    return d / "inputs.npz", d / "planted.safetensors"


@pytest.fixture(scope="module")
def certifier(run_dir):
    return RunCertifier(run_dir, method="cert-ssb")


@pytest.fixture(scope="module")
def reference(certifier, stream_files, tmp_path_factory):
    """An uninterrupted stream job: the outputs every interrupted one must reproduce."""
    inputs, planted = stream_files
    out = tmp_path_factory.mktemp("ref") / "out"
    summary = _job_in_process(certifier, inputs, planted, out)
    assert summary["chunks"] == N_STREAM // CHUNK and summary["chunks_done"] == N_STREAM // CHUNK
    ru = summary["region_update"]
    assert ru["trim"] > 0 and ru["align"] > 0 and ru["none"] > 0, ru  # the store is exercised
    return out


def _job_in_process(run, inputs, planted, out, **kw):
    src = InputFile(inputs, (1, 8, 8), num_classes=2, batch=5)
    return certify_stream(run, src, out, chunk_size=CHUNK, regions=planted, total=len(src), **kw)


def job_main(run: str, inputs: str, planted: str, out: str, delay: float) -> None:
    """The stream job the kill test runs in a subprocess: a slow source, so a kill lands mid-job."""
    src = InputFile(inputs, (1, 8, 8), num_classes=2, batch=5)

    def slow():
        for batch in src:
            time.sleep(delay)
            yield batch
    certify_stream(run, slow(), out, chunk_size=CHUNK, regions=planted, total=len(src), method="cert-ssb")


def assert_same_outputs(a: Path, b: Path) -> None:
    """Every output and every chunk file byte-identical (and tensor-identical) in two job folders."""
    for name in OUTPUTS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ca = sorted(p.name for p in (a / "chunks").iterdir())
    cb = sorted(p.name for p in (b / "chunks").iterdir())
    assert ca == cb and len(ca) == N_STREAM // CHUNK
    for name in ca:
        ta, tb = load_tensors(a / "chunks" / name), load_tensors(b / "chunks" / name)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (name, k)
        assert (a / "chunks" / name).read_bytes() == (b / "chunks" / name).read_bytes(), name


def _done_chunks(out: Path) -> int:
    try:
        return len(json.loads((out / "progress.json").read_text())["chunks"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


# ----------------------------------------------------------------------------- results
def test_stream_of_a_split_reproduces_the_pipeline(run_dir, task, tmp_path):
    """The clean test split streamed with its own sigma ids gives the pipeline's CSV and store, byte for byte."""
    batches = [(task.x_test[i:i + 7], task.y_test[i:i + 7]) for i in range(0, task.x_test.shape[0], 7)]
    out = tmp_path / "clean"
    summary = certify_stream(run_dir, batches, out, chunk_size=32, id_offset=SPLIT_OFFSETS["clean"],
                             method="cert-ssb")
    assert (out / "certificates.csv").read_bytes() == (run_dir / "certificates-cert-ssb-clean.csv").read_bytes()
    assert (out / "regions.safetensors").read_bytes() == \
        (run_dir / "regions-cert-ssb-clean.safetensors").read_bytes()
    saved = json.loads((run_dir / "summary.json").read_text())["methods"]["cert-ssb"]["clean"]
    assert summary["accuracy"] == saved["accuracy"]
    assert summary["certified_accuracy"] == saved["certified_accuracy"]


def test_rab_stream_matches_pipeline_votes_and_keeps_no_store(run_dir, task, tmp_path):
    from certssb.report.certificates import read_certificates_csv
    out = tmp_path / "rab"
    summary = certify_stream(run_dir, [task.x_test], out, chunk_size=25, method="rab")
    assert summary["storage_update"] is False and not (out / "regions.safetensors").exists()
    mine, kinds = read_certificates_csv(out / "certificates.csv")
    theirs, _ = read_certificates_csv(run_dir / "certificates-rab-clean.csv")
    for k in ("predict_raw", "abstain", "radius_raw", "pA_lower", "sigma"):
        assert torch.equal(mine[k], theirs[k]), k
    assert set(kinds) == {""} and "label" not in mine  # no labels given, no storage update
    assert torch.all(mine["sigma"] == 0.25)


def test_models_streamed_per_chunk_give_the_same_certificates(run_dir, certifier, task):
    other = RunCertifier(run_dir, method="cert-ssb", keep_models=False)
    assert other._groups is None and certifier._groups is not None
    a, b = certifier.certify(task.x_test[:20], start=5), other.certify(task.x_test[:20], start=5)
    for f in ("predict", "radius", "pa_lower", "sigma", "abstain"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f


def test_rechunk_makes_exact_chunks_from_ragged_batches():
    batches = [(torch.rand(n, 1, 8, 8), torch.zeros(n, dtype=torch.long)) for n in (3, 11, 1, 9)]
    sizes = [x.shape[0] for x, _ in stream_inputs.rechunk(batches, (1, 8, 8), 2, 5)]
    assert sizes == [5, 5, 5, 5, 4]
    with pytest.raises(DataError, match="some batches come with labels"):
        list(stream_inputs.rechunk([(torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)), torch.rand(2, 1, 8, 8)],
                             (1, 8, 8), 2, 5))


# ----------------------------------------------------------------------------- resume
def test_sigkill_mid_job_then_rerun_gives_identical_outputs(run_dir, stream_files, reference, tmp_path):
    """A real process killed by SIGKILL twice mid-job, then rerun: outputs identical to the uninterrupted run."""
    inputs, planted = stream_files
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}

    def start(delay: float) -> subprocess.Popen:
        code = (f"import test_stream; test_stream.job_main({str(run_dir)!r}, {str(inputs)!r}, {str(planted)!r}, "
                f"{str(out)!r}, {delay})")
        return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=str(REPO),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    done_before = 0
    for wait_for in (1, 4):  # kill once after >= 1 chunk, once after >= 4 chunks (3 more than the first resume)
        proc = start(0.08)
        deadline = time.monotonic() + 120
        while _done_chunks(out) < wait_for and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # still running: the kill lands mid-job
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        done = _done_chunks(out)
        assert done_before <= done < N_STREAM // CHUNK
        assert not (out / "certificates.csv").exists()
        done_before = done
    proc = start(0.0)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert_same_outputs(out, reference)


def test_a_crash_at_every_write_resumes_to_identical_outputs(certifier, stream_files, reference, tmp_path,
                                                             monkeypatch):
    """Dies before each file write of the job in turn (chunk files, progress, final outputs); every rerun ends
    with outputs identical to the uninterrupted run."""
    inputs, planted = stream_files
    writes = {"n": 0, "die_at": -1}
    real = {"save_tensors": stream.save_tensors, "atomic_write_json": stream.atomic_write_json}

    def wrap(fn):
        def inner(*args, **kwargs):
            if writes["n"] == writes["die_at"]:
                raise Killed()
            writes["n"] += 1
            return fn(*args, **kwargs)
        return inner

    real_commit = stream.AtomicFile.commit
    monkeypatch.setattr(stream, "save_tensors", wrap(real["save_tensors"]))
    monkeypatch.setattr(stream, "atomic_write_json", wrap(real["atomic_write_json"]))
    monkeypatch.setattr(stream.AtomicFile, "commit", wrap(real_commit))
    total_writes = 2 * (N_STREAM // CHUNK) + 4  # chunk + progress per chunk; csv, regions, summary, progress
    for die_at in range(total_writes):
        out = tmp_path / f"crash-{die_at}"
        writes.update(n=0, die_at=die_at)
        with pytest.raises(Killed):
            _job_in_process(certifier, inputs, planted, out)
        writes.update(n=0, die_at=-1)
        _job_in_process(certifier, inputs, planted, out)
        assert_same_outputs(out, reference)
    writes.update(n=0, die_at=-1)
    _job_in_process(certifier, inputs, planted, tmp_path / "count")
    assert writes["n"] == total_writes


def _copy(reference: Path, dst: Path) -> Path:
    shutil.copytree(reference, dst)
    (dst / ".lock").unlink(missing_ok=True)
    return dst


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_chunk_is_detected_and_redone(certifier, stream_files, reference, tmp_path, damage):
    inputs, planted = stream_files
    out = _copy(reference, tmp_path / "out")
    path = out / "chunks" / "chunk-00005.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 3]))
    else:
        path.unlink()
    logs = []
    summary = _job_in_process(certifier, inputs, planted, out, log=logs.append)
    assert summary["chunks_resumed"] == 5 and summary["chunks_done"] == N_STREAM // CHUNK - 5
    assert any("chunk 5 is missing or does not match its checksum" in m for m in logs)
    assert_same_outputs(out, reference)


@pytest.mark.parametrize("damage", ["garbage", "delete", "garbage+chunk"])
def test_a_lost_progress_file_is_recovered_from_the_chunks(certifier, stream_files, reference, tmp_path, damage):
    inputs, planted = stream_files
    out = _copy(reference, tmp_path / "out")
    if damage == "delete":
        (out / "progress.json").unlink()
    else:
        (out / "progress.json").write_text('{"format": "certssb.stream-progress", "chunks": [')
    if damage == "garbage+chunk":  # and chunk 3 altered: chunks 0-2 are recovered, the rest redone
        p = out / "chunks" / "chunk-00003.safetensors"
        data = bytearray(p.read_bytes())
        data[-5] ^= 0x01
        p.write_bytes(bytes(data))
    summary = _job_in_process(certifier, inputs, planted, out, log=lambda m: None)
    expected = 3 if damage == "garbage+chunk" else N_STREAM // CHUNK
    assert summary["chunks_resumed"] == expected
    assert summary["chunks_done"] == N_STREAM // CHUNK - expected
    assert_same_outputs(out, reference)


def test_a_finished_job_is_not_recomputed_and_a_lost_output_is_rewritten(certifier, stream_files, reference,
                                                                          tmp_path):
    inputs, planted = stream_files
    out = _copy(reference, tmp_path / "out")
    summary = _job_in_process(certifier, inputs, planted, out)
    assert summary["chunks_done"] == 0 and summary["chunks_resumed"] == N_STREAM // CHUNK
    (out / "certificates.csv").unlink()
    (out / "regions.safetensors").write_bytes(b"junk")
    # half-written temporary files that a SIGKILL during a write leaves behind
    (out / "chunks" / ".chunk-00011.safetensors.k1l2.tmp").write_bytes(b"partial")
    (out / ".progress.json.x9.tmp").write_text("{")
    _job_in_process(certifier, inputs, planted, out)
    assert_same_outputs(out, reference)
    assert not list(out.rglob("*.tmp"))


def test_other_arguments_or_inputs_are_refused(certifier, stream_files, reference, tmp_path):
    inputs, planted = stream_files
    out = _copy(reference, tmp_path / "out")
    src = InputFile(inputs, (1, 8, 8), num_classes=2)
    with pytest.raises(CertssbError, match="differing: chunk_size"):
        certify_stream(certifier, src, out, chunk_size=CHUNK + 1, regions=planted)
    with pytest.raises(CertssbError, match="differing: regions"):
        certify_stream(certifier, src, out, chunk_size=CHUNK)
    with np.load(inputs) as z:
        x0, y = z["x"], z["y"]
    x = x0.copy()
    x[20, 0, 3, 3] = 1.0 - x[20, 0, 3, 3]
    with pytest.raises(CertssbError, match="inputs 16..23 differ from the ones chunk 2"):
        certify_stream(certifier, [(torch.from_numpy(x), torch.from_numpy(y))], out, chunk_size=CHUNK,
                       regions=planted)
    with pytest.raises(CertssbError, match="had already certified"):
        certify_stream(certifier, [(torch.from_numpy(x0[:32]), torch.from_numpy(y[:32]))], out, chunk_size=CHUNK,
                       regions=planted)


def test_two_jobs_cannot_write_into_one_folder(certifier, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(  # another process holds the folder's lock (re-entrant within one process)
        [sys.executable, "-c", "import sys, time\nfrom certssb.runner.lock import run_lock\n"
         "with run_lock(sys.argv[1], 'certssb certify-stream'):\n    print('locked', flush=True)\n"
         "    time.sleep(120)\n", str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CertssbError, match="certssb certify-stream"):
            certify_stream(certifier, [torch.rand(4, 1, 8, 8)], out, chunk_size=4)
    finally:
        holder.kill()
        holder.wait()
    assert certify_stream(certifier, [torch.rand(4, 1, 8, 8)], out, chunk_size=4)["inputs"] == 4


def test_read_chunk_checks_embedded_checksum(reference, tmp_path):
    src = reference / "chunks" / "chunk-00000.safetensors"
    tensors, info = read_chunk(src)
    assert info["n"] == CHUNK and tensors["idx"].tolist() == list(range(CHUNK))
    assert set(tensors) >= {"predict", "radius", "predict_raw", "radius_raw", "sigma", "label", "seg_centres"}
    from certssb.core.files import save_tensors
    tensors["radius"][0] += 0.5  # a consistent safetensors file whose numbers were changed
    bad = tmp_path / "chunk.safetensors"
    from safetensors import safe_open
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    save_tensors(bad, tensors, metadata=meta)
    with pytest.raises(CheckpointError, match="content checksum"):
        read_chunk(bad)


def test_store_files_are_written_streaming_with_the_bytes_of_save_tensors(tmp_path):
    """RegionStore.save streams its tensors (`save_tensor_pieces`); the bytes are those of
    `save_tensors` of the same tensors and metadata, in one piece or in many."""
    import json

    from certssb.certify.region_file import META_KEY, write_store_file
    from certssb.core.files import save_tensors
    g = torch.Generator().manual_seed(1)
    for n in (0, 1, 37):
        store = RegionStore(dim=5)
        if n:  # (RegionStore.certify_stream refuses an empty batch with a reshape error)
            store.certify_stream(torch.rand(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g),
                                 torch.rand(n, generator=g, dtype=torch.float64),
                                 torch.rand(n, generator=g) < 0.2, progress=False)
        a, b, c = (tmp_path / f"{k}{n}.safetensors" for k in "abc")
        sha = store.save(a)
        tensors = {"centres": store.centres, "labels": store.labels, "radii": store.radii, "queries": store.queries}
        meta = {"format": "certssb.regions", "version": 2, "dim": 5, "n": len(store), "counts": store.counts}
        assert save_tensors(b, tensors, metadata={META_KEY: json.dumps(meta)}) == sha
        half = len(store) // 2
        pieces = {k: [t[:half], t[half:]] for k, t in tensors.items()}
        assert write_store_file(c, 5, pieces, store.counts) == sha
        assert a.read_bytes() == b.read_bytes() == c.read_bytes()


# ----------------------------------------------------------------------------- inputs
def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_input_files_in_every_layout(tmp_path):
    g = np.random.default_rng(0)
    x = g.random((23, 1, 8, 8)).astype(np.float32)
    y = g.integers(0, 2, 23)
    ref = torch.from_numpy(x)
    u8 = (x * 255).round().astype(np.uint8)
    from safetensors.numpy import save_file
    save_file({"images": u8[:, 0], "labels": y}, str(tmp_path / "a.safetensors"))
    np.save(tmp_path / "a.npy", x.transpose(0, 2, 3, 1))
    np.savetxt(tmp_path / "labels.txt", y, fmt="%d")
    folder = tmp_path / "imgs"
    folder.mkdir()
    from PIL import Image
    for i in range(23):
        Image.fromarray(u8[i, 0]).save(folder / f"{i:03d}.png")
    cases = [
        (InputFile(_npz(tmp_path / "a.npz", x=x, y=y), (1, 8, 8), num_classes=2, batch=5), ref, True),
        (InputFile(_npz(tmp_path / "b.npz", images=u8[:, 0]), (1, 8, 8), batch=7), torch.from_numpy(u8) / 255.0,
         False),
        (InputFile(tmp_path / "a.safetensors", (1, 8, 8), num_classes=2, batch=6), torch.from_numpy(u8) / 255.0,
         True),
        (InputFile(tmp_path / "a.npy", (1, 8, 8), labels=tmp_path / "labels.txt", num_classes=2), ref, True),
        (InputFile(folder, (1, 8, 8), batch=10), torch.from_numpy(u8) / 255.0, False),
    ]
    for src, want, labelled in cases:
        assert len(src) == 23
        xs, ys = zip(*src)
        assert torch.equal(torch.cat(xs), want.float()), src.path
        assert (ys[0] is not None) == labelled
        if labelled:
            assert torch.cat(ys).tolist() == y.tolist()


@pytest.mark.parametrize("make,match", [
    (lambda p: _npz(p / "f.npz", x=np.zeros((3, 1, 9, 9), np.float32)), r"\[3, 1, 9, 9\] but the run's images"),
    (lambda p: _npz(p / "f.npz", x=np.full((3, 1, 8, 8), np.nan, np.float32)), "NaN or Inf"),
    (lambda p: _npz(p / "f.npz", x=np.full((3, 8, 8), 2.0, np.float32)), r"must lie in \[0, 1\]"),
    (lambda p: _npz(p / "f.npz", x=np.zeros((3, 8, 8), np.int32)), "dtype int32"),
    (lambda p: _npz(p / "f.npz", x=np.zeros((3, 8, 8), np.float32), y=np.array([0, 1, 5])), "task labels 0..1"),
    (lambda p: _npz(p / "f.npz", x=np.zeros((3, 8, 8), np.float32), y=np.array([0, 1])), "must be 3 integers"),
    (lambda p: _npz(p / "f.npz", a=np.zeros((3, 8, 8)), b=np.zeros((3, 8, 8))), "name the inputs x"),
    (lambda p: p / "missing.npz", "does not exist"),
    (lambda p: (p / "f.csv").write_text("1") and p / "f.csv", "unknown file type"),
])
def test_bad_input_files_are_refused_with_a_clear_message(tmp_path, make, match):
    with pytest.raises(DataError, match=match):
        list(InputFile(make(tmp_path), (1, 8, 8), num_classes=2))


def test_truncated_and_pickled_input_files_are_refused(tmp_path):
    p = _npz(tmp_path / "t.npz", x=np.random.default_rng(0).random((50, 1, 8, 8)).astype(np.float32))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        list(InputFile(p, (1, 8, 8)))
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="not a readable .npy"):
        InputFile(tmp_path / "o.npy", (1, 8, 8))
    folder = tmp_path / "imgs"
    folder.mkdir()
    from PIL import Image
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(folder / "a.png")
    with pytest.raises(DataError, match="8x9 pixels but the run's images are 8x8"):
        list(InputFile(folder, (1, 8, 8)))


def test_check_inputs_on_api_batches():
    assert check_inputs(torch.full((2, 1, 8, 8), 255, dtype=torch.uint8), (1, 8, 8)).max() == 1.0
    with pytest.raises(DataError, match="does not match"):
        check_inputs(torch.rand(2, 8, 8), (1, 8, 8))
    with pytest.raises(DataError, match="input 1 of this batch holds NaN"):
        check_inputs(torch.tensor([0.5, float("inf")]).repeat_interleave(64).reshape(2, 1, 8, 8), (1, 8, 8))
    with pytest.raises(DataError, match="expected a tensor"):
        check_inputs([1, 2], (1, 8, 8))


def test_run_directory_problems_are_reported(run_dir, tmp_path):
    with pytest.raises(CertssbError, match="config.json not found"):
        RunCertifier(tmp_path)
    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "format": 99}))
    with pytest.raises(CheckpointError, match="run format|incompatible certssb version"):
        RunCertifier(bad)
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "models" / "base.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="is corrupt|not a valid safetensors"):
        RunCertifier(bad, method="cert-ssb")
    with pytest.raises(CertssbError, match="chunk-size must be an integer >= 1"):
        certify_stream(bad, [], tmp_path / "o", chunk_size=0, method="rab")


# ----------------------------------------------------------------------------- CLI
def test_cli_certify_stream(run_dir, stream_files, tmp_path, capsys):
    inputs, _ = stream_files
    out = tmp_path / "cli"
    args = ["certify-stream", "--out", str(run_dir), "--inputs", str(inputs), "--stream-out", str(out),
            "--chunk-size", "40", "--quiet"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert f"certified {N_STREAM} inputs with cert-ssb" in text and "certified accuracy" in text
    assert main(args) == 0
    assert "already complete" in capsys.readouterr().out
    bad = _npz(tmp_path / "bad.npz", x=np.zeros((3, 1, 28, 28), np.float32))
    assert main(["certify-stream", "--out", str(run_dir), "--inputs", str(bad), "--stream-out",
                 str(tmp_path / "o2"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "28, 28] but the run's images are [C, H, W] = [1, 8, 8]" in err
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- pipeline votes
def test_pipeline_certify_continues_interrupted_votes(run_dir, tmp_path, monkeypatch):
    """`certssb certify` killed after its first model group continues from the saved accumulators and
    writes the same certificates as an uninterrupted certification."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    cfg = RunConfig.from_dict(json.loads((run / "config.json").read_text())["config"])
    cfg.out = str(run)
    names = [f"certificates-{m}-{s}.csv" for m in ("rab", "cert-ssb") for s in ("clean", "triggered")]
    before = {n: (run / n).read_bytes() for n in names}
    real_save = VoteCheckpoint.save
    saved = []

    def save_then_die(self, votes, done):
        real_save(self, votes, done)
        saved.append(sorted(done))
        raise Killed()

    monkeypatch.setattr(VoteCheckpoint, "save", save_then_die)
    with pytest.raises(Killed):
        pipeline.run(cfg, train=False, progress=False, log=lambda m: None)
    assert saved == [[0, 1, 2]] and (run / "votes-rab.partial.safetensors").is_file()
    monkeypatch.setattr(VoteCheckpoint, "save", real_save)
    logs = []
    pipeline.run(cfg, train=False, progress=False, log=logs.append)
    assert any("rab: continuing the votes of an interrupted certification (3 models counted)" in m for m in logs)
    assert not any("cert-ssb: continuing" in m for m in logs)
    assert {n: (run / n).read_bytes() for n in names} == before
    assert not list(run.glob("votes-*.partial.safetensors"))  # removed once the certificates are written


def test_vote_checkpoint_ignores_foreign_or_damaged_files(tmp_path):
    path = tmp_path / "v.safetensors"
    votes = Votes(torch.arange(6).reshape(3, 2), torch.ones(3, 2, dtype=torch.int64), 2)
    VoteCheckpoint(path, "k").save(votes, {4, 5})
    got, done = VoteCheckpoint(path, "k").load(3, 2)
    assert done == {4, 5} and got.models == 2 and torch.equal(got.soft_units, votes.soft_units)
    assert VoteCheckpoint(path, "other").load(3, 2) == (None, set())
    assert VoteCheckpoint(path, "k").load(4, 2) == (None, set())
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # one count altered: the checksum no longer holds
    path.write_bytes(bytes(data))
    assert VoteCheckpoint(path, "k").load(3, 2) == (None, set())
    path.write_bytes(b"junk")
    assert VoteCheckpoint(path, "k").load(3, 2) == (None, set())
