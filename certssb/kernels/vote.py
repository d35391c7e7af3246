"""The fused vote ops: streaming ensemble aggregation without an [M, B, C] probability tensor.

`vote_accumulate(logits[Mc, B, C], soft_units, hard_count)` adds, in place, for every
model k of the chunk and input b: soft_units[b, c] += round(softmax(logits[k, b])_c * 2^40)
and hard_count[b, argmax_c logits[k, b, c]] += 1 (ties to the lowest class index).
Soft scores are fixed point (`UNITS_PER_ONE` = 2^40 units per probability 1): integer
sums are exact, so accumulators do not depend on chunking, order or sharding.
`vote_top2(soft_units, hard_count, by_count)` gives the two leading classes of each row.
The pure-PyTorch references are `reference_accumulate` and `certssb.certify.bounds.top2`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._ops import build_info  # noqa: F401  (importing certssb._ops loads certssb._C: the op schemas)
from ..errors import CertssbError

UNITS_PER_ONE = 1 << 40
# Most models an int64 soft accumulator can sum: each adds at most 2^40 units to an entry, and
# (2^23 - 1) * 2^40 < 2^63 <= 2^23 * 2^40 (2^23 unanimous models wrap around to a negative sum).
MAX_MODELS = (2**63 - 1) // UNITS_PER_ONE


@torch.library.register_fake("certssb::vote_accumulate")
def _vote_accumulate_fake(logits, soft_units, hard_count):
    return None


@torch.library.register_fake("certssb::vote_top2")
def _vote_top2_fake(soft_units, hard_count, by_count):
    b = soft_units.shape[0]
    return (soft_units.new_empty((b, 2)), soft_units.new_empty((b, 2)),
            soft_units.new_empty((b, 2)))


def check_logits(logits: Tensor, soft_units: Tensor, hard_count: Tensor) -> None:
    """Boundary checks shared by the kernel and reference paths."""
    if not isinstance(logits, Tensor) or logits.dim() != 3 or not logits.is_floating_point():
        raise CertssbError("logits must be a floating tensor of shape [Mc, B, C] (models, inputs, "
                           "classes)")
    if logits.shape[1:] != soft_units.shape or soft_units.shape != hard_count.shape:
        raise CertssbError(f"logits [Mc, B, C] = {list(logits.shape)} do not match the accumulators "
                           f"{list(soft_units.shape)}")
    if soft_units.dtype != torch.int64 or hard_count.dtype != torch.int64:
        raise CertssbError("soft_units and hard_count must be int64 accumulators")
    if logits.numel() and not bool(torch.isfinite(logits).all()):
        raise CertssbError("logits contain NaN or Inf; check the models (diverged training?) "
                           "before certifying")


def vote_accumulate(logits: Tensor, soft_units: Tensor, hard_count: Tensor) -> None:
    """Add a chunk of logits [Mc, B, C] to the int64 accumulators [B, C], in place (native kernel).

    Logits may be float32, float64, float16 or bfloat16 and any layout; softmax is computed
    in float64. All three tensors must be on one device.

    Example::

        soft = torch.zeros(4, 2, dtype=torch.int64); hard = torch.zeros_like(soft)
        vote_accumulate(torch.randn(10, 4, 2), soft, hard)
        hard.sum(1)  # tensor([10, 10, 10, 10])
    """
    check_logits(logits, soft_units, hard_count)
    if not (logits.device == soft_units.device == hard_count.device):
        raise CertssbError(f"logits and accumulators must be on one device, got {logits.device}, "
                           f"{soft_units.device} and {hard_count.device}")
    torch.ops.certssb.vote_accumulate(logits, soft_units, hard_count)


def reference_accumulate(logits: Tensor, soft_units: Tensor, hard_count: Tensor) -> None:
    """Pure-PyTorch reference of `vote_accumulate` (same fixed point, same tie rule)."""
    check_logits(logits, soft_units, hard_count)
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        return
    probs = torch.softmax(logits.double(), dim=-1)
    soft_units += torch.round(probs * float(UNITS_PER_ONE)).long().sum(0)
    # argmax returns the first maximal index: ties go to the lowest class.
    hard_count += torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).sum(0)


def vote_top2(soft_units: Tensor, hard_count: Tensor, *, by_count: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The two leading classes of each row and their accumulators (native kernel).

    Rows are ranked by hard_count (by_count=True, the Clopper-Pearson bound) or by
    soft_units (the Hoeffding bound); ties go to the lowest class index.
    Returns (classes [B, 2] int64, soft_units at them [B, 2], hard_count at them [B, 2]).
    """
    if soft_units.dim() != 2 or soft_units.shape[1] < 2 or soft_units.shape != hard_count.shape:
        raise CertssbError("soft_units and hard_count must both have shape [B, C] with C >= 2")
    return torch.ops.certssb.vote_top2(soft_units, hard_count, bool(by_count))


__all__ = ["UNITS_PER_ONE", "MAX_MODELS", "vote_accumulate", "reference_accumulate", "vote_top2", "check_logits"]
