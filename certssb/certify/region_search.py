"""Candidate search for the storage-update certifier: which stored balls might conflict.

This file's one job is the search half of the storage update (docs/THEORY.md section 6). A backend gets query
vectors (float32 [B, D], with their labels c_j and radii R_j) and the store's
final rows (centres x_i float32 [n, D], labels c_i, radii R_i) and returns a
SUPERSET of the pairs that conflict,

    { (j, i) : c_i != c_j  and  d(j, i) < R_j + R_i },

where d is the exact float64 distance that `certssb.certify.regions.exact_distances`
computes. `RegionStore` then decides with exact float64 distances on the
candidates only, so every backend takes exactly the reference's decisions. A
backend may return too many pairs (they cost time), never too few (a missed
conflict is a wrong certificate).

Why the pre-filter cannot miss a conflict. The search computes an approximate
squared distance s~ in floating point with unit roundoff u (float32 in FAISS,
float64 in the torch search's float64 mode), by any summation order, possibly as
||x||^2 + ||y||^2 - 2<x, y> (BLAS). Every such evaluation satisfies

    |s~ - ||x - y||^2| <= E(x, y) = g * (||x|| + ||y||)^2 + D * 2^-100 * (1 + ||x|| + ||y||),
    g = gamma_{D+4}(u) = (D+4) u / (1 - (D+4) u)      (then widened by 0.1 %),

(Higham, Accuracy and Stability of Numerical Algorithms, 3.1: a dot product
of length D has relative error gamma_D on sum |x_k y_k| <= ||x|| ||y||; the
norms the same, and the last two additions add 2u; the second term covers
underflow and flushed denormals). A pair is dropped only when

    s~ >= (R_j + R_i)^2 * (1 + 1e-6) + E(x_j, x_i),

which gives ||x_j - x_i|| >= (R_j + R_i)(1 + 4.9e-7); the exact float64
distance is within (D+3) 2^-53 relative of the true one (about 1.7e-11 at
D = 150528), and fl(R_j + R_i) within 2^-53, so the reference also finds no
conflict. Where E is useless (it exceeds the squared reach, e.g. float32 at
D = 150528 with image norms, or squares that could overflow float32) the FAISS
backend hands the block to the torch search, whose CENTRED float32 filter
(`TorchDenseIndex`) subtracts a centre c and sums in K-slices of 1024 features, so
its bound scales with gamma_1024 ||x - c||^2 instead of gamma_D ||x||^2 (the
derivation is in its docstring and in docs/THEORY.md section 6); a backend may
also answer "check every row" (None).

Backends: `ReferenceIndex` (no pre-filter: the brute-force reference),
`FaissIndex` (exact flat L2 range query on the CPU over the store's own
buffer, no copy; the torch search where float32 bounds are too loose) and
`TorchDenseIndex` (chunked matrix products on any torch device, meant for GPUs:
centred float32 by default, float64 on request or for huge vectors). There is no
FAISS GPU backend (removed: no FAISS GPU build to test it on; the torch search
is exact and covers the GPU). Results are in CSR form:
`lims` int64 [B + 1] and `ids` int64 [k], the candidates of query j being
ids[lims[j]:lims[j + 1]], ascending.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..errors import CertssbError

__all__ = ["INDEX_BACKENDS", "StoreArrays", "CandidateIndex", "ReferenceIndex", "FaissIndex", "TorchDenseIndex",
           "make_index", "resolve_backend", "faiss_available", "sq_dist_error_coeff", "centred_error_terms"]

INDEX_BACKENDS = ("auto", "reference", "faiss", "torch-gpu")
Candidates = tuple[np.ndarray, np.ndarray]  # (lims int64 [B+1], ids int64 [k])

# Relative slack on (R_j + R_i)^2: covers the float64 rounding of the exact distance, of
# R_j + R_i and of the threshold itself (all below 1e-10 for D < 2^24 / 100).
_EPS_R = 1e-6
# float32 searches refuse vectors longer than this (squares must not overflow float32).
_MAX_NORM_F32 = 2.0 ** 60
_F32_UNIT = 2.0 ** -24
_F64_UNIT = 2.0 ** -53
# Up to this many queries, FAISS computes each distance directly (faiss.fvec_L2sqr_ny:
# sum of squared differences), whose error is relative to the distance itself.
_DIRECT_MAX = 16


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


def _abs_term(dim: int, norm_sum: np.ndarray | Tensor | float):
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


def _empty(b: int) -> Candidates:
    return np.zeros(b + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)


def _to_csr(b: int, qi: np.ndarray, ids: np.ndarray) -> Candidates:
    """CSR (lims, ids) from unordered pairs (qi, ids): grouped by query, ids ascending."""
    if qi.size == 0:
        return _empty(b)
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


class ReferenceIndex(CandidateIndex):
    """No pre-filter: `RegionStore` computes the exact distance to every stored centre."""

    name = "reference"

    def search(self, q, q_norms, q_labels, q_radii, db, limit=None):
        return None

    def search_block(self, q, q_norms, q_radii, r_bound):
        return None


def _threshold(r_sum, norm_sum, g: float, dim: int):
    """Keep a pair when s~ < this (numpy or torch, float64)."""
    return r_sum * r_sum * (1.0 + _EPS_R) + g * norm_sum * norm_sum + _abs_term(dim, norm_sum)


class FaissIndex(CandidateIndex):
    """FAISS exact flat L2 range search on the CPU, over the store's own float32 buffer.

    One range query of squared radius (max R_j + max R_i)^2 (1 + 1e-6) + max E per block
    (FAISS takes a single radius), then the per-pair threshold with each pair's own radii,
    labels and error bound. No copy of the centres is made (faiss.range_search_L2sqr reads the
    store's buffer), so a 10,000 x 150,528 store costs its 6 GB once.

    Up to 16 queries (single updates, small batches) the distances are computed directly per
    query (faiss.fvec_L2sqr_ny, memory-bound), whose float32 error is relative to the distance:
    tight at any D. For larger blocks FAISS's BLAS path is compute-bound but its error grows with
    D ||x||^2; where that bound exceeds the squared reach (max R_j + max R_i)^2, as for
    150,528-feature images, a float32 filter would let nearly every pair through and the block
    is filtered in float64 instead (`TorchDenseIndex` on the CPU, also reading the store's
    buffer), where the error is negligible. The same for vectors whose float32 squares could
    overflow.
    """

    name = "faiss"

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__(device)
        import faiss

        self._faiss = faiss
        self._f64 = TorchDenseIndex("cpu")

    def _range(self, q: np.ndarray, y: np.ndarray, radius_sq: float) -> Optional[tuple]:
        """All (qi, i, s~) with s~ < radius_sq; None when the radius does not fit float32."""
        faiss = self._faiss
        r32 = np.float32(radius_sq)
        if not np.isfinite(r32) or not math.isfinite(radius_sq):
            return None
        if float(r32) < radius_sq:  # round the radius up, never down
            r32 = np.nextafter(r32, np.float32(np.inf))
            if not np.isfinite(r32):
                return None
        b, d = q.shape
        res = faiss.RangeSearchResult(b)
        faiss.range_search_L2sqr(faiss.swig_ptr(q), faiss.swig_ptr(y), d, b, y.shape[0], float(r32), res)
        lims = faiss.rev_swig_ptr(res.lims, b + 1).astype(np.int64)
        k = int(lims[b])
        if k == 0:
            z = np.zeros(0, dtype=np.int64)
            return z, z, np.zeros(0, dtype=np.float64)
        ids = faiss.rev_swig_ptr(res.labels, k).astype(np.int64)
        dis = faiss.rev_swig_ptr(res.distances, k).astype(np.float64)
        qi = np.repeat(np.arange(b, dtype=np.int64), np.diff(lims))
        return qi, ids, dis

    def _direct(self, q: np.ndarray, y: np.ndarray) -> np.ndarray:
        """float32 squared distances [B, n] by direct sums of squared differences, as float64."""
        faiss = self._faiss
        b, d = q.shape
        out = np.empty((b, y.shape[0]), dtype=np.float32)
        for j in range(b):
            faiss.fvec_L2sqr_ny(faiss.swig_ptr(out[j]), faiss.swig_ptr(q[j]), faiss.swig_ptr(y), d, y.shape[0])
        return out.astype(np.float64)

    @staticmethod
    def _direct_threshold(r_sum, dim: int):
        """Keep a pair when its direct float32 s~ is below this. Summing D non-negative rounded
        squares of rounded differences gives s~ <= d^2 (1 + gamma_{D+3}) + D 2^-100 (flushed
        denormals), so s~ >= (1 + gamma) (R_j + R_i)^2 (1 + 1e-6) + D 2^-100 proves no conflict."""
        return r_sum * r_sum * ((1.0 + _EPS_R) * (1.0 + sq_dist_error_coeff(dim - 1, _F32_UNIT))) + _abs_term(dim, 0.0)

    @staticmethod
    def _float32_useful(g: float, dim: int, reach: float, norm_sum: float, norm_max: float) -> bool:
        """Whether a float32 filter is worth it: finite, no overflow, error below the reach^2."""
        if not math.isfinite(g) or norm_max > _MAX_NORM_F32:
            return False
        return g * norm_sum * norm_sum + _abs_term(dim, norm_sum) <= reach * reach

    def search(self, q, q_norms, q_labels, q_radii, db, limit=None):
        b = q.shape[0]
        n = db.n if limit is None else min(db.n, int(limit.max(initial=0)))
        if n == 0 or b == 0:
            return _empty(b)
        dim = q.shape[1]
        g = sq_dist_error_coeff(dim, _F32_UNIT)
        cn = db.norms[:n].numpy()
        qn_max, cn_max = float(q_norms.max()), float(cn.max())
        reach = float(q_radii.max()) + float(db.radii[:n].max())
        if b <= _DIRECT_MAX and math.isfinite(g) and max(qn_max, cn_max) <= _MAX_NORM_F32:
            s = self._direct(np.ascontiguousarray(q.numpy()), db.centres[:n].numpy())
            m = s < self._direct_threshold(q_radii[:, None] + db.radii[:n].numpy()[None, :], dim)
            m &= db.labels[:n].numpy()[None, :] != q_labels[:, None]
            if limit is not None:
                m &= np.arange(n)[None, :] < limit[:, None]
            qi, ids = np.nonzero(m)
            return _to_csr(b, qi.astype(np.int64), ids.astype(np.int64))
        if not self._float32_useful(g, dim, reach, qn_max + cn_max, max(qn_max, cn_max)):
            return self._f64.search(q, q_norms, q_labels, q_radii, db, limit)
        radius_sq = float(_threshold(reach, qn_max + cn_max, g, dim))
        qa = np.ascontiguousarray(q.numpy())
        found = self._range(qa, db.centres[:n].numpy(), radius_sq)
        if found is None:
            return self._f64.search(q, q_norms, q_labels, q_radii, db, limit)
        qi, ids, dis = found
        lab = db.labels[:n].numpy()
        rad = db.radii[:n].numpy()
        keep = lab[ids] != q_labels[qi]
        if limit is not None:
            keep &= ids < limit[qi]
        keep &= dis < _threshold(q_radii[qi] + rad[ids], q_norms[qi] + cn[ids], g, dim)
        return _to_csr(b, qi[keep], ids[keep])

    def search_block(self, q, q_norms, q_radii, r_bound):
        b, dim = q.shape
        if b < 2:
            return _empty(b)
        g = sq_dist_error_coeff(dim, _F32_UNIT)
        qn_max = float(q_norms.max())
        reach = float(q_radii.max()) + r_bound
        if b <= _DIRECT_MAX and math.isfinite(g) and qn_max <= _MAX_NORM_F32:
            qa = np.ascontiguousarray(q.numpy())
            m = self._direct(qa, qa) < self._direct_threshold(np.asarray(q_radii)[:, None] + r_bound, dim)
            qi, ids = np.nonzero(np.tril(m, -1))
            return _to_csr(b, qi.astype(np.int64), ids.astype(np.int64))
        if not self._float32_useful(g, dim, reach, 2 * qn_max, qn_max):
            return self._f64.search_block(q, q_norms, q_radii, r_bound)
        radius_sq = float(_threshold(reach, 2 * qn_max, g, dim))
        qa = np.ascontiguousarray(q.numpy())
        found = self._range(qa, qa, radius_sq)
        if found is None:
            return self._f64.search_block(q, q_norms, q_radii, r_bound)
        qi, ids, dis = found
        keep = ids < qi
        keep &= dis < _threshold(q_radii[qi] + r_bound, q_norms[qi] + q_norms[ids], g, dim)
        return _to_csr(b, qi[keep], ids[keep])


@contextmanager
def _ieee_float32_matmul():
    """float32 matrix products in full IEEE float32 (no TF32, no bfloat16 passes) while inside:
    the centred filter's error bound assumes float32 products and sums. Restores the setting."""
    before = torch.get_float32_matmul_precision()
    if before != "highest":
        torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        if before != "highest":
            torch.set_float32_matmul_precision(before)


def centred_error_terms(dim: int, split: int) -> tuple[float, float, float]:
    """(g32, g64, h) of the centred float32 filter's bound (see `TorchDenseIndex`).

    With a = fl32(q - c), b = fl32(x - c) (A = ||a||, B = ||b||, float64), the dot product a.b summed
    as float32 GEMMs over K-slices of `split` features whose partial sums are added in float64,
    and s~ = ||a||^2 + ||b||^2 - 2 a.b assembled in float64:

        |s~ - ||a - b||^2| <= 2 g32 A B + g64 (A + B)^2 + D 2^-100 (1 + A + B)
        | ||a - b|| - ||q - x|| | <= h (A + B) + 2 sqrt(D) 2^-126

    g32 = gamma_L(2^-24) (L = min(D, split): one slice's float32 dot product, any summation
    order), g64 = gamma_{D + D/L + 3}(2^-53) (the float64 norms, the sum of the slices and the
    final three operations), h = 2^-24 / (1 - 2^-24) (the centring subtraction rounds each
    coordinate by at most 2^-24 relative; 2^-126 per coordinate if flushed to zero); each
    widened by 0.1 %.
    """
    length = min(dim, split)
    g32 = sq_dist_error_coeff(length - 4, _F32_UNIT)  # gamma_L (sq_dist_error_coeff adds 4)
    g64 = sq_dist_error_coeff(dim + -(-dim // length) + 3 - 4, _F64_UNIT)
    h = _F32_UNIT / (1.0 - _F32_UNIT) * 1.001
    return g32, g64, h


class TorchDenseIndex(CandidateIndex):
    """Exact chunked search with torch on any device (meant for CUDA; runs on the CPU too).

    precision="float32" (the default on a GPU): the CENTRED float32 filter. A fixed centre c (float32: the
    mean of the first rows the index sees; any c keeps the bound, a central one keeps it tight) is
    subtracted from queries and stored rows in float32, the dot products of the centred rows run
    as float32 GEMMs (full IEEE float32, TF32 switched off) over K-slices of L = SPLIT = 1024
    features on a GPU (CPU_SPLIT = 8192 on the CPU) whose partial sums are added in float64, and s~ = ||a||^2 + ||b||^2 - 2 a.b is assembled in
    float64 from float64 squared norms of the centred rows. Its error (`centred_error_terms`,
    docs/THEORY.md section 6) scales with the spread ||x - c||^2, not ||x||^2, and with the slice
    length L instead of D: at D = 150,528, gamma_L = 6.1e-5 (GPU; 4.9e-4 on the CPU) instead of
    gamma_D = 0.009 (whose
    bound for images in [0, 1] exceeds any reach, so the un-centred float32 filter is useless
    there). A pair is dropped only when

        s~ >= (R_j + R_i + eta)^2 (1 + 1e-6) + E,  eta = h (A + B) + 2 sqrt(D) 2^-126,
        E = 2 g32 A B + g64 (A + B)^2 + D 2^-100 (1 + A + B)

    (A, B: the largest centred norms of the query block and of the row chunk). Proof: a conflict
    has ||q - x|| < R_j + R_i, so ||a - b|| < R_j + R_i + eta and s~ < (R_j + R_i + eta)^2 + E;
    conversely a dropped pair has ||q - x|| >= ||a - b|| - eta >= (R_j + R_i) sqrt(1 + 1e-6),
    which the float64 decision also finds no conflict at (module docstring). Rows of norm above
    2^60 (float32 squares could overflow) are searched in float64 instead.

    precision="float64": s~ = ||q||^2 + ||x||^2 - 2 q.x in float64 (exact products of float32
    inputs, never TF32), un-centred, bound gamma_{D+4}(2^-53) (||q|| + ||x||)^2: the default on
    the CPU, where it measured faster than the centred float32 filter at D = 150,528 (one GEMM
    against many K-sliced ones plus the centring pass; benchmarks/bench_regions.py, precision
    case), and the fallback for huge vectors.

    On a GPU it keeps a device mirror of the final rows (centred float32 or float64 centres,
    squared norms, labels, radii; capacity doubling); on the CPU it reads the store's own buffer,
    centring or casting one chunk at a time. Memory: the mirror (GPU) plus O(block x chunk)
    temporaries. `stats` counts the blocks filtered in each precision.
    """

    name = "torch-gpu"
    #: features per K-slice of the float32 dot products (the L of gamma_L) on a GPU, and on the CPU
    #: (where many small GEMMs cost more than they save: measured 5x slower at 1024 on 2 cores)
    SPLIT = 1024
    CPU_SPLIT = 8192
    # elements of one [block, chunk] temporary (float64: 128 MiB), and of one cast chunk (CPU)
    _TILE = 1 << 24
    _CAST = 1 << 24

    def __init__(self, device: torch.device | str = "cuda", mirror: Optional[bool] = None,
                 precision: Optional[str] = None) -> None:
        super().__init__(device)
        if precision is None:  # measured: float64 is faster on a 2-core CPU (docs/results/regions.md)
            precision = "float32" if self.device.type == "cuda" else "float64"
        if precision not in ("float32", "float64"):
            raise CertssbError(f"precision must be 'float32' (centred) or 'float64', got {precision!r}")
        self.precision = precision
        self._dtype = torch.float32 if precision == "float32" else torch.float64
        self.block_size = 1024 if self.device.type == "cuda" else 256
        self.split = self.SPLIT if self.device.type == "cuda" else self.CPU_SPLIT
        # mirror=True on the CPU runs the GPU code path (tests)
        self._mirror = self.device.type != "cpu" if mirror is None else bool(mirror)
        self._n = 0
        self._cap = 0
        self._c: Optional[Tensor] = None
        self._centre: Optional[Tensor] = None  # float32 [D] on the device (precision float32)
        #: blocks searched by each filter ("float32": centred float32, "float64": float64)
        self.stats = {"float32": 0, "float64": 0}

    # ------------------------------------------------------------------ the centre
    def _set_centre(self, rows: Tensor) -> None:
        """Fix the centre from `rows` (float32 [k, D], CPU) if none is set (or D changed)."""
        if self._centre is not None and self._centre.shape[0] == rows.shape[1]:
            return
        k = min(rows.shape[0], 4096)
        self._centre = rows[:k].to(torch.float64).mean(0).to(torch.float32).to(self.device)

    def _centred(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(fl32(x - c) on the device, float64 squared norms of it)."""
        a = x.to(self.device).to(torch.float32) - self._centre
        a64 = a.to(torch.float64)
        return a, (a64 * a64).sum(1)

    def _dots(self, a: Tensor, b: Tensor) -> Tensor:
        """a.b^T [B, k] float64: float32 GEMMs over K-slices of `split` features, summed in float64."""
        dim = a.shape[1]
        with _ieee_float32_matmul():
            if dim <= self.split:
                return (a @ b.T).to(torch.float64)
            acc = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
            for s in range(0, dim, self.split):
                acc.add_(a[:, s:s + self.split] @ b[:, s:s + self.split].T)
            return acc

    # ------------------------------------------------------------------ the mirror
    def sync(self, db: StoreArrays) -> None:
        if not self._mirror:
            return
        n = db.n
        if n < self._n:  # the store was rebuilt: start over
            self._n, self._cap, self._c, self._centre = 0, 0, None, None
        if n == self._n:
            return
        dim = db.centres.shape[1]
        if self.precision == "float32":
            self._set_centre(db.centres[self._n:n])
        if n > self._cap:
            cap = max(n, 2 * self._cap, 64)
            dev = self.device
            c = torch.empty(cap, dim, dtype=self._dtype, device=dev)
            n2 = torch.empty(cap, dtype=torch.float64, device=dev)
            lab = torch.empty(cap, dtype=torch.int64, device=dev)
            rad = torch.empty(cap, dtype=torch.float64, device=dev)
            if self._n:
                c[: self._n] = self._c[: self._n]
                n2[: self._n] = self._n2[: self._n]
                lab[: self._n] = self._lab[: self._n]
                rad[: self._n] = self._rad[: self._n]
            self._c, self._n2, self._lab, self._rad, self._cap = c, n2, lab, rad, cap
        s = self._n
        rows = max(1, (1 << 26) // max(dim, 1))  # bound the host-to-device staging copies
        for a in range(s, n, rows):
            e = min(n, a + rows)
            if self.precision == "float32":
                self._c[a:e], self._n2[a:e] = self._centred(db.centres[a:e])
            else:
                blk = db.centres[a:e].to(self.device, non_blocking=False)
                self._c[a:e] = blk.to(self._dtype)
                b64 = blk.to(torch.float64)
                self._n2[a:e] = (b64 * b64).sum(1)
        self._lab[s:n] = db.labels[s:n].to(self.device)
        self._rad[s:n] = db.radii[s:n].to(self.device)
        self._n = n

    def _rows(self, db: StoreArrays, a: int, e: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(rows in the compute form: centred float32 or float64; their squared norms, labels,
        radii) of rows a..e."""
        if self._mirror:
            return self._c[a:e], self._n2[a:e], self._lab[a:e], self._rad[a:e]
        if self.precision == "float32":
            c, n2 = self._centred(db.centres[a:e])
        else:
            c = db.centres[a:e].to(self.device).to(self._dtype)
            n2 = (db.norms[a:e] * db.norms[a:e]).to(self.device)  # within the bound: relative error a few 2^-53
        return c, n2, db.labels[a:e].to(self.device), db.radii[a:e].to(self.device)

    # ------------------------------------------------------------------ distances and bounds
    def _sq_dists(self, qd: Tensor, qn2: Tensor, c: Tensor, n2: Tensor) -> Tensor:
        """Approximate squared distances [B, k] of the queries to rows c [k, D]:
        ||q||^2 + ||x||^2 - 2 q.x (float64: one fused GEMM; float32: centred, `_dots`)."""
        if self.precision == "float32":
            return (qn2[:, None] + n2[None, :]).sub_(self._dots(qd, c), alpha=2.0)
        return torch.addmm(qn2[:, None] + n2[None, :], qd, c.T, beta=1.0, alpha=-2.0)

    def _bound(self, dim: int, a_max: float, b_max: float) -> tuple[float, float]:
        """(eta, E): keep a pair when s~ < (R_j + R_i + eta)^2 (1 + 1e-6) + E."""
        if self.precision == "float32":
            g32, g64, h = centred_error_terms(dim, self.split)
            eta = h * (a_max + b_max) + 2.0 * math.sqrt(dim) * 2.0 ** -126
            return eta, 2.0 * g32 * a_max * b_max + g64 * (a_max + b_max) ** 2 + _abs_term(dim, a_max + b_max)
        norm_sum = a_max + b_max
        return 0.0, sq_dist_error_coeff(dim, _F64_UNIT) * norm_sum * norm_sum + _abs_term(dim, norm_sum)

    def _float64(self) -> "TorchDenseIndex":
        """The float64 filter on the same device (for rows whose float32 squares could overflow)."""
        if not hasattr(self, "_f64_index"):
            self._f64_index = TorchDenseIndex(self.device, mirror=False, precision="float64")
        return self._f64_index

    def _too_large(self, q_norms: np.ndarray, db_norms: Optional[Tensor] = None) -> bool:
        if self.precision != "float32":
            return False
        big = float(np.max(q_norms, initial=0.0))
        if db_norms is not None and db_norms.numel():
            big = max(big, float(db_norms.max()))
        return not big <= _MAX_NORM_F32

    def _queries(self, q: Tensor) -> tuple[Tensor, Tensor]:
        if self.precision == "float32":
            return self._centred(q)
        qd = q.to(self.device).to(self._dtype)
        q64 = qd.to(torch.float64)
        return qd, (q64 * q64).sum(1)

    def search(self, q, q_norms, q_labels, q_radii, db, limit=None):
        b, dim = q.shape
        n = db.n if limit is None else min(db.n, int(limit.max(initial=0)))
        if n == 0 or b == 0:
            self.sync(db)
            return _empty(b)
        if self._too_large(q_norms, db.norms[:n]):
            self.stats["float64"] += 1
            return self._float64().search(q, q_norms, q_labels, q_radii, db, limit)
        if self.precision == "float32":
            self._set_centre(db.centres[:n])
        self.sync(db)
        self.stats[self.precision] += 1
        dev = self.device
        qd, qn2 = self._queries(q)
        qr = torch.from_numpy(np.ascontiguousarray(q_radii)).to(dev)
        ql = torch.from_numpy(np.ascontiguousarray(q_labels)).to(dev)
        lim = None if limit is None else torch.from_numpy(np.ascontiguousarray(limit)).to(dev)
        # float64: one bound for the whole block from the largest norms (a few ulps looser than
        # the per-pair bound, three fewer passes over the tiles); centred float32: per chunk, from
        # the largest centred norms of the block and of the chunk.
        a_max = float(qn2.max().sqrt()) if self.precision == "float32" else float(q_norms.max())
        b_all = None if self.precision == "float32" else float(db.norms[:n].max())
        chunk = max(1, self._TILE // b)
        if not self._mirror:
            chunk = max(1, min(chunk, self._CAST // max(dim, 1)))
        pairs = []
        for a in range(0, n, chunk):
            e = min(n, a + chunk)
            c, n2, lab, rad = self._rows(db, a, e)
            b_max = float(n2.max().sqrt()) if b_all is None else b_all
            eta, err = self._bound(dim, a_max, b_max)
            s = self._sq_dists(qd, qn2, c, n2)
            t = qr[:, None] + rad[None, :]
            if eta:
                t.add_(eta)
            t.mul_(t).mul_(1.0 + _EPS_R).add_(err)
            m = s < t
            m &= lab[None, :] != ql[:, None]
            if lim is not None:
                m &= torch.arange(a, e, device=dev)[None, :] < lim[:, None]
            nz = m.nonzero()
            if nz.numel():
                nz[:, 1] += a
                pairs.append(nz)
        if not pairs:
            return _empty(b)
        p = torch.cat(pairs).cpu().numpy()
        return _to_csr(b, p[:, 0], p[:, 1])

    def search_block(self, q, q_norms, q_radii, r_bound):
        b, dim = q.shape
        if b < 2:
            return _empty(b)
        if self._too_large(q_norms):
            self.stats["float64"] += 1
            return self._float64().search_block(q, q_norms, q_radii, r_bound)
        if self.precision == "float32":
            self._set_centre(q)
        self.stats[self.precision] += 1
        dev = self.device
        qd, qn2 = self._queries(q)
        qr = torch.from_numpy(np.ascontiguousarray(q_radii)).to(dev)
        a_max = float(qn2.max().sqrt()) if self.precision == "float32" else float(q_norms.max())
        eta, err = self._bound(dim, a_max, a_max)
        s = self._sq_dists(qd, qn2, qd, qn2)
        t = (qr + (r_bound + eta))[:, None].expand(b, b)
        m = (s < t * t * (1.0 + _EPS_R) + err) & torch.ones(b, b, dtype=torch.bool, device=dev).tril(-1)
        p = m.nonzero().cpu().numpy()
        return _to_csr(b, p[:, 0], p[:, 1])


# ---------------------------------------------------------------------------- choosing a backend
def faiss_available() -> bool:
    """Whether `import faiss` works."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The concrete backend for (backend, device): "auto" is torch-gpu on a CUDA device, faiss on
    the CPU (torch-gpu's search on the CPU when faiss is not installed). Raises CertssbError for
    impossible requests.

    There is no FAISS GPU backend: it was removed because no machine certssb runs on has a FAISS
    build with GPU support (it could never be tested), and the torch search covers the GPU
    exactly (the centred float32 filter, `TorchDenseIndex`)."""
    dev = torch.device(device)
    if backend == "faiss-gpu":
        raise CertssbError("the region-store backend 'faiss-gpu' was removed (no FAISS GPU build to test it "
                           "on); use 'torch-gpu' (or 'auto'): the exact chunked search in PyTorch on the GPU")
    if backend not in INDEX_BACKENDS:
        raise CertssbError(f"unknown region-store backend {backend!r}; choose one of {', '.join(INDEX_BACKENDS)}")
    if dev.type not in ("cpu", "cuda"):
        raise CertssbError(f"region-store device must be cpu or cuda[:N], got {dev}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CertssbError(f"device {dev} was asked for but torch sees no CUDA device; use device='cpu'")
    if backend == "auto":
        if dev.type == "cuda":
            return "torch-gpu"
        # without faiss: the matrix-product search of the GPU backend, on the CPU (exact like
        # every backend, and far faster than the brute-force reference)
        return "faiss" if faiss_available() else "torch-gpu"
    if backend in ("reference", "faiss") and dev.type != "cpu":
        raise CertssbError(f"backend {backend!r} searches on the CPU; for device {dev} use backend "
                           "'torch-gpu' (or 'auto')")
    if backend == "faiss" and not faiss_available():
        raise CertssbError("backend 'faiss' needs the faiss package: pip install faiss-cpu "
                           "(or use backend='reference')")
    return backend


def make_index(backend: str, device: torch.device | str = "cpu") -> CandidateIndex:
    """A fresh search backend (see resolve_backend for the choice of "auto").

    Example: make_index("auto", "cpu").name == "faiss" when faiss is installed.
    """
    name = resolve_backend(backend, device)
    cls = {"reference": ReferenceIndex, "faiss": FaissIndex, "torch-gpu": TorchDenseIndex}[name]
    return cls(torch.device(device))
