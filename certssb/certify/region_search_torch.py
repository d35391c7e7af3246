"""The chunked torch search of the storage update (`torch-gpu`; it also runs on the CPU).

Float32 matrix products filter the pairs on the GPU (or CPU); their rounding is bounded
(`sq_dist_error_coeff`, and `centred_error_terms` for the centred float32 filter that keeps
the bound small at ImageNette's 150,528 features), so the candidates stay a superset of the
conflicts and the float64 decisions are unchanged (docs/THEORY.md section 6).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..errors import CertssbError
from .region_candidates import (EPS_R, F32_UNIT, F64_UNIT, MAX_NORM_F32, CandidateIndex, StoreArrays, abs_term,
                                empty_candidates, sq_dist_error_coeff, to_csr)


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
    g32 = sq_dist_error_coeff(length - 4, F32_UNIT)  # gamma_L (sq_dist_error_coeff adds 4)
    g64 = sq_dist_error_coeff(dim + -(-dim // length) + 3 - 4, F64_UNIT)
    h = F32_UNIT / (1.0 - F32_UNIT) * 1.001
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
            return eta, 2.0 * g32 * a_max * b_max + g64 * (a_max + b_max) ** 2 + abs_term(dim, a_max + b_max)
        norm_sum = a_max + b_max
        return 0.0, sq_dist_error_coeff(dim, F64_UNIT) * norm_sum * norm_sum + abs_term(dim, norm_sum)

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
        return not big <= MAX_NORM_F32

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
            return empty_candidates(b)
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
            t.mul_(t).mul_(1.0 + EPS_R).add_(err)
            m = s < t
            m &= lab[None, :] != ql[:, None]
            if lim is not None:
                m &= torch.arange(a, e, device=dev)[None, :] < lim[:, None]
            nz = m.nonzero()
            if nz.numel():
                nz[:, 1] += a
                pairs.append(nz)
        if not pairs:
            return empty_candidates(b)
        p = torch.cat(pairs).cpu().numpy()
        return to_csr(b, p[:, 0], p[:, 1])

    def search_block(self, q, q_norms, q_radii, r_bound):
        b, dim = q.shape
        if b < 2:
            return empty_candidates(b)
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
        m = (s < t * t * (1.0 + EPS_R) + err) & torch.ones(b, b, dtype=torch.bool, device=dev).tril(-1)
        p = m.nonzero().cpu().numpy()
        return to_csr(b, p[:, 0], p[:, 1])
