"""Training loops: one classifier (`train_classifier`) or a group of Mc models at once (`train_group`).

`train_classifier` trains one model: the no-defense baseline (no noise), the
base model of the sigma optimization (fresh BASE-stream noise each epoch) and,
as the plain reference, one smoothed model of the ensemble (`fixed_noise_fn`).
`train_group` trains Mc smoothed models of the ensemble at once as a
`certssb.models.grouped.GroupedModel`: model k on x_i + sigma_i * eps(TRAIN, k, i),
the noise fixed per (model, sample) for all epochs, every model on the same
mini-batch order (`batch_order`), one Adam over the stacked parameters with the
loss summed over models (= Mc independent Adams). Given the same seeds both
give the same models up to float rounding.
"""
from __future__ import annotations

import contextlib
import copy
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CertssbError
from .noise import Stream, check_noise_inputs, noisy_copies
from ..core.seeding import generator
from ..models.grouped import GroupedModel, activation_floats, set_conv_impl
from .engine import Engine

# noise_fn(x_batch, idx_batch, epoch) -> noisy batch, same shape as x_batch.
NoiseFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class Schedule:
    """Optimisation schedule: Adam with a fixed learning rate, as RAB and the paper."""

    epochs: int
    batch_size: int
    lr: float

    def as_dict(self) -> dict:
        return {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr}


def batch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The mini-batch order of an epoch: shared by every model of a run (docs/ARCHITECTURE.md section 5)."""
    return torch.randperm(n, generator=generator(seed, "batch-order", epoch))


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, schedule: Schedule,
                     seed: int, noise_fn: Optional[NoiseFn] = None, device: torch.device | str = "cpu",
                     progress=None) -> nn.Module:
    """Train `model` in place with Adam and cross-entropy; returns it in eval mode.

    x: [N, C, H, W] float32, y: [N] int64, both on any device (batches are
    moved to `device`). `noise_fn` turns a clean batch into its noisy version.
    `progress`: an optional tqdm bar advanced by one per epoch.
    """
    device = torch.device(device)
    fmt = memory_format(x)
    model.to(device=device, memory_format=fmt).train()
    opt = torch.optim.Adam(model.parameters(), lr=schedule.lr)
    n = x.shape[0]
    for epoch in range(schedule.epochs):
        order = batch_order(seed, epoch, n)
        for start in range(0, n, schedule.batch_size):
            idx = order[start:start + schedule.batch_size]
            xb = x[idx].to(device, non_blocking=True)
            yb = y[idx].to(device, non_blocking=True)
            if noise_fn is not None:
                xb = noise_fn(xb, idx.to(device), epoch)
            loss = F.cross_entropy(model(xb.contiguous(memory_format=fmt)), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if progress is not None:
            progress.update(1)
    return model.eval()


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last for image batches: ~30% faster convolutions on CPU (oneDNN) and GPU (cuDNN)."""
    return torch.channels_last if x.dim() == 4 else torch.contiguous_format


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 128,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """Argmax predictions [N] (int64, on CPU) of a plain model on clean inputs."""
    model.eval()
    fmt = memory_format(x)
    out = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device).contiguous(memory_format=fmt)
        out.append(model(xb).argmax(1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


# ---------------------------------------------------------------------------
# the smoothed models of the ensemble


def fixed_noise_fn(x: torch.Tensor, sigma: torch.Tensor, *, seed: int, k: int,
                   device: torch.device | str = "cpu") -> NoiseFn:
    """noise_fn of the plain loop for model k: x_i + sigma_i * eps(seed, TRAIN, k, i), the same every epoch.

    The reference for `train_group`: `train_classifier(model_k, x, y, seed=seed,
    noise_fn=fixed_noise_fn(x, sigma, seed=seed, k=k))` trains the same model as
    slot k of a group, up to float rounding.
    """
    sigma_dev = sigma.to(device)

    def fn(xb: torch.Tensor, idx: torch.Tensor, epoch: int) -> torch.Tensor:
        return noisy_copies(xb, sigma_dev[idx].to(xb.dtype), seed=seed, stream=int(Stream.TRAIN),
                            models=[k], ids=idx)[0]
    return fn


class GroupNoise:
    """The fixed noisy training inputs of a group of models, in the grouped layout.

    `batch(idx)` -> [b, Mc*C, H, W] (channels_last): model slot j sees
    x_i + sigma_i * eps(seed, TRAIN, models[j], i) for i in idx. The draws come
    from `certssb.smoothing.noise.noisy_copies`, one call for the group's consecutive model
    indices. With `cache=True` the whole noisy training set of the group
    ([N, Mc*C, H, W], 4 * N * Mc * D bytes) is drawn once, in chunks of samples,
    and batches are gathered from it (the draws are elementwise, so the values
    are the same either way); otherwise each batch is drawn when needed.
    """

    def __init__(self, x: torch.Tensor, sigma: torch.Tensor, *, seed: int, models: Sequence[int],
                 device: torch.device, cache: bool, chunk: int = 256) -> None:
        self.x, self.sigma, self.seed = x, sigma.to(torch.float32), seed
        self.models = list(models)
        self.device = torch.device(device)
        if self.device.type == "cuda":
            # resident on the GPU: batches are gathered by index there, nothing crosses the bus per step
            self.x, self.sigma = x.to(self.device), self.sigma.to(self.device)
        self.cache: Optional[torch.Tensor] = None
        if cache:
            n = x.shape[0]
            mc = len(self.models)
            c, rest = x.shape[1], tuple(x.shape[2:])
            # stored as [N, H, W, Mc*C]: a gathered batch is a channels_last [b, Mc*C, H, W] view
            store = torch.empty((n, *rest, mc * c), dtype=x.dtype, device=self.device)
            for start in range(0, n, chunk):
                idx = torch.arange(start, min(start + chunk, n))
                store[start:start + len(idx)] = self._draw(idx).movedim(1, -1)
            self.cache = store

    def _draw(self, idx: torch.Tensor) -> torch.Tensor:
        """[b, Mc*C, H, W] noisy inputs for training samples idx (CPU int64)."""
        idx_x = idx.to(self.x.device, non_blocking=True)
        xb = self.x[idx_x].to(self.device, non_blocking=True)
        sb = self.sigma[idx_x].to(self.device, non_blocking=True)
        noisy = noisy_copies(xb, sb, seed=self.seed, stream=int(Stream.TRAIN), models=self.models,
                             ids=idx.to(self.device), check=False)  # [Mc, b, C, H, W]; checked in train_group
        b = xb.shape[0]
        return noisy.transpose(0, 1).reshape(b, len(self.models) * xb.shape[1], *xb.shape[2:])

    def batch(self, idx: torch.Tensor, slots: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Noisy inputs [b, Mc*C, H, W] of samples idx for all slots, or [b, (j1-j0)*C, ...] for slots (j0, j1)."""
        if self.cache is not None:
            if slots is None:
                return self.cache[idx.to(self.device)].movedim(-1, 1)
            c = self.x.shape[1]
            return self.cache[idx.to(self.device), ..., slots[0] * c:slots[1] * c].movedim(-1, 1)
        out = self._draw(idx)
        if slots is not None:
            out = out[:, slots[0] * self.x.shape[1]:slots[1] * self.x.shape[1]]
        return out.contiguous(memory_format=self.memory_format) if out.dim() == 4 else out

    # the layout of drawn batches (an engine with '+nchw' sets contiguous_format)
    memory_format: torch.memory_format = torch.channels_last

    @staticmethod
    def nbytes(x: torch.Tensor, models: int) -> int:
        """Bytes of the cache of a group of `models` models on training set x."""
        return int(x.numel()) * models * x.element_size()


# CPU: the models of a group run forward, backward and Adam in chunks whose activations take
# about this many bytes, so that the chunks running at once (one per core) stay in the caches.
CPU_CHUNK_BYTES = 16 << 20


class ChunkWorkers:
    """Runs the independent chunks of a group on the CPU cores, one single-threaded worker per core.

    On a CPU with T = torch.get_num_threads() > 1 and several chunks, each chunk
    runs on a worker thread with one intra-op thread (torch ops release the
    GIL), so T chunks run at once: the models are independent, no op has to be
    split across cores, and a chunk's arithmetic does not depend on T. Otherwise
    (GPU, one thread, one chunk) the chunks run in order on the calling thread.
    `map` returns the results in the order of `items`.
    """

    def __init__(self, device: torch.device, jobs: int) -> None:
        self.threads = torch.get_num_threads()
        workers = min(self.threads, jobs) if torch.device(device).type == "cpu" else 1
        self.pool = (ThreadPoolExecutor(workers, thread_name_prefix="certssb-chunk",
                                        initializer=torch.set_num_threads, initargs=(1,))
                     if workers > 1 else None)

    def map(self, fn: Callable, items: Sequence) -> list:
        if self.pool is None:
            return [fn(item) for item in items]
        return list(self.pool.map(fn, items))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
            torch.set_num_threads(self.threads)  # the workers set torch's shared count to 1

    def __enter__(self) -> "ChunkWorkers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def default_chunk(model: nn.Module, models: int, sample_shape: Sequence[int], batch_size: int,
                  device: torch.device | str, budget: Optional[int] = None) -> int:
    """Models per forward(/backward) pass: all `models` on a GPU; on a CPU as many as fit `budget` bytes.

    model: one plain model of the architecture (only its activation sizes are
    used). Depends only on the architecture, the input shape, the batch size
    and the device type, so a resumed or sharded run computes exactly the same way.
    """
    if torch.device(device).type != "cpu":
        return models
    budget = CPU_CHUNK_BYTES if budget is None else budget
    per_model = 4 * batch_size * activation_floats(copy.deepcopy(model), sample_shape)
    return int(max(1, min(models, budget // max(per_model, 1))))


def train_group(group: GroupedModel, x: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor, *,
                models: Sequence[int], schedule: Schedule, seed: int, device: torch.device | str = "cpu",
                cache_noise: bool = False, chunk: Optional[int] = None, noise: Optional[GroupNoise] = None,
                progress=None, engine: Optional[Engine] = None) -> GroupedModel:
    """Train the Mc models of `group` at once, in place; returns the group in eval mode.

    x: [N, C, H, W] float32 (CPU), y: [N] int64, sigma: [N] per-sample noise
    levels; models: the Mc model indices k (the TRAIN stream's `a` word) of the
    group's slots, consecutive. Every model sees the mini-batches of
    `batch_order(seed, epoch, N)`; the loss is sum over models of each model's
    mean cross-entropy, so each model gets exactly its own gradient, and Adam
    steps them (elementwise: one Adam over the stacked parameters equals Mc
    separate ones). Each step draws the noisy batch of the whole group at once
    (`GroupNoise`); forward, backward and the Adam step run in chunks of
    `chunk` models (default `default_chunk`: the whole group on a GPU,
    cache-sized on a CPU, where the chunks run concurrently on the cores:
    `ChunkWorkers`), which changes nothing but speed. `noise`: the group's `GroupNoise` if
    already drawn (else drawn here, kept when `cache_noise`). `progress`: an
    optional tqdm bar advanced by one per epoch. `engine`: precision and execution
    variant (`certssb.smoothing.engine`; None: fp32, today's computation). Example::

        g = GroupedModel([spec.new_model(k) for k in range(8, 16)])
        train_group(g, x, y, sigma, models=range(8, 16), schedule=Schedule(20, 128, 1e-3), seed=0)
    """
    device = torch.device(device)
    engine = Engine() if engine is None else engine
    engine.check_device(device)
    models = list(models)
    mc = group.models
    if len(models) != mc:
        raise CertssbError(f"{len(models)} model indices for a group of {mc} models")
    if y.shape != (x.shape[0],) or sigma.shape != (x.shape[0],):
        raise CertssbError(f"x [N, ...], y [N] and sigma [N] must agree in N, got {list(x.shape)}, "
                           f"{list(y.shape)}, {list(sigma.shape)}")
    check_noise_inputs(x, sigma)  # once here: the per-batch draws skip the value checks
    if chunk is None:
        chunk = default_chunk(group._template, mc, tuple(x.shape[1:]), schedule.batch_size, device)
    parts = group.split(chunk) if chunk < mc else [group]
    if engine.graph and len(parts) > 1:
        raise CertssbError(f"engine {engine.name!r}: a CUDA graph captures the whole group; train it in one "
                           f"chunk (chunk={chunk} < {mc} models)")
    fmt = engine.memory_format
    bounds = []
    for part in parts:
        start = bounds[-1][1] if bounds else 0
        bounds.append((start, start + part.models))
        part.to(device=device, memory_format=fmt).train()
        if engine.bmm:
            set_conv_impl(part, "bmm")
    # one Adam per chunk, stepped right after its backward (Adam is elementwise: the same as one for all)
    opts = [torch.optim.Adam(part.parameters(), lr=schedule.lr, **_adam_options(device, engine))
            for part in parts]
    if noise is None:
        noise = GroupNoise(x, sigma, seed=seed, models=models, device=device, cache=cache_noise)
    elif noise.models != models:
        raise CertssbError(f"the noise was drawn for models {noise.models[:3]}..., not {models[:3]}...")
    if not engine.channels_last:
        noise.memory_format = fmt
    c = x.shape[1]
    n = x.shape[0]
    y_dev = y.to(device)

    def group_loss(part: GroupedModel, xp: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """Sum over models of each model's mean loss: model m's gradient is its own."""
        with engine.forward_context(device):
            logits = part.forward_grouped(xp)  # [mc, b, K]
        b = yb.shape[0]
        if logits.dtype in (torch.bfloat16, torch.float16):
            logits = logits.float()  # the loss in float32 (autocast would, too)
        return F.cross_entropy(logits.reshape(part.models * b, -1), yb.repeat(part.models),
                               reduction="sum") / b

    losses = [torch.compile(group_loss, dynamic=False) if engine.compile else group_loss for _ in parts]

    def step(j: int, idx: torch.Tensor, xb: Optional[torch.Tensor], yb: torch.Tensor) -> None:
        """One optimisation step of chunk j on the batch idx (its inputs from xb or the noise cache)."""
        part, (m0, m1) = parts[j], bounds[j]
        if xb is None:
            xp = noise.batch(idx, (m0, m1))
        else:
            xp = xb if len(parts) == 1 else xb[:, m0 * c:m1 * c].contiguous(memory_format=fmt)
        if engine.is_default:
            logits = part.forward_grouped(xp)  # [mc, b, K]
            b = yb.shape[0]
            # sum over models of each model's mean loss: model m's gradient is its own
            loss = F.cross_entropy(logits.reshape(part.models * b, -1), yb.repeat(part.models),
                                   reduction="sum") / b
        else:
            loss = losses[j](part, xp.contiguous(memory_format=fmt) if xp.dim() == 4 else xp, yb)
        opts[j].zero_grad(set_to_none=True)
        loss.backward()
        opts[j].step()

    graphed = _GraphStep(lambda idx: step(0, idx, noise.batch(idx), y_dev[idx]), opts[0],
                         schedule.batch_size, device) if engine.graph else None
    with ChunkWorkers(device, len(parts)) as workers, _cudnn_autotune(device), engine.math_flags(device):
        for epoch in range(schedule.epochs):
            order = batch_order(seed, epoch, n)
            if device.type == "cuda":
                order = order.to(device)  # batches by index on the GPU, where the data live
            for start in range(0, n, schedule.batch_size):
                idx = order[start:start + schedule.batch_size]
                if graphed is not None and idx.shape[0] == schedule.batch_size:
                    graphed(idx)
                    continue
                # drawn: one noisy_copies call for the whole group; cached: each chunk gathers its slots
                xb = noise.batch(idx) if noise.cache is None else None
                yb = y_dev[idx.to(device)]
                workers.map(lambda j: step(j, idx, xb, yb), range(len(parts)))
            if progress is not None:
                progress.update(1)
    if graphed is not None:
        graphed.close()
    if len(parts) > 1:
        group.load_states([st for part in parts for st in part.state_dicts()])
    if engine.bmm:
        set_conv_impl(group, "grouped")
    return group.to(device).eval()


class _GraphStep:
    """The whole training step of a group (noise draw, forward, backward, Adam) as one CUDA graph.

    The first WARMUP full batches run eagerly on a side stream (real steps: they train the
    models, and let cuDNN pick its algorithms and the allocator settle); the next full batch
    is captured (torch.cuda.graph: the same kernels on static buffers) and every later full
    batch copies its indices into the static index buffer and replays the graph. The
    gradients are set to None before the capture, so the captured backward writes them
    afresh on each replay, as an eager step after zero_grad(set_to_none=True) does. The
    smaller last batch of an epoch runs eagerly on the same parameters and Adam state.
    """

    WARMUP = 3

    def __init__(self, step_fn: Callable[[torch.Tensor], None], opt: torch.optim.Optimizer, batch: int,
                 device: torch.device) -> None:
        self.step_fn, self.opt, self.device = step_fn, opt, device
        self.idx = torch.zeros(batch, dtype=torch.int64, device=device)
        self.graph: Optional["torch.cuda.CUDAGraph"] = None
        self.warm = 0

    def __call__(self, idx: torch.Tensor) -> None:
        self.idx.copy_(idx, non_blocking=True)
        if self.graph is not None:
            self.graph.replay()
            return
        if self.warm < self.WARMUP:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self.step_fn(self.idx)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.warm += 1
            return
        self.opt.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step_fn(self.idx)  # zero_grad(set_to_none) inside is a no-op on None gradients
        self.graph = graph
        graph.replay()  # capturing records the kernels without running them: run this batch's step

    def close(self) -> None:
        if self.graph is not None:
            torch.cuda.synchronize(self.device)
            self.graph = None


@contextlib.contextmanager
def _cudnn_autotune(device: torch.device):
    """cuDNN picks its fastest algorithm per shape (grouped convolutions with many groups vary a lot)."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def _adam_options(device: torch.device, engine: Optional[Engine] = None) -> dict:
    """Fused Adam where torch has it for the device: one kernel for all stacked parameters
    (capturable, its step count on the device, under a CUDA-graph engine)."""
    opts = {"fused": True} if device.type in ("cpu", "cuda") else {}
    if engine is not None and engine.graph:
        opts["capturable"] = True
    return opts
