"""How a group of models computes: precision and execution variants of the grouped forward/backward.

An engine is an explicit, recorded setting (`RunConfig.engine`, `--engine`): a precision
and a few execution options, written as ``PRECISION[+OPTION...]``, e.g. ``fp32``,
``bf16+compile``, ``tf32+bmm+graph``.

Precisions:

* ``fp32``: float32 throughout with torch's default flags, exactly the computation of the
  engine-less code (on a GPU, cuDNN may then use TF32 inside convolutions, which is torch's
  default; matrix products stay full float32).
* ``tf32``: float32 tensors, TF32 tensor cores allowed for convolutions and matrix products
  (``torch.backends.cuda.matmul.allow_tf32`` and ``cudnn.allow_tf32``; no effect on a CPU).
* ``bf16``: ``torch.autocast`` to bfloat16 around the forward pass (and so its backward): the
  weights stay float32 (master weights), gradients arrive in float32, Adam's moments are float32;
  the loss and the logits that vote are float32.

Options:

* ``bmm``: convolutions as unfold + one batched matrix product over the model axis
  (`certssb.models.grouped.GroupedConv2d`), instead of cuDNN/oneDNN's grouped convolution;
* ``nchw``: contiguous (NCHW) activations instead of channels_last;
* ``compile``: ``torch.compile`` of the group's forward + loss (its backward is compiled by
  AOTAutograd); the noise draw and the fused Adam stay outside;
* ``graph``: CUDA only: the whole training step (noise draw, forward, backward, Adam) captured
  once as a CUDA graph and replayed; a CUDA-graph engine is refused on a CPU.

Training-set residency is not an option: on a GPU the training set, labels and sigmas always
sit in GPU memory and batches are taken by index (no DataLoader); the noise is drawn inside
each step by the fused kernel and never stored. None of this changes a number.

``auto`` resolves per device and architecture (`resolve_engine`): on a CPU always ``fp32``
(today's computation, bit for bit); on a GPU the entry of `AUTO_CUDA` for the architecture.
The resolved engine is written into config.json, summary.json and the ensemble's manifest.
Why a reduced precision does not weaken a certificate: docs/THEORY.md section 7.6.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from ..errors import CertssbError

PRECISIONS = ("fp32", "tf32", "bf16")
OPTIONS = ("bmm", "nchw", "compile", "graph")
DEFAULT = "fp32"
# The engine "auto" picks on a GPU, per architecture (others: AUTO_CUDA_DEFAULT). Chosen from
# benchmarks/bench_training.py --engines on an H100 (docs/results/training.md, CUDA section);
# until that measurement is in, bf16 autocast with cuDNN's grouped convolutions: the variant
# that moves the convolutions and matrix products onto the bf16 tensor cores with the fewest
# moving parts (no compilation, no capture).
AUTO_CUDA: dict[str, str] = {}
AUTO_CUDA_DEFAULT = "bf16"


@dataclass(frozen=True)
class Engine:
    """One engine: a precision and execution options (see the module docstring)."""

    precision: str = DEFAULT
    bmm: bool = False
    channels_last: bool = True
    compile: bool = False
    graph: bool = False

    @property
    def name(self) -> str:
        opts = [o for o, on in (("bmm", self.bmm), ("nchw", not self.channels_last),
                                ("compile", self.compile), ("graph", self.graph)) if on]
        return "+".join([self.precision, *opts])

    @property
    def is_default(self) -> bool:
        """True for the engine-less computation (fp32, grouped convolutions, channels_last, eager)."""
        return self == Engine()

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def activation_bytes(self) -> int:
        """Bytes per activation value (for the group-size estimate)."""
        return 2 if self.precision == "bf16" else 4

    def as_dict(self) -> dict:
        return {"name": self.name, "precision": self.precision, "conv": "bmm" if self.bmm else "grouped",
                "memory_format": "channels_last" if self.channels_last else "nchw",
                "compile": self.compile, "cuda_graph": self.graph}

    def check_device(self, device: torch.device | str) -> None:
        if self.graph and torch.device(device).type != "cuda":
            raise CertssbError(f"engine {self.name!r}: CUDA-graph capture ('graph') needs a CUDA device, "
                               f"not {torch.device(device).type}; drop '+graph' (or use --engine auto)")

    @contextlib.contextmanager
    def forward_context(self, device: torch.device | str) -> Iterator[None]:
        """Around a forward pass (its backward follows the autocast): autocast for bf16, else nothing."""
        device = torch.device(device)
        if self.precision == "bf16":
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                yield
        else:
            yield

    @contextlib.contextmanager
    def math_flags(self, device: torch.device | str) -> Iterator[None]:
        """For the whole training / voting: the TF32 flags of a tf32 engine on a GPU (restored after)."""
        device = torch.device(device)
        if self.precision != "tf32" or device.type != "cuda":
            yield
            return
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def parse_engine(text: str) -> Engine:
    """'bf16+compile' -> Engine(precision='bf16', compile=True); CertssbError on anything else."""
    if not isinstance(text, str) or not text:
        raise CertssbError(f"--engine must be 'auto' or PRECISION[+OPTION...], got {text!r}")
    parts = text.split("+")
    prec, opts = parts[0], parts[1:]
    if prec not in PRECISIONS:
        raise CertssbError(f"unknown engine precision {prec!r} in {text!r}; choose one of "
                           f"{', '.join(PRECISIONS)} (or 'auto'), then options {', '.join(OPTIONS)} joined by '+'")
    bad = [o for o in opts if o not in OPTIONS]
    if bad or len(set(opts)) != len(opts):
        raise CertssbError(f"engine {text!r}: unknown or repeated options {bad or opts}; options: "
                           f"{', '.join(OPTIONS)}")
    return Engine(precision=prec, bmm="bmm" in opts, channels_last="nchw" not in opts,
                  compile="compile" in opts, graph="graph" in opts)


def check_engine(text: str) -> None:
    if text != "auto":
        parse_engine(text)


def resolve_engine(text: Optional[str], device: torch.device | str, arch: Optional[str] = None) -> Engine:
    """The engine a run uses: `text` ('auto' or None -> per device and architecture), checked for the device."""
    device = torch.device(device)
    if text is None or text == "auto":
        if device.type != "cuda":
            return Engine()
        return parse_engine(AUTO_CUDA.get(arch or "", AUTO_CUDA_DEFAULT))
    eng = parse_engine(text)
    eng.check_device(device)
    return eng


# The variants the benchmark measures side by side (bench_training --engines all).
BENCH_VARIANTS_CPU = ("fp32", "fp32+nchw", "fp32+bmm", "bf16", "fp32+compile", "bf16+compile")
BENCH_VARIANTS_CUDA = ("fp32", "tf32", "tf32+nchw", "bf16", "bf16+nchw", "bf16+bmm", "tf32+bmm",
                       "bf16+compile", "bf16+graph", "tf32+graph", "bf16+compile+graph")

__all__ = ["Engine", "PRECISIONS", "OPTIONS", "AUTO_CUDA", "parse_engine", "check_engine", "resolve_engine"]
