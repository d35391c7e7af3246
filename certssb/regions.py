"""Storage-update certifier: keeps the certified L2 balls of all inputs label-consistent.

This file's one job is DESIGN.md 4. Certified regions are open L2 balls
B(x, R) with a label c. A store S of (x_i, c_i, R_i) grows one input at a time;
for a new input (x, c, R):

    conflicts = { i in S : c_i != c and ||x - x_i|| < R_i + R }
    none      -> keep (c, R)                                       ("none")
    otherwise m = min over conflicts of ||x - x_i|| - R_i, i* its argmin
              (ties: lowest store index)
        m >= 0 -> R = m                    (the ball now touches)  ("trim")
        m <  0 -> c = c_i*, R = R_i* - ||x - x_i*||  (x inside i*) ("align")
    store (x, c, R).

Invariant: no two stored balls with different labels overlap. Results depend on
the query order, which `certify_stream` takes explicitly.

This is the brute-force reference backend: every update computes the exact
float64 distance to every stored centre. Centres are stored as float32 (the
dtype of images) and every distance, including the one of the input being
inserted, is computed from the float32 values cast to float64, so the numbers
a decision used are exactly the ones stored. A FAISS backend can override
`_distances` (it must never miss a conflict).
"""
from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import CertssbError, CheckpointError
from .fileio import load_tensors, save_tensors

__all__ = ["UPDATE_KINDS", "RegionDecision", "RegionStore", "FORMAT_VERSION"]

UPDATE_KINDS = ("none", "trim", "align", "abstain")
FORMAT_VERSION = 1
_META_KEY = "certssb_region_store"
_FORMAT_NAME = "certssb.regions"
# Chunk the float64 difference computations to about this many elements (memory bound).
_CHUNK_ELEMS = 1 << 22
# check_invariant forgives overlaps this small relative to R_i + R_j (float64 rounding of
# R = ||x - x_i|| - R_i and of differently ordered sums).
_INVARIANT_RTOL = 1e-9


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


def _pairwise_dist(a: Tensor, b: Tensor) -> Tensor:
    """Exact Euclidean distances float64 [n, k] between the rows of a [n, D] and b [k, D].

    Blocks of rows are cast to float64 one at a time (the store stays float32 and no float64
    copy of it is ever made) and compared by the direct sum of squared differences (no
    ||a||^2 + ||b||^2 - 2ab expansion, which loses precision for close points).
    """
    n, d = a.shape
    k = b.shape[0]
    out = torch.empty(n, k, dtype=torch.float64, device=a.device)
    if n == 0 or k == 0:
        return out
    rows = max(1, _CHUNK_ELEMS // max(d, 1))
    for i in range(0, n, rows):
        a64 = a[i:i + rows].to(torch.float64)
        for j in range(0, k, rows):
            out[i:i + rows, j:j + rows] = torch.cdist(a64, b[j:j + rows].to(torch.float64),
                                                      compute_mode="donot_use_mm_for_euclid_dist")
    return out


class RegionStore:
    """A growing store of certified balls (centre float32 [D], label int64, radius float64).

    Args:
        dim: number of features D of a flattened input; None: taken from the first input.
        device: where the store (and the distance computations) live.
    """

    def __init__(self, dim: int | None = None, *, device: str | torch.device = "cpu") -> None:
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1):
            raise CertssbError(f"dim must be a positive integer or None, got {dim!r}")
        self._dim: int | None = None if dim is None else int(dim)
        self.device = torch.device(device)
        self._n = 0
        cap_d = self._dim if self._dim is not None else 0
        self._centres = torch.empty(0, cap_d, dtype=torch.float32, device=self.device)
        self._labels = torch.empty(0, dtype=torch.int64, device=self.device)
        self._radii = torch.empty(0, dtype=torch.float64, device=self.device)
        self._counts = {k: 0 for k in UPDATE_KINDS}

    # ------------------------------------------------------------------ views
    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"RegionStore(n={self._n}, dim={self._dim}, device={self.device}, counts={self._counts})"

    @property
    def dim(self) -> int | None:
        """Number of features D, or None before the first input."""
        return self._dim

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
    def counts(self) -> dict[str, int]:
        """Running number of decisions of each kind in UPDATE_KINDS (a copy)."""
        return dict(self._counts)

    # ------------------------------------------------------------------ input checks
    def _prepare_x(self, x: Tensor) -> Tensor:
        """Flatten x to float32 [D] on the store's device, checking dim and finiteness."""
        if not isinstance(x, Tensor):
            raise CertssbError(f"x must be a tensor, got {type(x).__name__}")
        xf = x.detach().reshape(-1).to(device=self.device, dtype=torch.float32)
        if xf.numel() == 0:
            raise CertssbError("x is empty; pass one input of shape [C, H, W] (or any shape with D > 0 elements)")
        if self._dim is not None and xf.numel() != self._dim:
            raise CertssbError(f"x has {xf.numel()} elements but the store holds inputs of dim {self._dim}; "
                               "use one store per dataset / input shape")
        if not bool(torch.isfinite(xf).all()):
            raise CertssbError("x contains NaN or inf (after casting to float32); check the input images")
        return xf

    @staticmethod
    def _check_label_radius(label: int, radius: float) -> tuple[int, float]:
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
                               "certssb.bounds.certified_radius")
        return int(label), radius

    # ------------------------------------------------------------------ core
    def _distances(self, xf: Tensor) -> Tensor:
        """Exact float64 distances [n] from xf (float32 [D]) to every stored centre.

        The backend hook: a faster backend may return +inf for centres it proves are farther
        than R + max(R_i), never a smaller or missing distance for a possible conflict."""
        return _pairwise_dist(xf[None, :], self.centres)[0]

    def _append(self, xf: Tensor, label: int, radius: float) -> None:
        if self._dim is None:
            self._dim = int(xf.numel())
            self._centres = torch.empty(0, self._dim, dtype=torch.float32, device=self.device)
        if self._n == self._centres.shape[0]:
            # Amortized O(1) growth: double the capacity.
            cap = max(16, 2 * self._n)
            c = torch.empty(cap, self._dim, dtype=torch.float32, device=self.device)
            c[: self._n] = self._centres[: self._n]
            lab = torch.empty(cap, dtype=torch.int64, device=self.device)
            lab[: self._n] = self._labels[: self._n]
            rad = torch.empty(cap, dtype=torch.float64, device=self.device)
            rad[: self._n] = self._radii[: self._n]
            self._centres, self._labels, self._radii = c, lab, rad
        self._centres[self._n] = xf
        self._labels[self._n] = label
        self._radii[self._n] = radius
        self._n += 1

    def decide(self, x: Tensor, label: int, radius: float) -> RegionDecision:
        """The decision `update` would take for (x, label, radius), without storing anything."""
        xf = self._prepare_x(x)
        label, radius = self._check_label_radius(label, radius)
        return self._decide(xf, label, radius)

    def _decide(self, xf: Tensor, label: int, radius: float) -> RegionDecision:
        if self._n == 0:
            return RegionDecision(label, radius, "none", -1)
        d = self._distances(xf)
        lab = self.labels
        rad = self.radii
        conflict = (lab != label) & (d < rad + radius)
        if not bool(conflict.any()):
            return RegionDecision(label, radius, "none", -1)
        margin = torch.where(conflict, d - rad, torch.full_like(d, math.inf))
        mval = margin.min()
        # Lowest index among the minimizers (do not rely on argmin's tie order).
        istar = int(torch.nonzero(margin == mval)[0, 0].item())
        m = float(mval.item())
        if m >= 0:
            return RegionDecision(label, m, "trim", istar)
        new_r = float(rad[istar].item()) - float(d[istar].item())
        return RegionDecision(int(lab[istar].item()), new_r, "align", istar)

    def update(self, x: Tensor, label: int, radius: float) -> RegionDecision:
        """Apply the storage update of DESIGN.md 4 to one input and store the result.

        Args:
            x: one input, any shape; flattened to [D] and stored as float32.
            label: predicted class >= 0.
            radius: certified radius >= 0 (finite).
        Returns:
            the RegionDecision (stored label, stored radius, kind, conflicting index i*).
        """
        xf = self._prepare_x(x)
        label, radius = self._check_label_radius(label, radius)
        dec = self._decide(xf, label, radius)
        self._append(xf, dec.label, dec.radius)
        self._counts[dec.kind] += 1
        return dec

    def certify_stream(self, x: Tensor, labels: Tensor, radii: Tensor, abstain: Tensor,
                       order: Tensor | None = None, *, progress: bool | None = None
                       ) -> tuple[Tensor, Tensor, list[str]]:
        """Run `update` over a batch of inputs in a given order.

        Args:
            x: [N, ...] inputs.
            labels: [N] predicted classes (int).
            radii: [N] certified radii.
            abstain: [N] bool; abstained inputs are not stored and keep their label and radius.
            order: a permutation of 0..N-1 giving the processing order (default 0..N-1).
            progress: show a tqdm bar; None: only for N >= 1000 and when stderr is a terminal.
        Returns:
            (labels int64 [N], radii float64 [N], kinds list of N str), in the ORIGINAL index
            order; kinds are "none", "trim", "align" or "abstain".
        """
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
        # Validate every stored input first so that a bad one cannot leave a half-updated store.
        keep = ~abstain_t.cpu()
        if bool(keep.any()):
            xk = x.detach().reshape(n, -1)[keep.to(x.device)]
            if self._dim is not None and xk.shape[1] != self._dim:
                raise CertssbError(f"x has {xk.shape[1]} elements per input but the store holds inputs "
                                   f"of dim {self._dim}; use one store per dataset / input shape")
            if not bool(torch.isfinite(xk.to(torch.float32)).all()):
                raise CertssbError("x contains NaN or inf (after casting to float32) in a non-abstained "
                                   "input; check the input images")
            lk, rk = labels_t.cpu()[keep], radii_t.cpu()[keep].to(torch.float64)
            if bool((lk < 0).any()):
                raise CertssbError("labels must be >= 0 for every non-abstained input; mark inputs "
                                   "without a prediction as abstained")
            if not bool((torch.isfinite(rk) & (rk >= 0)).all()):
                raise CertssbError("radii must be finite and >= 0 for every non-abstained input; "
                                   "compute them with certssb.bounds.certified_radius")
        out_labels = labels_t.to(device="cpu", dtype=torch.int64).clone()
        out_radii = radii_t.to(device="cpu", dtype=torch.float64).clone()
        kinds = ["abstain"] * n
        abst = abstain_t.cpu().tolist()
        idx_list = order_t.tolist()
        iterator = idx_list
        if progress is None or progress:
            from tqdm import tqdm
            disable = (None if n >= 1000 else True) if progress is None else False
            iterator = tqdm(idx_list, desc="storage update", unit="input", disable=disable)
        for i in iterator:
            if abst[i]:
                self._counts["abstain"] += 1
                continue
            dec = self.update(x[i], int(out_labels[i]), float(out_radii[i]))
            out_labels[i] = dec.label
            out_radii[i] = dec.radius
            kinds[i] = dec.kind
        return out_labels, out_radii, kinds

    def check_invariant(self, since: int = 0) -> None:
        """Raise CertssbError if two stored balls with different labels overlap.

        Overlap means ||x_i - x_j|| < R_i + R_j - 1e-9 * (R_i + R_j) (float64; the relative
        tolerance absorbs rounding of trimmed radii). Checks every pair (i, j), i < j, with
        j >= since: after each insertion `check_invariant(len(store) - 1)` costs O(n D) and,
        by induction, keeps the whole store checked.
        """
        n = self._n
        since = max(0, int(since))
        if n < 2 or since >= n:
            return
        cen = self.centres
        lab = self.labels
        rad = self.radii
        # bound the [rows, n] distance block as well as the float64 copies of the rows
        rows = max(1, min(_CHUNK_ELEMS // max(self._dim or 1, 1), _CHUNK_ELEMS // n))
        for s in range(since, n, rows):
            e = min(n, s + rows)
            d = _pairwise_dist(cen[s:e], cen[:e])  # [e-s, e]
            rsum = rad[s:e, None] + rad[None, :e]
            j = torch.arange(s, e, device=self.device)[:, None]
            i = torch.arange(e, device=self.device)[None, :]
            bad = (i < j) & (lab[s:e, None] != lab[None, :e]) & (d < rsum * (1 - _INVARIANT_RTOL))
            if bool(bad.any()):
                jj, ii = (int(v) for v in torch.nonzero(bad)[0].tolist())
                jj += s
                raise CertssbError(
                    f"region store invariant violated: balls {ii} (label {int(lab[ii])}, radius "
                    f"{float(rad[ii])!r}) and {jj} (label {int(lab[jj])}, radius {float(rad[jj])!r}) "
                    f"overlap at distance {float(d[jj - s, ii])!r}; the store is corrupt or was "
                    "built outside RegionStore.update: rebuild it")

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> str:
        """Write the store atomically as safetensors (centres, labels, radii) with JSON metadata
        (format, version, dim, n, counts); returns the file's sha256."""
        meta = {"format": _FORMAT_NAME, "version": FORMAT_VERSION, "dim": self._dim,
                "n": self._n, "counts": self.counts}
        cen = self.centres if self._dim is not None else torch.zeros(0, 0, dtype=torch.float32)
        return save_tensors(path, {"centres": cen, "labels": self.labels, "radii": self.radii},
                            metadata={_META_KEY: json.dumps(meta)})

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> RegionStore:
        """Load a store written by `save`, validating everything; CheckpointError when the file
        is missing, not safetensors, of another format/version, or holds inconsistent shapes,
        wrong dtypes, non-finite values, negative labels or radii. The overlap invariant is not
        re-checked (O(n^2 D)); call `check_invariant()` for that."""
        tensors = load_tensors(path)
        meta_raw = _read_metadata(path).get(_META_KEY)
        if meta_raw is None:
            raise CheckpointError(f"{path} is not a certssb region store (no {_META_KEY!r} metadata)")
        try:
            meta = json.loads(meta_raw)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: region store metadata is not valid JSON ({e})") from None

        def bad(msg: str) -> CheckpointError:
            return CheckpointError(f"{path}: {msg}; the file is corrupt or from another version, "
                                   "rebuild the store")

        if not isinstance(meta, dict) or meta.get("format") != _FORMAT_NAME:
            raise bad("metadata does not describe a certssb region store")
        if meta.get("version") != FORMAT_VERSION:
            raise bad(f"unsupported format version {meta.get('version')!r} (this build reads {FORMAT_VERSION})")
        n, dim, counts = meta.get("n"), meta.get("dim"), meta.get("counts")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise bad(f"invalid n {n!r}")
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise bad(f"invalid dim {dim!r}")
        if dim is None and n > 0:
            raise bad("dim is missing for a non-empty store")
        if (not isinstance(counts, dict) or set(counts) != set(UPDATE_KINDS)
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in counts.values())):
            raise bad(f"invalid counts {counts!r}")
        if set(tensors) != {"centres", "labels", "radii"}:
            raise bad(f"expected tensors centres, labels, radii, found {sorted(tensors)}")
        cen, lab, rad = tensors["centres"], tensors["labels"], tensors["radii"]
        if cen.dtype != torch.float32 or lab.dtype != torch.int64 or rad.dtype != torch.float64:
            raise bad(f"wrong dtypes (centres {cen.dtype}, labels {lab.dtype}, radii {rad.dtype}; "
                      "expected float32, int64, float64)")
        exp_cen = (n, dim if dim is not None else 0)
        if tuple(cen.shape) != exp_cen or tuple(lab.shape) != (n,) or tuple(rad.shape) != (n,):
            raise bad(f"shapes centres {tuple(cen.shape)}, labels {tuple(lab.shape)}, radii "
                      f"{tuple(rad.shape)} do not match n={n}, dim={dim}")
        if not bool(torch.isfinite(cen).all()) or not bool(torch.isfinite(rad).all()):
            raise bad("non-finite centres or radii")
        if bool((rad < 0).any()) or bool((lab < 0).any()):
            raise bad("negative radii or labels")
        store = cls(dim, device=device)
        dev = store.device
        if dim is not None:
            store._centres = cen.to(dev).clone()
        store._labels = lab.to(dev).clone()
        store._radii = rad.to(dev).clone()
        store._n = n
        store._counts = {k: int(counts[k]) for k in UPDATE_KINDS}
        return store


def _read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file (its JSON header's __metadata__)."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata()
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is not a valid safetensors file ({e})") from None
    return dict(meta or {})
