"""The interface of the storage update's candidate search, and what every backend shares.

A backend (`certssb.certify.region_search`: reference, FAISS; `region_search_torch`: the
chunked torch search) proposes a SUPERSET of the conflicting (query, stored ball) pairs;
`RegionStore` then decides on the candidates with exact float64 distances (docs/THEORY.md
section 6). Here: the store's arrays as a backend sees them, the CSR candidate lists, the
float32 error coefficients every filter uses to stay a superset, and the base class.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

INDEX_BACKENDS = ("auto", "reference", "faiss", "torch-gpu")
Candidates = tuple[np.ndarray, np.ndarray]  # (lims int64 [B+1], ids int64 [k])

# Relative slack on (R_j + R_i)^2: covers the float64 rounding of the exact distance, of
# R_j + R_i and of the threshold itself (all below 1e-10 for D < 2^24 / 100).
EPS_R = 1e-6
# float32 searches refuse vectors longer than this (squares must not overflow float32).
MAX_NORM_F32 = 2.0 ** 60
F32_UNIT = 2.0 ** -24
F64_UNIT = 2.0 ** -53
# Up to this many queries, FAISS computes each distance directly (faiss.fvec_L2sqr_ny:
# sum of squared differences), whose error is relative to the distance itself.
DIRECT_MAX = 16


def sq_dist_error_coeff(dim: int, unit: float) -> float:
    """g with |s~ - ||x - y||^2| <= g (||x|| + ||y||)^2 (+ a tiny absolute term) for any
    floating-point evaluation of a squared L2 distance of length `dim` with unit roundoff
    `unit`; +inf when no useful bound exists ((dim + 4) * unit >= 0.5).

    Example: sq_dist_error_coeff(784, 2**-24) is about 4.7e-5.
    """
    nu = (dim + 4) * unit
    if nu >= 0.5:
        return math.inf
    return nu / (1.0 - nu) * 1.001


def abs_term(dim: int, norm_sum: np.ndarray | Tensor | float):
    return dim * 2.0 ** -100 * (1.0 + norm_sum)


@dataclass(frozen=True)
class StoreArrays:
    """Views of a store's first n rows, all on the CPU.

    centres float32 [n, D] (row-contiguous), norms float64 [n] (||centre||, for the error
    bound), labels int64 [n], radii float64 [n]."""

    centres: Tensor
    norms: Tensor
    labels: Tensor
    radii: Tensor

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])


def empty_candidates(b: int) -> Candidates:
    return np.zeros(b + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)


def to_csr(b: int, qi: np.ndarray, ids: np.ndarray) -> Candidates:
    """CSR (lims, ids) from unordered pairs (qi, ids): grouped by query, ids ascending."""
    if qi.size == 0:
        return empty_candidates(b)
    order = np.lexsort((ids, qi))
    qi, ids = qi[order], ids[order]
    lims = np.zeros(b + 1, dtype=np.int64)
    np.cumsum(np.bincount(qi, minlength=b), out=lims[1:])
    return lims, ids.astype(np.int64, copy=False)


class CandidateIndex:
    """Interface of a search backend. Subclasses implement `search` and `search_block`.

    An index only sees FINAL rows of the store (label and radius decided); the rows of a
    block being decided are handled by `search_block`, which bounds their radii instead.
    """

    name = "abstract"
    #: queries per block in RegionStore.certify_stream (larger blocks amortize the search).
    block_size = 256

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    def sync(self, db: StoreArrays) -> None:
        """The store now holds db.n final rows (only appended to since the last call)."""

    def search(self, q: Tensor, q_norms: np.ndarray, q_labels: np.ndarray, q_radii: np.ndarray,
               db: StoreArrays, limit: Optional[np.ndarray] = None) -> Optional[Candidates]:
        """Candidate conflicts of queries q (float32 [B, D], CPU) among the rows of db.

        Returns CSR candidates (a superset of the pairs (j, i) with db.labels[i] != q_labels[j]
        and d(q_j, x_i) < q_radii[j] + db.radii[i], restricted to i < limit[j] when limit is
        given), or None meaning "every row i < limit[j] is a candidate"."""
        raise NotImplementedError

    def search_block(self, q: Tensor, q_norms: np.ndarray, q_radii: np.ndarray,
                     r_bound: float) -> Optional[Candidates]:
        """Candidate pairs (j, k), k < j, inside a block of queries whose decisions are not known
        yet: a superset of d(q_j, q_k) < q_radii[j] + r_bound (r_bound bounds every decided
        radius), labels ignored. None means every k < j."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.name if self.device.type == "cpu" else f"{self.name} ({self.device})"
