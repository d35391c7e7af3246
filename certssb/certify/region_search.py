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
from typing import Optional

import numpy as np
import torch

from ..errors import CertssbError
from .region_candidates import (DIRECT_MAX, EPS_R, F32_UNIT, INDEX_BACKENDS, MAX_NORM_F32, CandidateIndex,
                                StoreArrays, abs_term, empty_candidates, sq_dist_error_coeff, to_csr)
from .region_search_torch import TorchDenseIndex, centred_error_terms

__all__ = ["INDEX_BACKENDS", "StoreArrays", "CandidateIndex", "ReferenceIndex", "FaissIndex", "TorchDenseIndex",
           "make_index", "resolve_backend", "faiss_available", "sq_dist_error_coeff", "centred_error_terms"]


class ReferenceIndex(CandidateIndex):
    """No pre-filter: `RegionStore` computes the exact distance to every stored centre."""

    name = "reference"

    def search(self, q, q_norms, q_labels, q_radii, db, limit=None):
        return None

    def search_block(self, q, q_norms, q_radii, r_bound):
        return None


def _threshold(r_sum, norm_sum, g: float, dim: int):
    """Keep a pair when s~ < this (numpy or torch, float64)."""
    return r_sum * r_sum * (1.0 + EPS_R) + g * norm_sum * norm_sum + abs_term(dim, norm_sum)


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
        return r_sum * r_sum * ((1.0 + EPS_R) * (1.0 + sq_dist_error_coeff(dim - 1, F32_UNIT))) + abs_term(dim, 0.0)

    @staticmethod
    def _float32_useful(g: float, dim: int, reach: float, norm_sum: float, norm_max: float) -> bool:
        """Whether a float32 filter is worth it: finite, no overflow, error below the reach^2."""
        if not math.isfinite(g) or norm_max > MAX_NORM_F32:
            return False
        return g * norm_sum * norm_sum + abs_term(dim, norm_sum) <= reach * reach

    def search(self, q, q_norms, q_labels, q_radii, db, limit=None):
        b = q.shape[0]
        n = db.n if limit is None else min(db.n, int(limit.max(initial=0)))
        if n == 0 or b == 0:
            return empty_candidates(b)
        dim = q.shape[1]
        g = sq_dist_error_coeff(dim, F32_UNIT)
        cn = db.norms[:n].numpy()
        qn_max, cn_max = float(q_norms.max()), float(cn.max())
        reach = float(q_radii.max()) + float(db.radii[:n].max())
        if b <= DIRECT_MAX and math.isfinite(g) and max(qn_max, cn_max) <= MAX_NORM_F32:
            s = self._direct(np.ascontiguousarray(q.numpy()), db.centres[:n].numpy())
            m = s < self._direct_threshold(q_radii[:, None] + db.radii[:n].numpy()[None, :], dim)
            m &= db.labels[:n].numpy()[None, :] != q_labels[:, None]
            if limit is not None:
                m &= np.arange(n)[None, :] < limit[:, None]
            qi, ids = np.nonzero(m)
            return to_csr(b, qi.astype(np.int64), ids.astype(np.int64))
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
        return to_csr(b, qi[keep], ids[keep])

    def search_block(self, q, q_norms, q_radii, r_bound):
        b, dim = q.shape
        if b < 2:
            return empty_candidates(b)
        g = sq_dist_error_coeff(dim, F32_UNIT)
        qn_max = float(q_norms.max())
        reach = float(q_radii.max()) + r_bound
        if b <= DIRECT_MAX and math.isfinite(g) and qn_max <= MAX_NORM_F32:
            qa = np.ascontiguousarray(q.numpy())
            m = self._direct(qa, qa) < self._direct_threshold(np.asarray(q_radii)[:, None] + r_bound, dim)
            qi, ids = np.nonzero(np.tril(m, -1))
            return to_csr(b, qi.astype(np.int64), ids.astype(np.int64))
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
        return to_csr(b, qi[keep], ids[keep])


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
