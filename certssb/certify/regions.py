"""Storage-update certifier: keeps the certified L2 balls of all inputs label-consistent.

This file's one job is the decision half of the storage update (docs/THEORY.md section 6; the search half is
`certssb.certify.region_search`). Certified regions are open L2 balls B(x, R) with a
label c. A store S of (x_i, c_i, R_i) grows one input at a time; for a new
input (x, c, R):

    conflicts = { i in S : c_i != c and ||x - x_i|| < R_i + R }
    none      -> keep (c, R)                                       ("none")
    otherwise m = min over conflicts of ||x - x_i|| - R_i, i* its argmin
              (ties: lowest store index)
        m >= 0 -> R = m                    (the ball now touches)  ("trim")
        m <  0 -> c = c_i*, R = R_i* - ||x - x_i*||  (x inside i*) ("align")
    store (x, c, R).

Invariant: no two stored balls with different labels overlap. Results depend on
the query order, which `certify_stream` takes explicitly and the store records
(`queries`: the running query number of every stored ball; abstentions count
as queries but are not stored).

Exactness. Centres are stored as float32 (the dtype of images) on the CPU and
every decision uses `exact_distances`: float64 distances of the float32 values,
summed in one fixed order per pair. A search backend (`region_index`) only
proposes candidates, provably a superset of the conflicts, and the decision is
taken on the candidates with the same float64 numbers as the brute-force
reference, so every backend takes bit-identical decisions, ties and boundary
cases included.
"""
from __future__ import annotations

import math
import numbers
import os
import time
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..errors import CertssbError
from ..core.files import sha256_file
from .region_decisions import (CHUNK_ELEMS, DECISION_KINDS, DecisionBlock, RegionDecision, all_earlier,
                               check_label_radius, empty_csr, exact_distances, pair_distances, row_norms)
from .region_file import FORMAT_VERSION, UPDATE_KINDS, read_store_file, write_store_file
from .region_candidates import Candidates, StoreArrays
from .region_search import INDEX_BACKENDS, make_index

__all__ = ["UPDATE_KINDS", "RegionDecision", "RegionStore", "FORMAT_VERSION", "INDEX_BACKENDS", "exact_distances"]

# check_invariant forgives overlaps this small relative to R_i + R_j (float64 rounding of
# R = ||x - x_i|| - R_i and of differently ordered sums).
_INVARIANT_RTOL = 1e-9


class RegionStore:
    """A growing store of certified balls (centre float32 [D], label int64, radius float64).

    Args:
        dim: number of features D of a flattened input; None: taken from the first input.
        backend: the candidate search (certssb.certify.region_search): "auto" (faiss on the CPU when
            installed, else torch-gpu's search on the CPU; the GPU backend for a CUDA device),
            "reference" (brute force), "faiss", "torch-gpu" (chunked search in PyTorch on `device`,
            centred float32 with a proven error bound; runs on the CPU too). Every backend takes
            the same decisions.
        device: where the search runs. The store itself (and every exact decision) stays on
            the CPU.

    Example:
        >>> s = RegionStore(2)
        >>> s.update(torch.tensor([0.0, 0.0]), 0, 1.0).kind
        'none'
        >>> s.update(torch.tensor([1.5, 0.0]), 1, 1.0)  # trimmed to touch the first ball
        RegionDecision(label=1, radius=0.5, kind='trim', conflict=0)
    """

    def __init__(self, dim: int | None = None, *, backend: str = "auto",
                 device: str | torch.device = "cpu") -> None:
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1):
            raise CertssbError(f"dim must be a positive integer or None, got {dim!r}")
        self._dim: int | None = None if dim is None else int(dim)
        self._n = 0
        self._cap = 0
        self._alloc(0)
        self._counts = {k: 0 for k in UPDATE_KINDS}
        self._index = make_index(backend, device)
        #: throughput of the last certify_stream call
        self.last_stream: dict = {}
        #: {"path", "sha256"} of the file this store was loaded from, else None
        self.source: Optional[dict] = None

    # ------------------------------------------------------------------ views
    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return (f"RegionStore(n={self._n}, dim={self._dim}, backend={self._index.describe()}, "
                f"counts={self._counts})")

    @property
    def dim(self) -> int | None:
        """Number of features D, or None before the first input."""
        return self._dim

    @property
    def backend(self) -> str:
        """Name of the candidate-search backend in use ("reference", "faiss", "torch-gpu")."""
        return self._index.name

    @property
    def device(self) -> torch.device:
        """Where the candidate search runs (the stored arrays are always on the CPU)."""
        return self._index.device

    @property
    def centres(self) -> Tensor:
        """Stored centres, float32 [n, D] (a view: do not modify)."""
        return self._centres[: self._n]

    @property
    def labels(self) -> Tensor:
        """Stored labels, int64 [n] (a view: do not modify)."""
        return self._labels[: self._n]

    @property
    def radii(self) -> Tensor:
        """Stored radii, float64 [n] (a view: do not modify)."""
        return self._radii[: self._n]

    @property
    def queries(self) -> Tensor:
        """Query number of each stored ball, int64 [n]: its position in the sequence of every
        query this store has seen, abstentions included (-1: unknown, from a version-1 file)."""
        return self._queries[: self._n]

    @property
    def n_queries(self) -> int:
        """Number of queries seen so far (stored inputs plus abstentions)."""
        return sum(self._counts.values())

    @property
    def counts(self) -> dict[str, int]:
        """Running number of decisions of each kind in UPDATE_KINDS (a copy)."""
        return dict(self._counts)

    def set_backend(self, backend: str = "auto", device: str | torch.device | None = None) -> None:
        """Switch the candidate search (same choices as the constructor); decisions do not change.
        device None keeps the current one."""
        self._index = make_index(backend, self.device if device is None else device)
        self._index.sync(self._arrays())

    def copy(self, *, backend: str | None = None, device: str | torch.device | None = None) -> RegionStore:
        """An independent copy of the store (arrays cloned, exactly sized), with the same or
        another backend/device; continuing either one leaves the other unchanged."""
        other = RegionStore(self._dim, backend=backend or self.backend,
                            device=self.device if device is None else device)
        n = self._n
        other._n = other._cap = n
        other._centres = self._centres[:n].clone()
        other._labels, other._radii = self._labels[:n].clone(), self._radii[:n].clone()
        other._norms, other._queries = self._norms[:n].clone(), self._queries[:n].clone()
        other._counts = dict(self._counts)
        other.source = None if self.source is None else dict(self.source)
        other._index.sync(other._arrays())
        return other

    # ------------------------------------------------------------------ storage
    def _alloc(self, cap: int) -> None:
        d = self._dim if self._dim is not None else 0
        c = torch.empty(cap, d, dtype=torch.float32)
        lab = torch.empty(cap, dtype=torch.int64)
        rad = torch.empty(cap, dtype=torch.float64)
        nrm = torch.empty(cap, dtype=torch.float64)
        qry = torch.empty(cap, dtype=torch.int64)
        n = self._n
        if n:
            c[:n] = self._centres[:n]
            lab[:n] = self._labels[:n]
            rad[:n] = self._radii[:n]
            nrm[:n] = self._norms[:n]
            qry[:n] = self._queries[:n]
        self._centres, self._labels, self._radii, self._norms, self._queries = c, lab, rad, nrm, qry
        self._cap = cap

    def reserve(self, n: int) -> None:
        """Make room for n stored balls in total (no effect if there is room already). Streams of
        known length reserve once and never copy the store while it grows."""
        if n > self._cap and self._dim is not None:
            self._alloc(int(n))

    def _grow_for(self, n: int) -> None:
        if n > self._cap:
            self._alloc(max(n, 2 * self._cap, 16))  # amortized O(1) appends: double the capacity

    def _arrays(self, n: int | None = None) -> StoreArrays:
        n = self._n if n is None else n
        return StoreArrays(self._centres[:n], self._norms[:n], self._labels[:n], self._radii[:n])

    # ------------------------------------------------------------------ input checks
    def _prepare_x(self, x: Tensor) -> Tensor:
        """Flatten x to float32 [D] on the CPU, checking dim and finiteness."""
        if not isinstance(x, Tensor):
            raise CertssbError(f"x must be a tensor, got {type(x).__name__}")
        xf = x.detach().reshape(-1).to(device="cpu", dtype=torch.float32)
        if xf.numel() == 0:
            raise CertssbError("x is empty; pass one input of shape [C, H, W] (or any shape with D > 0 elements)")
        if self._dim is not None and xf.numel() != self._dim:
            raise CertssbError(f"x has {xf.numel()} elements but the store holds inputs of dim {self._dim}; "
                               "use one store per dataset / input shape")
        if not bool(torch.isfinite(xf).all()):
            raise CertssbError("x contains NaN or inf (after casting to float32); check the input images")
        return xf

    # ------------------------------------------------------------------ core
    def _decide_exact(self, xf: Tensor, label: int, radius: float, cand: Optional[np.ndarray],
                      n_visible: int) -> RegionDecision:
        """The decision against the stored rows cand (ascending store indices), or against every
        row < n_visible when cand is None, with exact float64 distances."""
        if cand is None:
            if n_visible == 0:
                return RegionDecision(label, radius, "none", -1)
            rows = self._centres[:n_visible]
            lab = self._labels.numpy()[:n_visible]
            rad = self._radii.numpy()[:n_visible]
        else:
            if cand.size == 0:
                return RegionDecision(label, radius, "none", -1)
            rows = self._centres.index_select(0, torch.from_numpy(cand))
            lab = self._labels.numpy()[cand]
            rad = self._radii.numpy()[cand]
        d = exact_distances(xf[None, :], rows)[0].numpy()
        conflict = (lab != label) & (d < rad + radius)
        if not conflict.any():
            return RegionDecision(label, radius, "none", -1)
        margin = np.where(conflict, d - rad, np.inf)
        mval = margin.min()
        pos = int(np.flatnonzero(margin == mval)[0])  # lowest index among the minimizers
        istar = pos if cand is None else int(cand[pos])
        m = float(mval)
        if m >= 0:
            return RegionDecision(label, m, "trim", istar)
        new_r = float(rad[pos]) - float(d[pos])
        return RegionDecision(int(lab[pos]), new_r, "align", istar)

    def _search(self, xs: Tensor, labels: np.ndarray, radii: np.ndarray, norms: np.ndarray
                ) -> Optional[Candidates]:
        return self._index.search(xs, norms, labels, radii, self._arrays())

    def _decide_against_stored(self, xs: Tensor, labels: np.ndarray, radii: np.ndarray, cands: Candidates
                               ) -> DecisionBlock:
        """Vectorized decisions of a block of inputs against stored rows (candidates in CSR), as
        if no other input of the block existed. The exact distances of all candidate pairs come
        from one batched call; per input, the conflict of least margin (ties: lowest index)."""
        b = xs.shape[0]
        blk = DecisionBlock(labels, radii)
        lims, ids = cands
        if ids.size == 0:
            return blk
        qj = np.repeat(np.arange(b, dtype=np.int64), np.diff(lims))
        d = pair_distances(xs, qj, self._centres, ids)
        lab_c = self._labels.numpy()[ids]
        rad_c = self._radii.numpy()[ids]
        conf = (lab_c != labels[qj]) & (d < rad_c + radii[qj])
        if not conf.any():
            return blk
        qj, ids, d, lab_c, rad_c = qj[conf], ids[conf], d[conf], lab_c[conf], rad_c[conf]
        margin = d - rad_c
        order = np.lexsort((ids, margin, qj))  # by input, then margin, then store index
        first = order[np.unique(qj[order], return_index=True)[1]]
        blk.set_best(qj[first], margin[first], ids[first], d[first], lab_c[first], rad_c[first])
        return blk

    def _insert_block(self, xs: Tensor, labels: np.ndarray, radii: np.ndarray, qnums: np.ndarray) -> DecisionBlock:
        """Decide and store a block of inputs in order (xs float32 [B, D] contiguous, CPU).

        The search runs once for the whole block against the rows stored before it, and the
        exact distances of its candidates are computed at once. Pairs inside the block come
        from search_block with the radius bound max(R) (a decided radius never exceeds max(its
        own R, the largest stored radius)); only inputs with such pairs are then decided one by
        one, seeing the block's earlier decisions. Equals B calls of `update`, bit for bit."""
        b = xs.shape[0]
        if self._dim is None:
            self._dim = int(xs.shape[1])
            self._alloc(max(self._cap, b))
        n0 = self._n
        norms = row_norms(xs).numpy()
        cands = self._search(xs, labels, radii, norms) if n0 else empty_csr(b)
        inner = None
        if b > 1 and cands is not None:
            r_bound = max(float(radii.max()), float(self._radii[:n0].max()) if n0 else 0.0)
            inner = self._index.search_block(xs, norms, radii, r_bound)
            if inner is None:  # the search declined: every earlier input of the block
                inner = all_earlier(b)
        self._grow_for(n0 + b)
        self._centres[n0:n0 + b] = xs
        self._norms[n0:n0 + b] = torch.from_numpy(norms)
        self._queries[n0:n0 + b] = torch.from_numpy(qnums)
        lab_np, rad_np = self._labels.numpy(), self._radii.numpy()
        if cands is None:  # reference search: every stored row, one input at a time
            blk = DecisionBlock(labels, radii)
            for j in range(b):
                dec = self._decide_exact(xs[j], int(labels[j]), float(radii[j]), None, n0 + j)
                blk.put(j, dec)
                lab_np[n0 + j], rad_np[n0 + j] = dec.label, dec.radius
        else:
            blk = self._decide_against_stored(xs, labels, radii, cands)
            lab_np[n0:n0 + b] = blk.label
            rad_np[n0:n0 + b] = blk.radius
            if inner is not None and inner[1].size:
                self._decide_inside_block(xs, labels, radii, blk, inner, n0)
        self._n = n0 + b
        for code, cnt in enumerate(np.bincount(blk.kind, minlength=3)):
            self._counts[DECISION_KINDS[code]] += int(cnt)
        self._index.sync(self._arrays())
        return blk

    def _decide_inside_block(self, xs: Tensor, labels: np.ndarray, radii: np.ndarray, blk: DecisionBlock,
                             inner: Candidates, n0: int) -> None:
        """Redo, in order, the decisions of the block's inputs that may conflict with an earlier
        input of the same block (rows n0 + k, already decided and written)."""
        lims, ks = inner
        qj = np.repeat(np.arange(xs.shape[0], dtype=np.int64), np.diff(lims))
        d_all = pair_distances(xs, qj, xs, ks)  # the block's rows are xs itself
        lab_np, rad_np = self._labels.numpy(), self._radii.numpy()
        for j in np.flatnonzero(np.diff(lims)).tolist():
            sl = slice(lims[j], lims[j + 1])
            rows = ks[sl] + n0
            d = d_all[sl]
            lab, rad = lab_np[rows], rad_np[rows]
            label, radius = int(labels[j]), float(radii[j])
            conf = (lab != label) & (d < rad + radius)
            if not conf.any():
                continue  # the decision against the stored rows stands
            margin = np.where(conf, d - rad, np.inf)
            pos = int(np.flatnonzero(margin == margin.min())[0])
            m = float(margin[pos])
            # pre-block rows have lower indices, so they win ties
            if blk.kind[j] != 0 and blk.margin[j] <= m:
                continue
            if m >= 0:
                dec = RegionDecision(label, m, "trim", int(rows[pos]))
            else:
                dec = RegionDecision(int(lab[pos]), float(rad[pos]) - float(d[pos]), "align", int(rows[pos]))
            blk.put(j, dec, margin=m)
            lab_np[n0 + j], rad_np[n0 + j] = dec.label, dec.radius

    def decide(self, x: Tensor, label: int, radius: float) -> RegionDecision:
        """The decision `update` would take for (x, label, radius), without storing anything."""
        xf = self._prepare_x(x)
        label, radius = check_label_radius(label, radius)
        return self.decide_batch(xf[None], torch.tensor([label]), torch.tensor([radius], dtype=torch.float64))[0]

    def decide_batch(self, x: Tensor, labels: Tensor, radii: Tensor) -> list[RegionDecision]:
        """The decisions for N independent inputs against the current store, storing nothing
        (each input sees the store as it is, not the others).

        Args: x [N, ...] inputs; labels [N] ints >= 0; radii [N] finite >= 0.
        Returns: N RegionDecisions.
        """
        xs, lab, rad = self._check_batch(x, labels, radii)
        out: list[RegionDecision] = []
        bs = self._index.block_size
        for a in range(0, xs.shape[0], bs):
            blk_x = xs[a:a + bs].contiguous()
            la, ra = lab[a:a + bs], rad[a:a + bs]
            cands = self._search(blk_x, la, ra, row_norms(blk_x).numpy()) if self._n else empty_csr(len(la))
            if cands is None:
                out += [self._decide_exact(blk_x[j], int(la[j]), float(ra[j]), None, self._n)
                        for j in range(blk_x.shape[0])]
            else:
                out += self._decide_against_stored(blk_x, la, ra, cands).decisions()
        return out

    def _check_batch(self, x: Tensor, labels, radii) -> tuple[Tensor, np.ndarray, np.ndarray]:
        if not isinstance(x, Tensor) or x.dim() < 1:
            raise CertssbError("x must be a tensor of shape [N, ...]")
        n = x.shape[0]
        xs = x.detach().reshape(n, -1).to(device="cpu", dtype=torch.float32)
        lab = torch.as_tensor(labels).reshape(-1)
        rad = torch.as_tensor(radii).reshape(-1).to(torch.float64)
        if lab.numel() != n or rad.numel() != n:
            raise CertssbError(f"labels and radii need one entry per input (N={n}); got {lab.numel()} and "
                               f"{rad.numel()}")
        if lab.is_floating_point() or lab.dtype == torch.bool or bool((lab < 0).any()):
            raise CertssbError("labels must be integer class indices >= 0")
        if not bool((torch.isfinite(rad) & (rad >= 0)).all()):
            raise CertssbError("radii must be finite and >= 0; compute them with certssb.certify.bounds.certified_radius")
        if n and self._dim is not None and xs.shape[1] != self._dim:
            raise CertssbError(f"x has {xs.shape[1]} elements per input but the store holds inputs of dim "
                               f"{self._dim}; use one store per dataset / input shape")
        if not bool(torch.isfinite(xs).all()):
            raise CertssbError("x contains NaN or inf (after casting to float32); check the input images")
        return xs, lab.cpu().to(torch.int64).numpy(), rad.cpu().numpy()

    def update(self, x: Tensor, label: int, radius: float) -> RegionDecision:
        """Apply the storage update (docs/THEORY.md section 6) to one input and store the result.

        Args:
            x: one input, any shape; flattened to [D] and stored as float32.
            label: predicted class >= 0.
            radius: certified radius >= 0 (finite).
        Returns:
            the RegionDecision (stored label, stored radius, kind, conflicting index i*).
        """
        xf = self._prepare_x(x)
        label, radius = check_label_radius(label, radius)
        return self._insert_block(xf[None].contiguous(), np.array([label], dtype=np.int64),
                                  np.array([radius], dtype=np.float64),
                                  np.array([self.n_queries], dtype=np.int64)).decisions()[0]

    def certify_stream(self, x: Tensor, labels: Tensor, radii: Tensor, abstain: Tensor,
                       order: Tensor | None = None, *, progress: bool | None = None
                       ) -> tuple[Tensor, Tensor, list[str]]:
        """Run `update` over a batch of inputs in a given order (continuing the store).

        Inputs are searched in blocks (the backend's block_size) and decided one by one, so
        the result equals N calls of `update` in that order. Memory beyond the store (reserved
        once, exactly) is O(block x n) for the search; x is read a block at a time.

        Args:
            x: [N, ...] inputs.
            labels: [N] predicted classes (int).
            radii: [N] certified radii.
            abstain: [N] bool; abstained inputs are not stored and keep their label and radius.
            order: a permutation of 0..N-1 giving the processing order (default 0..N-1). Input
                order[r] gets query number n_queries + r (recorded in `queries`).
            progress: show a tqdm bar; None: only for N >= 1000 and when stderr is a terminal.
        Returns:
            (labels int64 [N], radii float64 [N], kinds list of N str), in the ORIGINAL index
            order; kinds are "none", "trim", "align" or "abstain". `last_stream` then holds the
            throughput: {"inputs", "stored", "seconds", "inputs_per_s", "backend"}.
        """
        t0 = time.perf_counter()
        if not isinstance(x, Tensor) or x.dim() < 1:
            raise CertssbError("x must be a tensor of shape [N, ...]")
        n = x.shape[0]
        labels_t = torch.as_tensor(labels).reshape(-1)
        radii_t = torch.as_tensor(radii).reshape(-1)
        abstain_t = torch.as_tensor(abstain).reshape(-1)
        for name, t in (("labels", labels_t), ("radii", radii_t), ("abstain", abstain_t)):
            if t.numel() != n:
                raise CertssbError(f"{name} has {t.numel()} entries but x has N={n}; pass one per input")
        if abstain_t.dtype != torch.bool:
            raise CertssbError(f"abstain must be a bool tensor, got dtype {abstain_t.dtype}")
        if labels_t.is_floating_point() or labels_t.dtype == torch.bool:
            raise CertssbError(f"labels must be an integer tensor, got dtype {labels_t.dtype}")
        if order is None:
            order_t = torch.arange(n)
        else:
            order_t = torch.as_tensor(order).reshape(-1).cpu()
            if (order_t.is_floating_point() or order_t.numel() != n
                    or not torch.equal(torch.sort(order_t.long()).values, torch.arange(n))):
                raise CertssbError(f"order must be a permutation of 0..{n - 1} (an integer tensor of "
                                   f"length {n}); record it and pass it again to reproduce a run")
            order_t = order_t.long()
        # reshape(n, -1) cannot infer the width of an empty batch
        xflat = x.detach().reshape(n, math.prod(x.shape[1:]))
        # Validate every stored input first so that a bad one cannot leave a half-updated store.
        keep = ~abstain_t.cpu()
        n_keep = int(keep.sum())
        if n_keep:
            if self._dim is not None and xflat.shape[1] != self._dim:
                raise CertssbError(f"x has {xflat.shape[1]} elements per input but the store holds inputs "
                                   f"of dim {self._dim}; use one store per dataset / input shape")
            rows = max(1, CHUNK_ELEMS // max(xflat.shape[1], 1))
            for a in range(0, n, rows):  # in chunks: no full float32 copy of x
                kc = keep[a:a + rows].to(xflat.device)
                if not bool(torch.isfinite(xflat[a:a + rows][kc].to(torch.float32)).all()):
                    raise CertssbError("x contains NaN or inf (after casting to float32) in a non-abstained "
                                       "input; check the input images")
            lk, rk = labels_t.cpu()[keep], radii_t.cpu()[keep].to(torch.float64)
            if bool((lk < 0).any()):
                raise CertssbError("labels must be >= 0 for every non-abstained input; mark inputs "
                                   "without a prediction as abstained")
            if not bool((torch.isfinite(rk) & (rk >= 0)).all()):
                raise CertssbError("radii must be finite and >= 0 for every non-abstained input; "
                                   "compute them with certssb.certify.bounds.certified_radius")
            if self._dim is None:
                self._dim = int(xflat.shape[1])
                self._alloc(0)
            self.reserve(self._n + n_keep)
        out_labels = labels_t.to(device="cpu", dtype=torch.int64).clone()
        out_radii = radii_t.to(device="cpu", dtype=torch.float64).clone()
        kinds = ["abstain"] * n
        order_np = order_t.numpy()
        abst = abstain_t.cpu().numpy()[order_np]  # in processing order
        q0 = self.n_queries
        lab_np, rad_np = out_labels.numpy(), out_radii.numpy()
        bar = None
        if progress is None or progress:
            from tqdm.auto import tqdm
            disable = (None if n >= 1000 else True) if progress is None else False
            bar = tqdm(total=n, desc=f"storage update ({self._index.describe()})", unit="input",
                       disable=disable, leave=False)
        bs = self._index.block_size
        pos = 0
        try:
            while pos < n:
                # the next block of up to bs stored inputs, and the abstentions among them
                stop, take = pos, []
                while stop < n and len(take) < bs:
                    if not abst[stop]:
                        take.append(stop)
                    stop += 1
                self._counts["abstain"] += (stop - pos) - len(take)
                if take:
                    rpos = np.asarray(take, dtype=np.int64)
                    idx = order_np[rpos]
                    xs = xflat[torch.from_numpy(idx).to(xflat.device)].to(device="cpu", dtype=torch.float32)
                    blk = self._insert_block(xs.contiguous(), lab_np[idx].copy(), rad_np[idx].copy(),
                                             q0 + rpos)
                    lab_np[idx] = blk.label
                    rad_np[idx] = blk.radius
                    for i, code in zip(idx.tolist(), blk.kind.tolist()):
                        kinds[i] = DECISION_KINDS[code]
                if bar is not None:
                    bar.update(stop - pos)
                pos = stop
        finally:
            if bar is not None:
                bar.close()
        secs = time.perf_counter() - t0
        self.last_stream = {"inputs": n, "stored": n_keep, "seconds": secs,
                            "inputs_per_s": n / secs if secs > 0 else float("inf"),
                            "backend": self._index.describe()}
        return out_labels, out_radii, kinds

    def check_invariant(self, since: int = 0) -> None:
        """Raise CertssbError if two stored balls with different labels overlap.

        Overlap means ||x_i - x_j|| < R_i + R_j - 1e-9 * (R_i + R_j) (float64; the relative
        tolerance absorbs rounding of trimmed radii). Checks every pair (i, j), i < j, with
        j >= since: after each insertion `check_invariant(len(store) - 1)` costs O(n D) and,
        by induction, keeps the whole store checked. The backend's search finds the candidate
        pairs (a superset of the overlaps), the exact distances decide.
        """
        n = self._n
        since = max(0, int(since))
        if n < 2 or since >= n:
            return
        cen, lab, rad = self.centres, self.labels, self.radii
        bs = self._index.block_size
        for s in range(since, n, bs):
            e = min(n, s + bs)
            cands = self._index.search(cen[s:e], self._norms[s:e].numpy(), lab[s:e].numpy(), rad[s:e].numpy(),
                                       self._arrays(e), limit=np.arange(s, e, dtype=np.int64))
            for j in range(s, e):
                if cands is None:
                    cand = np.arange(j, dtype=np.int64)
                else:
                    cand = cands[1][cands[0][j - s]:cands[0][j - s + 1]]
                if cand.size == 0:
                    continue
                ci = torch.from_numpy(cand)
                d = exact_distances(cen[j:j + 1], cen.index_select(0, ci))[0]
                rsum = rad[j] + rad[ci]
                bad = (lab[ci] != lab[j]) & (d < rsum * (1 - _INVARIANT_RTOL))
                if bool(bad.any()):
                    k = int(torch.nonzero(bad)[0, 0])
                    ii = int(cand[k])
                    raise CertssbError(
                        f"region store invariant violated: balls {ii} (label {int(lab[ii])}, radius "
                        f"{float(rad[ii])!r}) and {j} (label {int(lab[j])}, radius {float(rad[j])!r}) "
                        f"overlap at distance {float(d[k])!r}; the store is corrupt or was "
                        "built outside RegionStore.update: rebuild it")

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> str:
        """Write the store atomically as safetensors (centres, labels, radii, queries) with JSON
        metadata (format, version, dim, n, counts); returns the file's sha256. The backend is not
        recorded: `load` rebuilds any backend from the arrays."""
        cen = self.centres if self._dim is not None else torch.zeros(0, 0, dtype=torch.float32)
        return write_store_file(path, self._dim, {"centres": [cen], "labels": [self.labels],
                                                  "radii": [self.radii], "queries": [self.queries]}, self.counts)

    @classmethod
    def load(cls, path: str | os.PathLike, *, backend: str = "auto",
             device: str | torch.device = "cpu") -> RegionStore:
        """Load a store written by `save` (format version 1 or 2), validating everything
        (`certssb.certify.region_file.read_store_file`). The overlap invariant is not re-checked
        (O(n^2 D) without an index); call `check_invariant()` for that. backend/device: as in the
        constructor."""
        dim, counts, t = read_store_file(path)
        n = int(t["labels"].shape[0])
        store = cls(dim, backend=backend, device=device)
        store._n = n
        store._cap = n
        if dim is not None:
            store._centres = t["centres"].contiguous().clone()
        store._labels, store._radii, store._queries = t["labels"].clone(), t["radii"].clone(), t["queries"].clone()
        store._norms = row_norms(store._centres) if dim is not None else torch.empty(0, dtype=torch.float64)
        store._counts = counts
        store._index.sync(store._arrays())
        store.source = {"path": os.fspath(path), "sha256": sha256_file(path)}
        return store
