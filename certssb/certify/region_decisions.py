"""The pieces of the storage update's decisions: exact distances, one decision, a block of decisions.

`exact_distances` / `pair_distances` are the one distance every search backend
decides with (float64 distances of the stored float32 values, summed in one
fixed order per pair), so every backend takes bit-identical decisions
(docs/THEORY.md section 6).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..errors import CertssbError
from .region_candidates import Candidates

# Chunk the float64 difference computations to about this many elements (memory bound).
CHUNK_ELEMS = 1 << 22


@dataclass
class RegionDecision:
    """Outcome of one `RegionStore.update`.

    label: the stored (possibly aligned) label; radius: the stored (possibly trimmed) radius;
    kind: one of "none", "trim", "align"; conflict: store index of i*, -1 when kind == "none".
    """

    label: int
    radius: float
    kind: str
    conflict: int


def exact_distances(a: Tensor, b: Tensor) -> Tensor:
    """Exact Euclidean distances float64 [n, k] between the rows of a [n, D] and b [k, D] (CPU).

    The one distance every backend decides with. Blocks of rows are cast to float64 one at a
    time (the store stays float32 and no float64 copy of it is ever made) and compared by the
    direct sum of squared differences, accumulated sequentially over the D features of each
    pair (torch.cdist without the ||a||^2 + ||b||^2 - 2ab expansion, which loses precision for
    close points). Each entry depends only on its two rows, not on the other rows passed: the
    distance to a candidate row equals the one a full scan computes, bit for bit.

    Example: exact_distances(torch.zeros(1, 2), torch.tensor([[3.0, 4.0]])) -> [[5.0]].
    """
    n, d = a.shape
    k = b.shape[0]
    out = torch.empty(n, k, dtype=torch.float64, device=a.device)
    if n == 0 or k == 0:
        return out
    rows = max(1, CHUNK_ELEMS // max(d, 1))
    for i in range(0, n, rows):
        a64 = a[i:i + rows].to(torch.float64)
        for j in range(0, k, rows):
            out[i:i + rows, j:j + rows] = torch.cdist(a64, b[j:j + rows].to(torch.float64),
                                                      compute_mode="donot_use_mm_for_euclid_dist")
    return out


def pair_distances(a: Tensor, ia: np.ndarray, b: Tensor, ib: np.ndarray) -> np.ndarray:
    """Exact distances float64 [k] of the row pairs (a[ia[p]], b[ib[p]]), CPU.

    Bit for bit the entries `exact_distances` computes (the same cdist kernel, batched one
    pair per batch entry), in chunks of about CHUNK_ELEMS gathered elements.
    """
    k = int(ia.shape[0])
    out = np.empty(k, dtype=np.float64)
    d = a.shape[1]
    rows = max(1, CHUNK_ELEMS // max(d, 1))
    for s in range(0, k, rows):
        e = min(k, s + rows)
        xa = a.index_select(0, torch.from_numpy(ia[s:e])).to(torch.float64)
        xb = b.index_select(0, torch.from_numpy(ib[s:e])).to(torch.float64)
        out[s:e] = torch.cdist(xa[:, None, :], xb[:, None, :],
                               compute_mode="donot_use_mm_for_euclid_dist")[:, 0, 0].numpy()
    return out


DECISION_KINDS = ("none", "trim", "align")


def empty_csr(b: int) -> Candidates:
    return np.zeros(b + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)


def all_earlier(b: int) -> Candidates:
    """CSR of every pair (j, k), k < j, of a block of b inputs."""
    lims = np.zeros(b + 1, dtype=np.int64)
    np.cumsum(np.arange(b, dtype=np.int64), out=lims[1:])
    return lims, np.tril_indices(b, -1)[1].astype(np.int64)


class DecisionBlock:
    """Decisions of a block of inputs as arrays: label int64, radius float64, kind int8 (index
    into DECISION_KINDS), conflict int64, and the margin of the chosen conflict (inf for "none")."""

    def __init__(self, label: np.ndarray, radius: np.ndarray) -> None:
        b = label.shape[0]
        self.label = label.astype(np.int64, copy=True)
        self.radius = radius.astype(np.float64, copy=True)
        self.kind = np.zeros(b, dtype=np.int8)
        self.conflict = np.full(b, -1, dtype=np.int64)
        self.margin = np.full(b, np.inf)

    def set_best(self, j, margin, idx, d, lab, rad) -> None:
        """Vectorized: inputs j conflict, least margin at store rows idx (distance d, label lab,
        radius rad): trim where margin >= 0, else align."""
        self.margin[j] = margin
        self.conflict[j] = idx
        trim = margin >= 0
        self.kind[j] = np.where(trim, 1, 2)
        self.radius[j] = np.where(trim, margin, rad - d)
        self.label[j] = np.where(trim, self.label[j], lab)

    def put(self, j: int, dec: RegionDecision, margin: float = math.inf) -> None:
        self.label[j], self.radius[j] = dec.label, dec.radius
        self.kind[j] = DECISION_KINDS.index(dec.kind)
        self.conflict[j] = dec.conflict
        self.margin[j] = margin

    def decisions(self) -> list[RegionDecision]:
        return [RegionDecision(int(lab), float(r), DECISION_KINDS[k], int(c))
                for lab, r, k, c in zip(self.label.tolist(), self.radius.tolist(), self.kind.tolist(),
                                        self.conflict.tolist())]


def row_norms(x: Tensor) -> Tensor:
    """||row|| in float64 for float32 rows [B, D] (for the search's error bound only)."""
    return torch.linalg.vector_norm(x.to(torch.float64), dim=1)


def check_label_radius(label: int, radius: float) -> tuple[int, float]:
    """(label, radius) of one input as int and float, or CertssbError saying what is wrong."""
    if isinstance(label, Tensor):
        if label.numel() != 1:
            raise CertssbError(f"label must be a single integer, got a tensor of shape {tuple(label.shape)}")
        label = label.item()
    if isinstance(label, bool) or not isinstance(label, numbers.Integral):
        if isinstance(label, numbers.Real) and float(label).is_integer():
            label = int(label)
        else:
            raise CertssbError(f"label must be an integer class index, got {label!r}")
    if int(label) < 0:
        raise CertssbError(f"label must be >= 0, got {label}; abstained inputs go through "
                           "certify_stream(abstain=...) and are not stored")
    if isinstance(radius, Tensor):
        if radius.numel() != 1:
            raise CertssbError(f"radius must be a single number, got a tensor of shape {tuple(radius.shape)}")
        radius = radius.item()
    if isinstance(radius, bool) or not isinstance(radius, numbers.Real):
        raise CertssbError(f"radius must be a number, got {radius!r}")
    radius = float(radius)
    if not math.isfinite(radius) or radius < 0:
        raise CertssbError(f"radius must be finite and >= 0, got {radius!r}; compute it with "
                           "certssb.certify.bounds.certified_radius")
    return int(label), radius
