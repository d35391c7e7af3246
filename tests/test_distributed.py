"""Scale-out: rank layout from torchrun's environment, sharding by group, vote all-reduce, 2-process runs."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from certssb.certify.votes import Votes
from certssb.core.distributed import Dist, all_reduce_votes, shard
from certssb.errors import CertssbError

REPO = Path(__file__).resolve().parents[1]


def test_single_process_without_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    d = Dist.from_env()
    assert (d.rank, d.world, d.local_rank, d.enabled, d.is_main) == (0, 1, 0, False, True)
    assert d.init(torch.device("cpu")) is d and d.backend is None  # torch.distributed untouched
    v = Votes.zeros(2, 3)
    assert all_reduce_votes(v, d) is v
    assert d.broadcast_int(7) == 7 and d.all_reduce_sum(torch.ones(2)).tolist() == [1.0, 1.0]


def test_rank_layout_from_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    d = Dist.from_env()
    assert (d.rank, d.world, d.local_rank, d.enabled, d.is_main) == (3, 4, 1, True, False)
    assert d.device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(CertssbError, match="not a valid process layout"):
        Dist.from_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(CertssbError, match="RANK='x' is not an integer"):
        Dist.from_env()


def test_shards_cover_every_group_once():
    groups = list(range(11))
    parts = [shard(groups, Dist(rank=r, world=3)) for r in range(3)]
    assert parts[0] == [0, 3, 6, 9] and parts[2] == [2, 5, 8]
    assert sorted(g for p in parts for g in p) == groups
    assert shard(groups, None) == groups


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reduce_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    d = Dist.from_env().init(torch.device("cpu"), timeout_s=120)
    votes = Votes.zeros(3, 2)
    g = torch.Generator().manual_seed(rank)
    votes.add_logits(torch.randn(rank + 1, 3, 2, generator=g))  # rank r holds r + 1 models
    all_reduce_votes(votes, d)
    size = d.broadcast_int(41 if rank == 0 else -1)
    sig = d.broadcast_tensors({"train": torch.arange(4.0)} if rank == 0 else None, ["train"])
    queue.put((rank, votes.models, votes.hard_count.tolist(), size, sig["train"].tolist()))
    d.close()


def test_vote_all_reduce_over_two_gloo_processes():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_reduce_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    expect = Votes.zeros(3, 2)
    for r in range(2):
        expect.add_logits(torch.randn(r + 1, 3, 2, generator=torch.Generator().manual_seed(r)))
    for rank, models, hard, size, sig in results:
        assert models == 3 and hard == expect.hard_count.tolist()  # counts sum exactly
        assert size == 41 and sig == [0.0, 1.0, 2.0, 3.0]


RUN = ["run", "--models", "6", "--group-size", "2", "--epochs", "2", "--sigma-steps", "1", "--sigma-draws", "2",
       "--max-train", "200", "--max-test", "40", "--device", "cpu", "--quiet"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # same arithmetic in every process
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def test_two_process_torchrun_equals_single_process(tmp_path):
    """torchrun --nproc_per_node=2: each rank trains and votes with its groups; same certificates."""
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    subprocess.run([sys.executable, "-m", "certssb", *RUN, "--out", str(single)], check=True, env=_env(),
                   cwd=REPO, capture_output=True, timeout=300)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                          "-m", "certssb", *RUN, "--out", str(sharded)], env=_env(), cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("run directory:") == 1  # only rank 0 prints the results
    for method in ("rab", "cert-ssb"):
        for split in ("clean", "triggered"):
            name = f"certificates-{method}-{split}.csv"
            assert (sharded / name).read_text() == (single / name).read_text(), name
        # both ranks' groups are on disk: rank 0 trained groups 0 and 2, rank 1 group 1
        records = [json.loads(p.read_text()) for p in (sharded / "models" / method / "groups").iterdir()]
        assert sorted(r["models"] for r in records) == [[0, 2], [2, 4], [4, 6]]
    a = json.loads((single / "summary.json").read_text())["methods"]
    b = json.loads((sharded / "summary.json").read_text())["methods"]
    for method in a:
        assert a[method]["clean"] == b[method]["clean"] and a[method]["triggered"] == b[method]["triggered"]
