"""Running one job over several processes or machines (docs/ARCHITECTURE.md section 7): ranks, sharding, reductions.

`torchrun --nproc_per_node=N -m certssb run ...` starts N copies of the
command with RANK, WORLD_SIZE, LOCAL_RANK and a rendezvous address in the
environment. `Dist.from_env()` reads them; `Dist.init(device)` joins the
process group (gloo for CPU tensors, NCCL on GPUs, one GPU per local rank).
Without torchrun (WORLD_SIZE unset or 1) everything here is a no-op and
torch.distributed is never touched.

The ensemble is sharded by whole model groups: group g (models
[g*G, (g+1)*G)) belongs to rank g % world. The partition depends only on the
run config (M and the recorded group size G), so every rank trains exactly the
models a single process would, the same way; each rank certifies its own
groups and the integer vote accumulators are summed across ranks (exact, so
the certificates equal the single-process ones).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence, TypeVar

import torch

from ..errors import CertssbError

T = TypeVar("T")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise CertssbError(f"environment variable {name}={value!r} is not an integer; "
                           f"launch with torchrun or unset it") from None


@dataclass
class Dist:
    """This process's place in the job: rank in [0, world), local rank on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None  # set once the process group is up

    @classmethod
    def from_env(cls) -> "Dist":
        """Rank and world size from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); 0/1/0 without."""
        world = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        local = _env_int("LOCAL_RANK", rank)
        if world < 1 or not (0 <= rank < world):
            raise CertssbError(f"RANK={rank} WORLD_SIZE={world} is not a valid process layout; "
                               f"launch with torchrun --nproc_per_node=N")
        return cls(rank=rank, world=world, local_rank=local)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run's results."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """The device of this rank: cuda -> cuda:LOCAL_RANK under torchrun, else unchanged."""
        if self.enabled and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank % max(1, torch.cuda.device_count()))
        return device

    def init(self, device: torch.device, timeout_s: float | None = None) -> "Dist":
        """Join the process group (no-op for a single process); NCCL for CUDA devices, gloo otherwise.

        timeout_s: how long a rank waits for the others at a collective (default
        $CERTSSB_DIST_TIMEOUT, else 4 hours: the others wait while rank 0 runs the sigma search).
        """
        if not self.enabled or self.backend is not None:
            return self
        if timeout_s is None:
            timeout_s = float(os.environ.get("CERTSSB_DIST_TIMEOUT", 4 * 3600))
        import torch.distributed as td
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(self.device(device))
        if not td.is_initialized():
            td.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        self.backend = backend
        return self

    def close(self) -> None:
        """Leave the process group (after a final barrier)."""
        if self.backend is not None:
            import torch.distributed as td
            if td.is_initialized():
                td.barrier()
                td.destroy_process_group()
            self.backend = None

    # ------------------------------------------------------------------ collectives
    def _comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" \
            else torch.device("cpu")

    def barrier(self) -> None:
        if self.backend is not None:
            import torch.distributed as td
            td.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of `t` over ranks (a new tensor on t's device; t itself for one process)."""
        if self.backend is None:
            return t
        import torch.distributed as td
        buf = t.detach().to(self._comm_device()).clone()
        td.all_reduce(buf, op=td.ReduceOp.SUM)
        return buf.to(t.device)

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank `src`'s value of `t` on every rank (same shape and dtype everywhere)."""
        if self.backend is None:
            return t
        import torch.distributed as td
        buf = t.detach().to(self._comm_device()).contiguous().clone()
        td.broadcast(buf, src=src)
        return buf.to(t.device)

    def broadcast_int(self, value: int, src: int = 0) -> int:
        return int(self.broadcast(torch.tensor([int(value)], dtype=torch.int64), src)[0])

    def broadcast_tensors(self, tensors: dict[str, torch.Tensor] | None, names: Sequence[str],
                          src: int = 0) -> dict[str, torch.Tensor]:
        """Rank `src`'s dict of 1-d float32 tensors on every rank (other ranks pass None)."""
        if self.backend is None:
            assert tensors is not None
            return tensors
        out = {}
        for name in names:
            t = tensors[name] if self.rank == src else None
            n = self.broadcast_int(t.numel() if t is not None else 0, src)
            buf = t.to(torch.float32) if t is not None else torch.empty(n, dtype=torch.float32)
            out[name] = self.broadcast(buf, src)
        return out


def shard(items: Sequence[T], dist: Dist | None) -> list[T]:
    """The items owned by this rank: item i belongs to rank i % world (all of them without torchrun)."""
    if dist is None or not dist.enabled:
        return list(items)
    return [item for i, item in enumerate(items) if i % dist.world == dist.rank]


def all_reduce_votes(votes, dist: Dist | None):
    """Sum every accumulator of a `certssb.certify.votes.Votes` over ranks, in place; returns it.

    Integer accumulators (vote counts, fixed-point soft units) sum exactly, so
    the result does not depend on the number of ranks. The model count is summed too.
    """
    if dist is None or dist.backend is None:
        return votes
    for f in dataclasses.fields(votes):
        value = getattr(votes, f.name)
        if isinstance(value, torch.Tensor):
            setattr(votes, f.name, dist.all_reduce_sum(value))
        elif isinstance(value, int) and not isinstance(value, bool):
            setattr(votes, f.name, int(dist.all_reduce_sum(torch.tensor([value], dtype=torch.int64))[0]))
    return votes


__all__ = ["Dist", "shard", "all_reduce_votes"]
