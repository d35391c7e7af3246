"""Certification (docs/THEORY.md): ensemble votes -> pA bound -> radius.

Model k predicts on x + sigma_x * eps_test(k): one fixed test noise per model
(TEST stream, b = 0, shared by all inputs), scaled by the same sigma_x that the
radius uses. Votes are streamed into [B, C] accumulators (soft sums of softmax
probabilities and hard argmax counts), so no [M, B, C] tensor is ever built.
The bound (certssb.certify.bounds) picks the aggregation: soft-vote bounds such as
Hoeffding (RAB, the paper) rank and bound by the soft mean, hard-vote bounds such as
Clopper-Pearson (Bonferroni over classes) by the hard counts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from ..smoothing import training
from .bounds import get_bound, pa_lower
from ..core.radius import HARD, check_alpha, certified_radius, conservative_radius, top2
from ..errors import CertssbError
from ..kernels.dispatch import use_native
from ..kernels.radius import certify_radius
from ..kernels.vote import MAX_MODELS, UNITS_PER_ONE, reference_accumulate, vote_accumulate, vote_top2
from ..smoothing.noise import Stream, check_noise_inputs, noisy_copies
from ..smoothing.training import default_chunk, memory_format
from ..models.grouped import GroupedModel, set_conv_impl, to_grouped_layout
from ..smoothing.engine import Engine

MODES = ("rab", "paper")
# certify_models takes images in [0, 1]; triggered or adversarially perturbed inputs (an unclipped
# blending trigger, a test-time perturbation) may leave that range a little, uint8 (0..255) or
# normalized ((x - mean) / std) inputs leave it by far: those are refused.
PIXEL_SLACK = 1.0


def _check_positive_int(v: object, name: str, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise CertssbError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return v


def _check_capacity(models: int) -> None:
    """Refuse more models than the int64 soft accumulators can sum without wrapping around."""
    if models > MAX_MODELS:
        raise CertssbError(f"{models} models exceed the {MAX_MODELS} that the int64 vote accumulators can "
                           "sum exactly; certify at most that many models per Votes")


@dataclass
class Votes:
    """Streaming vote accumulators over the models of an ensemble.

    Soft scores are fixed point: `soft_units` [B, C] int64 holds the sum over models
    of round(softmax * 2^40), so sums are exact and the same however the models are
    chunked, ordered or sharded over processes (all-reduce the two tensors and
    `models`). `soft_sum` gives them back as float64 probability sums.
    """

    soft_units: torch.Tensor  # [B, C] int64: sum over models of round(softmax * 2^40)
    hard_count: torch.Tensor  # [B, C] int64: number of models whose argmax is each class
    models: int = 0
    # The dtype the noise was scaled in (sigma cast to the inputs' dtype): the sigma the
    # certificate must use is sigma rounded to it (`certify_votes`).
    noise_dtype: torch.dtype = torch.float32

    @classmethod
    def zeros(cls, batch: int, num_classes: int, device: torch.device | str = "cpu") -> "Votes":
        return cls(torch.zeros(batch, num_classes, dtype=torch.int64, device=device),
                   torch.zeros(batch, num_classes, dtype=torch.int64, device=device), 0)

    @property
    def soft_sum(self) -> torch.Tensor:
        """[B, C] float64: sum over models of the softmax probabilities (to 2^-41 per model)."""
        return self.soft_units.double() / float(UNITS_PER_ONE)

    def add_logits(self, logits: torch.Tensor, backend: str | None = None) -> None:
        """Accumulate a chunk of logits [Mc, B, C] (Mc models on the same B inputs).

        backend: "kernels" (fused softmax + vote, `certssb.kernels.vote`), "reference"
        (PyTorch), or None for the current default; both give identical integers up to
        a rounding of the last unit. Logits on another device are moved to the
        accumulators' device.
        """
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[1:] != self.soft_units.shape:
            shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise CertssbError(f"logits must have shape [Mc, {self.soft_units.shape[0]}, "
                               f"{self.soft_units.shape[1]}], got {shape}")
        _check_capacity(self.models + logits.shape[0])
        logits = logits.detach().to(self.soft_units.device)
        if use_native("vote_accumulate", logits.device, dtype=logits.dtype, backend=backend):
            vote_accumulate(logits, self.soft_units, self.hard_count)
        else:
            reference_accumulate(logits, self.soft_units, self.hard_count)
        self.models += logits.shape[0]

    def merge(self, other: "Votes") -> None:
        _check_capacity(self.models + other.models)
        self.soft_units += other.soft_units.to(self.soft_units.device)
        self.hard_count += other.hard_count.to(self.hard_count.device)
        self.models += other.models

    def rows(self, start: int, stop: int) -> "Votes":
        """The accumulators of inputs [start, stop) (views, same model count)."""
        return Votes(self.soft_units[start:stop], self.hard_count[start:stop], self.models, self.noise_dtype)


@dataclass
class Certificates:
    """Per-input certificates of one method on one test split (before any storage update)."""

    predict: torch.Tensor  # [B] int64
    pa_lower: torch.Tensor  # [B] float64
    pb_upper: torch.Tensor  # [B] float64
    radius: torch.Tensor  # [B] float64, 0 where abstaining
    abstain: torch.Tensor  # [B] bool
    sigma: torch.Tensor  # [B] float64
    radius_conservative: torch.Tensor  # [B] float64 (== radius in rab mode)
    bound: str
    mode: str
    alpha: float
    models: int
    extra: dict = field(default_factory=dict)


def collect_votes(models: Iterable, x: torch.Tensor, sigma: torch.Tensor, *, seed: int, num_classes: int,
                  batch_size: int = 128, device: torch.device | str = "cpu", progress=None,
                  votes: Votes | None = None,
                  on_group: Callable[[list[int], Votes], None] | None = None,
                  engine: Engine | None = None) -> Votes:
    """Stream the ensemble's votes on x [B, C, H, W] with per-input noise levels sigma [B].

    `models` yields any mix of
      - ``(ks, group)``: a `certssb.models.grouped.GroupedModel` of len(ks) models with
        indices ks; all of them run at once on each batch of inputs (one forward
        of [Mc, b, C, H, W]), so each model is loaded once for all inputs;
      - ``(k, module)`` pairs, or plain modules (index = position).
    Model k sees x + sigma * eps(seed, TEST, k, 0): one `noisy_copies` call per
    batch for the whole group. `batch_size`: inputs per forward pass.
    `progress`: a tqdm bar advanced by 1 per model. `votes`: accumulators to continue
    (e.g. restored by `VoteCheckpoint` after an interruption; the models in `models` must
    be the ones not yet counted), else zeros. `on_group(ks, votes)` is called after each
    group's votes are in (to checkpoint them). `engine`: the precision and execution
    variant of the models' forward (`certssb.smoothing.engine`; None: fp32, today's
    computation); the noise is drawn exactly as always, in x's dtype, and the logits
    vote in float32. Example::

        votes = collect_votes(ens.iter_groups(), x, sigma, seed=0, num_classes=2)
    """
    device = torch.device(device)
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise CertssbError("x must be a floating tensor of inputs [B, C, H, W]")
    if not isinstance(sigma, torch.Tensor) or sigma.shape != (x.shape[0],):
        got = list(sigma.shape) if isinstance(sigma, torch.Tensor) else type(sigma).__name__
        raise CertssbError(f"sigma must be a tensor of shape [{x.shape[0]}] (one noise level per input), got {got}")
    _check_positive_int(num_classes, "num_classes", 2)
    _check_positive_int(batch_size, "batch_size", 1)
    check_noise_inputs(x, sigma)  # finite x, finite sigma > 0: once, not per batch
    n = x.shape[0]
    if votes is None:
        votes = Votes.zeros(n, num_classes)
    elif tuple(votes.soft_units.shape) != (n, num_classes) or votes.soft_units.device.type != "cpu":
        raise CertssbError(f"votes to continue must be CPU accumulators of shape [{n}, {num_classes}], got "
                           f"{list(votes.soft_units.shape)} on {votes.soft_units.device}")
    votes.noise_dtype = x.dtype  # the noise below is scaled by sigma cast to x's dtype
    for pos, item in enumerate(models):
        ks, forward = _as_group(item, pos, memory_format(x))
        parts = _cpu_chunks(ks, forward, tuple(x.shape[1:]), batch_size, device)
        if engine is not None and not engine.is_default:
            parts = [(j0, j1, _engine_forward(f, engine, device)) for j0, j1, f in parts]

        def run(part, noisy: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():  # grad mode is per thread
                return part[2](noisy[part[0]:part[1]])

        flags = engine.math_flags(device) if engine is not None else contextlib.nullcontext()
        with torch.no_grad(), training.ChunkWorkers(device, len(parts)) as workers, flags:
            for start in range(0, n, batch_size):
                xb = x[start:start + batch_size].to(device)
                sb = sigma[start:start + batch_size].to(device=device, dtype=xb.dtype)
                noisy = noisy_copies(xb, sb, seed=seed, stream=int(Stream.TEST), models=ks, ids=None,
                                     check=False)
                # [Mc, b, ...] -> logits [mc, b, classes] per chunk (concurrently on CPU cores), in order
                for (j0, _, _), logits in zip(parts, workers.map(lambda part: run(part, noisy), parts)):
                    if logits.shape[-1] != num_classes:
                        raise CertssbError(f"model {ks[j0]} outputs {logits.shape[-1]} classes, "
                                           f"expected {num_classes}")
                    add_logits_rows(votes, logits.float(), start)
        votes.models += len(ks)
        _check_capacity(votes.models)
        if on_group is not None:
            on_group(ks, votes)
        if progress is not None:
            progress.update(len(ks))
    return votes


def _cpu_chunks(ks: list[int], forward, sample_shape, batch_size: int, device: torch.device):
    """[(j0, j1, forward)]: on a CPU a large group runs in cache-sized sub-groups, elsewhere whole."""
    if not isinstance(forward, GroupedModel) or device.type != "cpu" or forward.models == 1:
        return [(0, len(ks), forward)]
    # no activations are kept for a backward pass: twice the training chunk
    c = default_chunk(forward._template, forward.models, sample_shape, batch_size, device,
                      budget=2 * training.CPU_CHUNK_BYTES)
    if c >= forward.models:
        return [(0, len(ks), forward)]
    return [(i, i + part.models, part.eval()) for i, part in zip(range(0, len(ks), c), forward.split(c))]


def _engine_forward(forward, engine: Engine, device: torch.device):
    """forward (noisy [Mc, b, ...] -> logits [Mc, b, K]) run by `engine`: its precision (autocast),
    convolution implementation, memory format and compilation. A CUDA graph is a training-step
    option only: the votes' forward runs eagerly (or compiled)."""
    if isinstance(forward, GroupedModel):
        group = forward
        if engine.bmm:
            set_conv_impl(group, "bmm")
        group.to(memory_format=engine.memory_format)

        def fwd(noisy: torch.Tensor) -> torch.Tensor:
            xg = to_grouped_layout(noisy)
            if not engine.channels_last:
                xg = xg.contiguous()
            with engine.forward_context(device):
                return group.forward_grouped(xg)
    else:
        def fwd(noisy: torch.Tensor) -> torch.Tensor:
            with engine.forward_context(device):
                return forward(noisy)
    return torch.compile(fwd, dynamic=False) if engine.compile else fwd


def _as_group(item, pos: int, fmt: torch.memory_format):
    """(model indices, forward: noisy [Mc, b, ...] -> logits [Mc, b, K]) for one item of `models`."""
    if isinstance(item, tuple) and len(item) == 2 and not isinstance(item[0], (int, torch.Tensor)):
        ks, group = item
        ks = [int(k) for k in ks]
        if getattr(group, "models", len(ks)) != len(ks):
            raise CertssbError(f"a group of {group.models} models came with {len(ks)} model indices")
        group.eval()
        return ks, group
    k, model = item if isinstance(item, tuple) else (pos, item)
    model.to(memory_format=fmt).eval()

    def forward(noisy: torch.Tensor) -> torch.Tensor:
        xb = noisy[0]
        return model(xb.contiguous(memory_format=fmt)).unsqueeze(0)
    return [int(k)], forward


def add_logits_rows(votes: Votes, logits: torch.Tensor, start: int) -> None:
    """Accumulate logits [Mc, b, C] of inputs start..start+b-1 into `votes` (the model count is left alone).

    The chunk's votes are accumulated on their own (`Votes.add_logits`) and added
    to rows start..start+b-1 of every accumulator, so the totals do not depend on
    how the inputs are batched.
    """
    sub = Votes.zeros(logits.shape[1], logits.shape[2])
    sub.add_logits(logits)
    for f in dataclasses.fields(votes):
        acc = getattr(votes, f.name)
        if isinstance(acc, torch.Tensor):
            acc[start:start + logits.shape[1]] += getattr(sub, f.name)


class VoteCheckpoint:
    """The vote accumulators of an unfinished certification, saved after every model group.

    A killed `certssb certify` / `run` continues voting with the groups not yet counted
    instead of starting over. The file (safetensors: `soft_units`, `hard_count` int64 [N, C])
    records the model indices already counted, the sha256 of the two tensors, and a `key`
    naming everything the votes depend on (models, inputs, sigmas, seed, batch size,
    backend, device). A file with another key, another shape or a wrong checksum is ignored:
    voting starts over. The accumulators are exact integer sums, so continued votes equal
    uninterrupted ones bit for bit. Example::

        ckpt = VoteCheckpoint(run / "votes-rab.partial.safetensors", key)
        votes, done = ckpt.load(n, num_classes)          # (None, set()) when nothing to continue
        groups = (g for g in ens.iter_groups() if not set(g[0]) <= done)
        votes = collect_votes(groups, x, sigma, seed=0, num_classes=2, votes=votes,
                              on_group=ckpt.saver(done))
        ckpt.clear()                                     # once the certificates are written
    """

    FORMAT = "certssb.partial-votes"

    def __init__(self, path: str | Path, key: str) -> None:
        self.path = Path(path)
        self.key = str(key)

    @staticmethod
    def _digest(soft_units: torch.Tensor, hard_count: torch.Tensor) -> str:
        h = hashlib.sha256()
        for t in (soft_units, hard_count):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def load(self, n: int, num_classes: int) -> tuple[Votes | None, set[int]]:
        """(votes so far, model indices counted) if the file continues this certification, else (None, set())."""
        from safetensors import safe_open

        from ..core.files import load_tensors

        if not self.path.is_file():
            return None, set()
        try:
            tensors = load_tensors(self.path)
            with safe_open(str(self.path), "pt") as f:
                info = json.loads((f.metadata() or {})["certssb"])
            soft, hard = tensors["soft_units"], tensors["hard_count"]
            done = {int(k) for k in info["done"]}
            ok = (info.get("format") == self.FORMAT and info.get("key") == self.key
                  and soft.dtype == hard.dtype == torch.int64
                  and tuple(soft.shape) == tuple(hard.shape) == (n, num_classes)
                  and info.get("sha256") == self._digest(soft, hard) and int(info["models"]) == len(done))
        except Exception:  # unreadable, truncated or foreign: start over
            return None, set()
        if not ok:
            return None, set()
        return Votes(soft.clone(), hard.clone(), len(done)), done

    def save(self, votes: Votes, done: set[int]) -> None:
        """Write the accumulators and the counted model indices atomically."""
        from ..core.files import save_tensors

        info = {"format": self.FORMAT, "key": self.key, "models": votes.models, "done": sorted(done),
                "sha256": self._digest(votes.soft_units, votes.hard_count)}
        save_tensors(self.path, {"soft_units": votes.soft_units, "hard_count": votes.hard_count},
                     metadata={"certssb": json.dumps(info)})

    def saver(self, done: set[int]) -> Callable[[list[int], Votes], None]:
        """An `on_group` callback for `collect_votes` that adds each group to `done` and saves."""
        def on_group(ks: list[int], votes: Votes) -> None:
            done.update(int(k) for k in ks)
            self.save(votes, done)
        return on_group

    def clear(self) -> None:
        """Remove the file (the certification it belonged to is finished)."""
        self.path.unlink(missing_ok=True)


def certify_votes(votes: Votes, sigma: torch.Tensor, *, bound: str = "hoeffding", alpha: float = 0.001,
                  mode: str = "rab", sigma_train_min: float | None = None,
                  backend: str | None = None) -> Certificates:
    """Certificates from accumulated votes.

    bound: a registered bound (certssb.certify.bounds); "hoeffding": top class and pA_hat
    from the soft mean; "clopper-pearson": top class and count from the hard votes; a bound
    on the soft or hard statistic likewise. pB_upper = 1 - pA_lower,
    R = sigma/2 (PhiInv(pA_lower) - PhiInv(pB_upper)); abstain when pA_lower <= 1/2.
    mode "paper" also gives the conservative radius rho * min(sigma_x, sigma_train_min).
    backend: "kernels" (vote_top2 + radius_certify ops), "reference" (PyTorch + SciPy), or
    None for the current default; both give the same certificates (radii to ~1e-12). A bound
    without a native kernel id runs on the reference path under either backend.
    """
    spec = get_bound(bound)
    if mode not in MODES:
        raise CertssbError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if not isinstance(votes, Votes):
        raise CertssbError(f"votes must be a Votes (from collect_votes), got {type(votes).__name__}")
    if votes.models < 1:
        raise CertssbError("no model votes were collected; an ensemble needs at least one model (M >= 1)")
    _check_capacity(votes.models)
    check_alpha(alpha)
    b = votes.soft_units.shape[0]
    if not isinstance(sigma, torch.Tensor) or tuple(sigma.shape) != (b,):
        got = list(sigma.shape) if isinstance(sigma, torch.Tensor) else type(sigma).__name__
        raise CertssbError(f"sigma must be a tensor of shape [{b}] (one noise level per input), got {got}")
    if b and not bool((torch.isfinite(sigma) & (sigma > 0)).all()):
        raise CertssbError("sigma must be finite and > 0 everywhere (noise levels in [0, 1] pixel units); "
                           "check the sigma file / settings")
    if mode == "paper" and sigma_train_min is not None and not (
            isinstance(sigma_train_min, (int, float)) and math.isfinite(sigma_train_min) and sigma_train_min > 0):
        raise CertssbError(f"sigma_train_min must be finite and > 0, got {sigma_train_min!r}")
    m = votes.models
    c = votes.soft_units.shape[1]
    by_count = spec.statistic == HARD
    # certify with the sigma the noise was drawn with: sigma rounded to the votes' noise dtype
    sigma64 = sigma.to(votes.noise_dtype).double().cpu()
    if use_native("radius_certify", votes.soft_units.device, backend=backend) and spec.kernel is not None:
        cls, units, counts = vote_top2(votes.soft_units, votes.hard_count, by_count=by_count)
        top_cls = cls[:, 0].cpu()
        top_score = (units[:, 0].double() / (float(UNITS_PER_ONE) * m)).cpu()
        top_count = counts[:, 0].cpu()
        pa, pb, radius, abstain = certify_radius(top_score, top_count, sigma64, models=m, alpha=alpha,
                                                 num_classes=c, bound=spec.kernel)
    else:
        soft_units, hard_count = votes.soft_units.cpu(), votes.hard_count.cpu()
        # Ranking by the integer units equals ranking by the soft mean, ties included.
        top_cls, _, _, _ = top2(hard_count if by_count else soft_units)
        top_count = hard_count.gather(1, top_cls[:, None])[:, 0]
        top_score = soft_units.gather(1, top_cls[:, None])[:, 0].double() / (float(UNITS_PER_ONE) * m)
        pa = pa_lower(bound, top_score=top_score, top_count=top_count, m=m, alpha=alpha, num_classes=c)
        radius, pb, abstain = certified_radius(pa, sigma64)
    if mode == "paper":
        if sigma_train_min is None:
            raise CertssbError("paper mode needs sigma_train_min for the conservative radius")
        conservative = conservative_radius(pa, sigma64, float(sigma_train_min))
    else:
        conservative = radius.clone()
    return Certificates(predict=top_cls, pa_lower=pa, pb_upper=pb, radius=radius, abstain=abstain,
                        sigma=sigma64, radius_conservative=conservative, bound=bound, mode=mode,
                        alpha=alpha, models=m)


def certify_models(models: Iterable[nn.Module], x: torch.Tensor, sigma: torch.Tensor | float, *,
                   num_classes: int, seed: int = 0, bound: str = "hoeffding", alpha: float = 0.001,
                   mode: str = "rab", sigma_train_min: float | None = None, batch_size: int = 128,
                   device: torch.device | str = "cpu") -> Certificates:
    """Certify a user's own ensemble on user tensors.

    models: the M smoothed models (each trained on noisy data, as RAB / Cert-SSB).
    x: [B, C, H, W] images in [0, 1] (perturbed ones within PIXEL_SLACK of it), finite;
    sigma: a float (RAB) or per-input [B] (Cert-SSB), finite and > 0. Bad input raises
    CertssbError (shape, NaN/Inf, uint8 or normalized scale, sigma, alpha, bound, mode, M < 1).
    Returns `Certificates`. Example::

        cert = certssb.certify_models(models, x, 0.25, num_classes=2)
        cert.radius  # [B] certified L2 radii, 0 where cert.abstain
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        got = f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise CertssbError(f"x must be a float tensor of shape [B, C, H, W], got {got}")
    if x.numel():
        lo, hi = (float(v) for v in torch.aminmax(x.detach()))
        if math.isnan(lo) or math.isnan(hi) or math.isinf(lo) or math.isinf(hi):
            raise CertssbError("x contains NaN or Inf values; pass images as floats in [0, 1]")
        if lo < -PIXEL_SLACK or hi > 1.0 + PIXEL_SLACK:
            raise CertssbError(f"x holds values in [{lo:.4g}, {hi:.4g}], but inputs must be images in [0, 1] "
                               f"(triggered or perturbed ones may stray up to {PIXEL_SLACK:g} beyond): sigma "
                               "and radii are in [0, 1] pixel units, so divide uint8 pixels by 255 and do not "
                               "normalize")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, torch.Tensor)):
        raise CertssbError(f"sigma must be a number or a [B] tensor, got {type(sigma).__name__}")
    sig = torch.as_tensor(sigma, dtype=torch.float32)
    if sig.dim() == 0:
        sig = sig.expand(x.shape[0]).clone()
    check_alpha(alpha)
    get_bound(bound)
    if mode not in MODES:
        raise CertssbError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if isinstance(models, nn.Module):
        raise CertssbError("models must be a list of models (the ensemble), not one module; wrap it: [model]")
    votes = collect_votes(models, x, sig, seed=seed, num_classes=num_classes,
                          batch_size=batch_size, device=device)
    return certify_votes(votes, sig, bound=bound, alpha=alpha, mode=mode,
                         sigma_train_min=sigma_train_min)


__all__ = ["MODES", "Votes", "Certificates", "collect_votes", "add_logits_rows", "certify_votes",
           "certify_models", "VoteCheckpoint"]
