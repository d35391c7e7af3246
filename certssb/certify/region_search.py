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
float64 on the GPU), by any summation order, possibly as
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
backend filters in float64 instead; a backend may also answer "check every
row" (None).

Backends: `ReferenceIndex` (no pre-filter: the brute-force reference),
`FaissIndex` (exact flat L2 range query on the CPU over the store's own
buffer, no copy; float64 filtering where float32 bounds are too loose),
`TorchDenseIndex` (chunked float64 matrix products on any
torch device, meant for GPUs) and `FaissGpuIndex` (FAISS's GPU brute force,
float32 with a bound that allows TF32 inputs). Results are in CSR form:
`lims` int64 [B + 1] and `ids` int64 [k], the candidates of query j being
ids[lims[j]:lims[j + 1]], ascending.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..errors import CertssbError

__all__ = ["INDEX_BACKENDS", "StoreArrays", "CandidateIndex", "ReferenceIndex", "FaissIndex", "TorchDenseIndex",
           "FaissGpuIndex", "make_index", "resolve_backend", "faiss_available", "faiss_gpu_available",
           "sq_dist_error_coeff"]

INDEX_BACKENDS = ("auto", "reference", "faiss", "torch-gpu", "faiss-gpu")
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
# TF32 keeps 10 explicit mantissa bits: each input rounds by at most 2^-11 relative.
_TF32_EXTRA = 2.0 ** -9


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


class TorchDenseIndex(CandidateIndex):
    """Exact chunked search with torch on any device (meant for CUDA; runs on the CPU too).

    Computes s~ = ||q||^2 + ||x||^2 - 2 q.x in float64 for blocks of queries against chunks of
    the store (float64 products are exact for float32 inputs and never use TF32) and returns
    the pairs under the threshold, with one error bound per block from the largest norms. On a
    GPU it keeps a device mirror of the final rows (float64 centres, squared norms, labels,
    radii; capacity doubling); on the CPU it reads the store's own buffer, casting one chunk at
    a time. Memory: the mirror (GPU) plus O(block x chunk) temporaries.
    """

    name = "torch-gpu"
    _dtype = torch.float64
    _unit = _F64_UNIT
    # elements of one [block, chunk] temporary (float64: 128 MiB), and of one cast chunk (CPU)
    _TILE = 1 << 24
    _CAST = 1 << 24

    def __init__(self, device: torch.device | str = "cuda", mirror: Optional[bool] = None) -> None:
        super().__init__(device)
        self.block_size = 1024 if self.device.type == "cuda" else 256
        # mirror=True on the CPU runs the GPU code path (tests)
        self._mirror = self.device.type != "cpu" if mirror is None else bool(mirror)
        self._n = 0
        self._cap = 0
        self._c: Optional[Tensor] = None

    def _coeff(self, dim: int) -> float:
        return sq_dist_error_coeff(dim, self._unit)

    def sync(self, db: StoreArrays) -> None:
        if not self._mirror:
            return
        n = db.n
        if n < self._n:  # the store was rebuilt: start over
            self._n, self._cap, self._c = 0, 0, None
        if n == self._n:
            return
        dim = db.centres.shape[1]
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
            blk = db.centres[a:e].to(self.device, non_blocking=False)
            self._c[a:e] = blk.to(self._dtype)
            b64 = blk.to(torch.float64)
            self._n2[a:e] = (b64 * b64).sum(1)
        self._lab[s:n] = db.labels[s:n].to(self.device)
        self._rad[s:n] = db.radii[s:n].to(self.device)
        self._n = n

    def _rows(self, db: StoreArrays, a: int, e: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(centres in the compute dtype, squared norms, labels, radii) of rows a..e."""
        if self._mirror:
            return self._c[a:e], self._n2[a:e], self._lab[a:e], self._rad[a:e]
        c = db.centres[a:e].to(self._dtype)
        n2 = db.norms[a:e] * db.norms[a:e]  # within the bound: relative error a few 2^-53
        return c, n2, db.labels[a:e], db.radii[a:e]

    def _sq_dists(self, qd: Tensor, qn2: Tensor, c: Tensor, n2: Tensor) -> Tensor:
        """Approximate squared distances [B, k] of the queries to rows c [k, D]:
        ||q||^2 + ||x||^2 - 2 q.x, the product fused into one GEMM (addmm)."""
        return torch.addmm(qn2[:, None] + n2[None, :], qd, c.T, beta=1.0, alpha=-2.0)

    def _queries(self, q: Tensor) -> tuple[Tensor, Tensor]:
        qd = q.to(self.device).to(self._dtype)
        q64 = qd.to(torch.float64)
        return qd, (q64 * q64).sum(1)

    def _query_block(self, q, q_radii):
        """(error coefficient, queries on the device and their squared norms, radii on the device, the
        device), or None where the float32 filter's error cannot be bounded at this dimension."""
        g = self._coeff(q.shape[1])
        if not math.isfinite(g):
            return None
        qd, qn2 = self._queries(q)
        return g, qd, qn2, torch.from_numpy(np.ascontiguousarray(q_radii)).to(self.device), self.device

    def search(self, q, q_norms, q_labels, q_radii, db, limit=None):
        b, dim = q.shape
        self.sync(db)
        n = db.n if limit is None else min(db.n, int(limit.max(initial=0)))
        if n == 0 or b == 0:
            return _empty(b)
        if (prep := self._query_block(q, q_radii)) is None:
            return None
        g, qd, qn2, qr, dev = prep
        ql = torch.from_numpy(np.ascontiguousarray(q_labels)).to(dev)
        lim = None if limit is None else torch.from_numpy(np.ascontiguousarray(limit)).to(dev)
        # One error bound for the whole block, from the largest norms (a few ulps looser than
        # the per-pair bound in float64, and three fewer passes over the [B, chunk] tiles).
        norm_sum = float(q_norms.max()) + float(db.norms[:n].max())
        err = g * norm_sum * norm_sum + _abs_term(dim, norm_sum)
        chunk = max(1, self._TILE // b)
        if not self._mirror:
            chunk = max(1, min(chunk, self._CAST // max(dim, 1)))
        pairs = []
        for a in range(0, n, chunk):
            e = min(n, a + chunk)
            c, n2, lab, rad = self._rows(db, a, e)
            s = self._sq_dists(qd, qn2, c, n2)
            t = qr[:, None] + rad[None, :]
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
        if (prep := self._query_block(q, q_radii)) is None:
            return None
        g, qd, qn2, qr, dev = prep
        norm_sum = 2.0 * float(q_norms.max())
        err = g * norm_sum * norm_sum + _abs_term(dim, norm_sum)
        s = self._sq_dists(qd, qn2, qd, qn2)
        t = (qr + r_bound)[:, None].expand(b, b)
        m = (s < t * t * (1.0 + _EPS_R) + err) & torch.ones(b, b, dtype=torch.bool, device=dev).tril(-1)
        p = m.nonzero().cpu().numpy()
        return _to_csr(b, p[:, 0], p[:, 1])


class FaissGpuIndex(TorchDenseIndex):
    """FAISS's GPU brute force (faiss.bfKnn with k = -1: all squared distances) on a float32
    device mirror. FAISS may run its GEMM in TF32, so the error bound allows inputs rounded to
    11 significant bits (2^-9 on top of the float32 bound). Only where FAISS has GPU support."""

    name = "faiss-gpu"
    _dtype = torch.float32

    def __init__(self, device: torch.device | str = "cuda") -> None:
        super().__init__(device)
        import faiss

        self._faiss = faiss
        self._res = faiss.StandardGpuResources()

    def _coeff(self, dim: int) -> float:
        return sq_dist_error_coeff(dim, _F32_UNIT) + _TF32_EXTRA

    def _all_pairs(self, xq: Tensor, xb: Tensor) -> Tensor:
        faiss = self._faiss
        xq, xb = xq.contiguous(), xb.contiguous()
        out = torch.empty(xq.shape[0], xb.shape[0], dtype=torch.float32, device=self.device)

        def ptr(t: Tensor):
            return faiss.cast_integer_to_float_ptr(t.untyped_storage().data_ptr() + t.storage_offset() * 4)

        args = faiss.GpuDistanceParams()
        args.metric = faiss.METRIC_L2
        args.k = -1
        args.dims = xq.shape[1]
        args.vectors, args.vectorsRowMajor = ptr(xb), True
        args.vectorType = faiss.DistanceDataType_F32
        args.numVectors = xb.shape[0]
        args.queries, args.queriesRowMajor = ptr(xq), True
        args.queryType = faiss.DistanceDataType_F32
        args.numQueries = xq.shape[0]
        args.outDistances = ptr(out)
        args.device = self.device.index if self.device.index is not None else torch.cuda.current_device()
        torch.cuda.synchronize(self.device)  # FAISS runs on its own stream
        faiss.bfKnn(self._res, args)
        torch.cuda.synchronize(self.device)
        return out.to(torch.float64)

    def _sq_dists(self, qd, qn2, c, n2):
        return self._all_pairs(qd, c)

    def search(self, q, q_norms, q_labels, q_radii, db, limit=None):
        if max(float(q_norms.max(initial=0.0)), float(db.norms.max()) if db.n else 0.0) > _MAX_NORM_F32:
            return None
        return super().search(q, q_norms, q_labels, q_radii, db, limit)

    def search_block(self, q, q_norms, q_radii, r_bound):
        if float(q_norms.max(initial=0.0)) > _MAX_NORM_F32:
            return None
        return super().search_block(q, q_norms, q_radii, r_bound)


# ---------------------------------------------------------------------------- choosing a backend
def faiss_available() -> bool:
    """Whether `import faiss` works."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def faiss_gpu_available() -> bool:
    """Whether FAISS was built with GPU support and sees a GPU (does not initialize CUDA in torch)."""
    try:
        import faiss
    except ImportError:
        return False
    if not hasattr(faiss, "StandardGpuResources") or not hasattr(faiss, "get_num_gpus"):
        return False
    try:
        return faiss.get_num_gpus() > 0
    except Exception:
        return False


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The concrete backend for (backend, device): "auto" is faiss-gpu or torch-gpu on a CUDA
    device, faiss on the CPU (torch-gpu's search on the CPU when faiss is not installed).
    Raises CertssbError for impossible requests."""
    dev = torch.device(device)
    if backend not in INDEX_BACKENDS:
        raise CertssbError(f"unknown region-store backend {backend!r}; choose one of {', '.join(INDEX_BACKENDS)}")
    if dev.type not in ("cpu", "cuda"):
        raise CertssbError(f"region-store device must be cpu or cuda[:N], got {dev}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CertssbError(f"device {dev} was asked for but torch sees no CUDA device; use device='cpu'")
    if backend == "auto":
        if dev.type == "cuda":
            return "faiss-gpu" if faiss_gpu_available() else "torch-gpu"
        # without faiss: the float64 matrix-product search of the GPU backend, on the CPU (exact
        # like every backend, and far faster than the brute-force reference)
        return "faiss" if faiss_available() else "torch-gpu"
    if backend in ("reference", "faiss") and dev.type != "cpu":
        raise CertssbError(f"backend {backend!r} searches on the CPU; for device {dev} use backend "
                           "'torch-gpu' (or 'auto')")
    if backend == "faiss" and not faiss_available():
        raise CertssbError("backend 'faiss' needs the faiss package: pip install faiss-cpu "
                           "(or use backend='reference')")
    if backend == "faiss-gpu":
        if dev.type != "cuda":
            raise CertssbError("backend 'faiss-gpu' needs device='cuda'; on the CPU use 'faiss'")
        if not faiss_gpu_available():
            raise CertssbError("backend 'faiss-gpu' needs a FAISS build with GPU support that sees a GPU; "
                               "use backend 'torch-gpu' (exact chunked search in PyTorch) instead")
    return backend


def make_index(backend: str, device: torch.device | str = "cpu") -> CandidateIndex:
    """A fresh search backend (see resolve_backend for the choice of "auto").

    Example: make_index("auto", "cpu").name == "faiss" when faiss is installed.
    """
    name = resolve_backend(backend, device)
    cls = {"reference": ReferenceIndex, "faiss": FaissIndex, "torch-gpu": TorchDenseIndex,
           "faiss-gpu": FaissGpuIndex}[name]
    return cls(torch.device(device))
