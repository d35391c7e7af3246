"""Tests for certssb.regions: hand-made storage updates, random streams against an independent
numpy re-implementation, the invariant, stream order, persistence and errors."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from certssb.errors import CertssbError, CheckpointError
from certssb.fileio import save_tensors
from certssb.regions import FORMAT_VERSION, UPDATE_KINDS, RegionDecision, RegionStore


def P(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


# ----------------------------------------------------------------------------- hand-made cases
def test_empty_store_and_same_label_are_none():
    s = RegionStore()
    assert len(s) == 0 and s.dim is None
    assert s.update(P(0, 0), 1, 1.0) == RegionDecision(1, 1.0, "none", -1)
    assert s.dim == 2
    # same label, overlapping: no conflict
    assert s.update(P(0.5, 0), 1, 3.0) == RegionDecision(1, 3.0, "none", -1)
    assert len(s) == 2


def test_touching_is_not_a_conflict():
    s = RegionStore(2)
    s.update(P(0, 0), 0, 1.0)
    # ||x - x_0|| = 3 = R_0 + R exactly: open balls do not overlap
    assert s.update(P(3, 0), 1, 2.0) == RegionDecision(1, 2.0, "none", -1)
    # 3-4-5 triangle: distance exactly 5
    assert s.update(P(3, 4), 1, 4.0).kind == "none"


def test_trim():
    s = RegionStore(2)
    s.update(P(0, 0), 0, 1.0)
    d = s.update(P(3, 0), 1, 2.5)
    assert d == RegionDecision(1, 2.0, "trim", 0)  # R = ||x - x_0|| - R_0 = 3 - 1
    s.check_invariant()


def test_trim_to_zero_on_the_boundary():
    s = RegionStore(2)
    s.update(P(0, 0), 0, 1.0)
    # x exactly on the boundary of ball 0 (not inside: the ball is open): m == 0 -> trim to 0
    d = s.update(P(1, 0), 1, 0.5)
    assert d == RegionDecision(1, 0.0, "trim", 0)
    s.check_invariant()


def test_align():
    s = RegionStore(2)
    s.update(P(0, 0), 0, 1.0)
    d = s.update(P(0.5, 0), 1, 2.0)
    # x inside ball 0: take its label, R = R_0 - ||x - x_0||
    assert d == RegionDecision(0, 0.5, "align", 0)
    assert s.labels.tolist() == [0, 0]
    s.check_invariant()


def test_argmin_over_several_conflicts_and_ties():
    s = RegionStore(2)
    s.update(P(0, 0), 0, 1.0)     # margin for x=(5,0): 5 - 1 = 4
    s.update(P(10, 0), 2, 3.0)    # margin: 5 - 3 = 2
    s.update(P(5, 6), 3, 4.0)     # margin: 6 - 4 = 2 (tie with index 1)
    s.update(P(5, -20), 4, 1.0)   # far: not a conflict
    s.update(P(5, 3), 1, 2.5)     # same label as the query: ignored (margin would be 0.5)
    d = s.update(P(5, 0), 1, 4.5)
    assert d == RegionDecision(1, 2.0, "trim", 1)  # tie broken by the lowest index
    s.check_invariant()
    # align picks the most negative margin
    s2 = RegionStore(2)
    s2.update(P(0, 0), 0, 2.0)    # x=(1,0): margin 1 - 2 = -1
    s2.update(P(1, 2), 0, 4.0)    # x=(1,0): margin 2 - 4 = -2  -> i* = 1
    s2.update(P(7, 0), 2, 1.0)    # x=(1,0): margin 6 - 1 = 5
    d2 = s2.update(P(1, 0), 1, 5.5)
    assert d2 == RegionDecision(0, 2.0, "align", 1)
    s2.check_invariant()


def test_duplicates_and_zero_radii():
    s = RegionStore(2)
    s.update(P(1, 1), 0, 2.0)
    # the same point with another label: inside ball 0 (distance 0) -> align with the full radius
    assert s.update(P(1, 1), 1, 0.7) == RegionDecision(0, 2.0, "align", 0)
    # zero radius at a point inside a ball of another label: align
    assert s.update(P(1.5, 1), 3, 0.0) == RegionDecision(0, 1.5, "align", 0)
    # zero-radius (empty) balls never conflict with each other
    t = RegionStore(2)
    t.update(P(0, 0), 0, 0.0)
    assert t.update(P(0, 0), 1, 0.0) == RegionDecision(1, 0.0, "none", -1)
    # a positive ball on top of an empty one of another label: m = 0 - 0 -> trim to 0
    assert t.update(P(0, 0), 2, 1.0) == RegionDecision(2, 0.0, "trim", 0)
    # a zero-radius query exactly on a boundary: not inside, no conflict
    u = RegionStore(2)
    u.update(P(0, 0), 0, 1.0)
    assert u.update(P(0, 1), 1, 0.0) == RegionDecision(1, 0.0, "none", -1)
    for st in (s, t, u):
        st.check_invariant()


def test_views_dtypes_and_counts():
    s = RegionStore()
    s.update(torch.ones(2, 3, dtype=torch.float64) * 0.5, 0, 1.0)   # any shape, flattened
    s.update(torch.zeros(6), 1, 0.5)
    assert s.centres.dtype == torch.float32 and s.centres.shape == (2, 6)
    assert s.labels.dtype == torch.int64 and s.radii.dtype == torch.float64
    assert s.counts == {"none": 1, "trim": 1, "align": 0, "abstain": 0}
    assert set(s.counts) == set(UPDATE_KINDS)
    c = s.counts
    c["none"] = 99
    assert s.counts["none"] == 1  # a copy
    # decide() does not store
    d = s.decide(torch.zeros(6), 0, 0.1)
    assert d.kind == "align" and len(s) == 2 and s.counts["align"] == 0


def test_growth_keeps_contents():
    s = RegionStore(3)
    g = torch.Generator().manual_seed(0)
    xs = torch.rand(100, 3, generator=g)
    for i in range(100):
        s.update(xs[i], 0, 0.1)
    assert torch.equal(s.centres, xs) and len(s) == 100


def test_validation_errors():
    s = RegionStore(2)
    with pytest.raises(CertssbError, match="dim"):
        s.update(torch.zeros(3), 0, 1.0)
    with pytest.raises(CertssbError, match="NaN or inf"):
        s.update(P(0, float("nan")), 0, 1.0)
    with pytest.raises(CertssbError, match="NaN or inf"):
        s.update(P(0, float("inf")), 0, 1.0)
    with pytest.raises(CertssbError, match="NaN or inf"):
        s.update(torch.tensor([1e300, 0.0], dtype=torch.float64), 0, 1.0)  # overflows float32
    with pytest.raises(CertssbError, match="radius"):
        s.update(P(0, 0), 0, -0.1)
    with pytest.raises(CertssbError, match="radius"):
        s.update(P(0, 0), 0, float("nan"))
    with pytest.raises(CertssbError, match="label"):
        s.update(P(0, 0), -1, 1.0)
    with pytest.raises(CertssbError, match="label"):
        s.update(P(0, 0), 1.5, 1.0)
    with pytest.raises(CertssbError, match="dim"):
        RegionStore(0)
    assert len(s) == 0 and s.counts == {k: 0 for k in UPDATE_KINDS}
    # tensors and numpy ints are accepted as label / radius
    assert s.update(P(0, 0), torch.tensor(2), torch.tensor(0.5)).label == 2
    assert s.update(P(9, 9), np.int64(3), np.float64(0.5)).label == 3


# ----------------------------------------------------------------------------- reference
def reference_stream(xs: np.ndarray, labels: np.ndarray, radii: np.ndarray, abstain: np.ndarray,
                     order: list[int]) -> list[tuple[int, float, str, int]]:
    """Straightforward float64 re-implementation of DESIGN.md 4 (one loop over the store)."""
    store: list[tuple[np.ndarray, int, float]] = []
    out: list[tuple[int, float, str, int]] = [(-9, -9.0, "", -9)] * len(order)
    for q in order:
        if abstain[q]:
            out[q] = (int(labels[q]), float(radii[q]), "abstain", -1)
            continue
        x = xs[q].astype(np.float32).astype(np.float64).ravel()
        c, r = int(labels[q]), float(radii[q])
        best_m, best_i = math.inf, -1
        for i, (xi, ci, ri) in enumerate(store):
            d = math.sqrt(float(np.sum((x - xi) ** 2)))
            if ci != c and d < ri + r and d - ri < best_m:  # strict: ties keep the lowest index
                best_m, best_i = d - ri, i
        if best_i < 0:
            kind = "none"
        elif best_m >= 0:
            kind, r = "trim", best_m
        else:
            xi, ci, ri = store[best_i]
            kind, c, r = "align", ci, ri - math.sqrt(float(np.sum((x - xi) ** 2)))
        store.append((x, c, r))
        out[q] = (c, r, kind, best_i)
    return out


def random_stream(seed: int, dim: int, n: int):
    """Clustered points with radii of the order of the inter-point distances, 3 labels, some
    exact duplicates, zero radii and abstentions: conflicts of every kind happen often."""
    rng = np.random.default_rng(seed)
    centres = rng.random((4, dim))
    xs = centres[rng.integers(0, 4, n)] + 0.15 * rng.standard_normal((n, dim))
    dup = rng.random(n) < 0.05
    for i in np.nonzero(dup)[0]:
        if i > 0:
            xs[i] = xs[rng.integers(0, i)]
    xs = xs.astype(np.float32)
    sub = xs[rng.choice(n, size=min(n, 60), replace=False)].astype(np.float64)
    dists = np.sqrt(((sub[:, None] - sub[None]) ** 2).sum(-1))
    scale = float(np.median(dists[np.triu_indices(len(sub), 1)]))
    radii = rng.random(n) * 0.8 * scale
    radii[rng.random(n) < 0.05] = 0.0
    labels = rng.integers(0, 3, n)
    abstain = rng.random(n) < 0.1
    return xs, labels, radii, abstain


@pytest.mark.parametrize("dim,n,seed", [(2, 300, 0), (2, 300, 1), (10, 300, 2), (10, 250, 3),
                                        (784, 200, 4), (784, 200, 5)])
def test_random_stream_matches_reference_and_keeps_invariant(dim, n, seed):
    xs, labels, radii, abstain = random_stream(seed, dim, n)
    order = np.random.default_rng(seed + 100).permutation(n).tolist()
    ref = reference_stream(xs, labels, radii, abstain, order)
    s = RegionStore(dim)
    seen = {k: 0 for k in UPDATE_KINDS}
    for q in order:
        if abstain[q]:
            seen["abstain"] += 1
            continue
        dec = s.update(torch.from_numpy(xs[q]), int(labels[q]), float(radii[q]))
        s.check_invariant(since=len(s) - 1)  # the new ball against all others: after EVERY insertion
        rc, rr, rk, ri = ref[q]
        assert (dec.label, dec.kind, dec.conflict) == (rc, rk, ri), f"input {q}"
        assert dec.radius == pytest.approx(rr, rel=1e-9, abs=1e-12)
        assert dec.radius >= 0
        seen[dec.kind] += 1
    s.check_invariant()  # and the full pairwise check at the end
    # the stream exercised every branch
    assert seen["none"] > 0 and seen["trim"] > 0 and seen["align"] > 0
    assert s.counts == {**seen, "abstain": 0}  # update() alone never sees abstentions


def test_certify_stream_with_order_equals_updates_in_that_order():
    xs, labels, radii, abstain = random_stream(11, 10, 150)
    n = len(xs)
    order = torch.from_numpy(np.random.default_rng(5).permutation(n))
    a = RegionStore()
    lab_a, rad_a, kinds_a = a.certify_stream(torch.from_numpy(xs).reshape(n, 2, 5), torch.from_numpy(labels),
                                             torch.from_numpy(radii), torch.from_numpy(abstain), order=order)
    b = RegionStore()
    lab_b = torch.from_numpy(labels).clone()
    rad_b = torch.from_numpy(radii).clone()
    kinds_b = ["abstain"] * n
    for q in order.tolist():
        if abstain[q]:
            continue
        d = b.update(torch.from_numpy(xs[q]), int(labels[q]), float(radii[q]))
        lab_b[q], rad_b[q], kinds_b[q] = d.label, d.radius, d.kind
    assert torch.equal(lab_a, lab_b) and torch.equal(rad_a, rad_b) and kinds_a == kinds_b
    assert lab_a.dtype == torch.int64 and rad_a.dtype == torch.float64
    assert torch.equal(a.centres, b.centres) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.radii, b.radii)
    assert a.counts["abstain"] == int(abstain.sum()) and b.counts["abstain"] == 0
    assert sum(a.counts.values()) == n
    assert all(a.counts[k] == kinds_a.count(k) for k in UPDATE_KINDS)
    # abstained inputs are untouched and not stored
    ab = torch.from_numpy(abstain)
    assert torch.equal(lab_a[ab], torch.from_numpy(labels)[ab]) and len(a) == n - int(abstain.sum())
    # the default order is 0..N-1, and the order matters
    c = RegionStore()
    lab_c, rad_c, _ = c.certify_stream(torch.from_numpy(xs), torch.from_numpy(labels), torch.from_numpy(radii),
                                       torch.from_numpy(abstain), progress=True)
    ref = reference_stream(xs, labels, radii, abstain, list(range(n)))
    assert lab_c.tolist() == [r[0] for r in ref]
    assert not torch.equal(rad_c, rad_a)


def test_certify_stream_errors():
    s = RegionStore()
    x = torch.zeros(3, 2)
    ok = dict(labels=torch.tensor([0, 1, 0]), radii=torch.ones(3), abstain=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(CertssbError, match="permutation"):
        s.certify_stream(x, **ok, order=torch.tensor([0, 0, 1]))
    with pytest.raises(CertssbError, match="permutation"):
        s.certify_stream(x, **ok, order=torch.tensor([0, 1]))
    with pytest.raises(CertssbError, match="labels has 2"):
        s.certify_stream(x, torch.tensor([0, 1]), ok["radii"], ok["abstain"])
    with pytest.raises(CertssbError, match="bool"):
        s.certify_stream(x, ok["labels"], ok["radii"], torch.zeros(3))
    # a bad input anywhere is reported before anything is stored
    with pytest.raises(CertssbError, match="radii"):
        s.certify_stream(x, ok["labels"], torch.tensor([1.0, 1.0, -1.0]), ok["abstain"])
    with pytest.raises(CertssbError, match="labels"):
        s.certify_stream(x, torch.tensor([0, 0, -1]), ok["radii"], ok["abstain"])
    with pytest.raises(CertssbError, match="NaN"):
        s.certify_stream(torch.tensor([[0.0, 0], [0, 0], [0, float("nan")]]), **ok)
    assert len(s) == 0 and sum(s.counts.values()) == 0
    # ... unless it is abstained: then it is passed through untouched
    lab, rad, kinds = s.certify_stream(torch.tensor([[0.0, 0], [5, 0], [0, float("nan")]]),
                                       torch.tensor([0, 1, -1]), torch.tensor([1.0, 1.0, float("nan")]),
                                       torch.tensor([False, False, True]))
    assert lab.tolist() == [0, 1, -1] and kinds == ["none", "none", "abstain"] and math.isnan(rad[2])
    s.update(torch.zeros(2), 0, 0.0)
    with pytest.raises(CertssbError, match="dim 2"):
        s.certify_stream(torch.zeros(3, 4), **ok)


# ----------------------------------------------------------------------------- invariant check
def test_check_invariant_detects_overlap(tmp_path):
    # a crafted (valid-format) file holding two overlapping balls with different labels
    path = tmp_path / "bad.safetensors"
    meta = {"format": "certssb.regions", "version": FORMAT_VERSION, "dim": 2, "n": 3,
            "counts": {"none": 3, "trim": 0, "align": 0, "abstain": 0}}
    save_tensors(path, {"centres": torch.tensor([[0.0, 0.0], [5.0, 5.0], [1.5, 0.0]]),
                        "labels": torch.tensor([0, 0, 1]), "radii": torch.tensor([1.0, 1.0, 0.6], dtype=torch.float64)},
                 metadata={"certssb_region_store": json.dumps(meta)})
    s = RegionStore.load(path)
    with pytest.raises(CertssbError, match="balls 0 .* and 2 .* overlap"):
        s.check_invariant()
    with pytest.raises(CertssbError, match="overlap"):
        s.check_invariant(since=2)
    s.check_invariant(since=3)  # nothing new to check
    # touching exactly is fine, and same-label overlaps are fine
    s._radii[2] = 0.5
    s.check_invariant()


# ----------------------------------------------------------------------------- persistence
def test_save_load_round_trip(tmp_path):
    xs, labels, radii, abstain = random_stream(7, 10, 120)
    s = RegionStore()
    s.certify_stream(torch.from_numpy(xs), torch.from_numpy(labels), torch.from_numpy(radii),
                     torch.from_numpy(abstain))
    path = tmp_path / "store.safetensors"
    digest = s.save(path)
    assert isinstance(digest, str) and len(digest) == 64
    t = RegionStore.load(path)
    assert len(t) == len(s) and t.dim == s.dim and t.counts == s.counts
    assert torch.equal(t.centres, s.centres) and torch.equal(t.labels, s.labels) and torch.equal(t.radii, s.radii)
    t.check_invariant()
    # a loaded store continues exactly like the original
    extra = torch.rand(30, 10, generator=torch.Generator().manual_seed(1))
    for i in range(30):
        assert s.update(extra[i], i % 3, 0.3) == t.update(extra[i], i % 3, 0.3)
    # empty stores, with and without dim
    for e in (RegionStore(), RegionStore(4)):
        e.save(tmp_path / "e.safetensors")
        f = RegionStore.load(tmp_path / "e.safetensors")
        assert len(f) == 0 and f.dim == e.dim
        f.update(torch.zeros(4), 0, 1.0)
        assert len(f) == 1


def _write(path, centres, labels, radii, meta=None, raw_meta=None):
    m = {"format": "certssb.regions", "version": FORMAT_VERSION, "dim": centres.shape[1] if centres.dim() == 2 else None,
         "n": labels.shape[0], "counts": {k: 0 for k in UPDATE_KINDS}}
    if meta:
        m.update(meta)
    md = {"certssb_region_store": raw_meta if raw_meta is not None else json.dumps(m)}
    save_tensors(path, {"centres": centres, "labels": labels, "radii": radii}, metadata=md)


def test_load_rejects_corrupt_files(tmp_path):
    good_c = torch.zeros(2, 3)
    good_l = torch.tensor([0, 1])
    good_r = torch.tensor([0.5, 0.5], dtype=torch.float64)
    p = tmp_path / "x.safetensors"

    with pytest.raises(CheckpointError, match="does not exist"):
        RegionStore.load(tmp_path / "missing.safetensors")
    p.write_bytes(b"definitely not safetensors")
    with pytest.raises(CheckpointError, match="safetensors"):
        RegionStore.load(p)
    # truncated
    _write(p, good_c, good_l, good_r)
    data = p.read_bytes()
    p.write_bytes(data[:-5])
    with pytest.raises(CheckpointError):
        RegionStore.load(p)
    # no metadata at all
    save_tensors(p, {"centres": good_c, "labels": good_l, "radii": good_r})
    with pytest.raises(CheckpointError, match="not a certssb region store"):
        RegionStore.load(p)
    cases = [
        (dict(raw_meta="{not json"), "JSON"),
        (dict(meta={"format": "other"}), "region store"),
        (dict(meta={"version": FORMAT_VERSION + 1}), "version"),
        (dict(meta={"n": 3}), "shapes"),
        (dict(meta={"dim": 4}), "shapes"),
        (dict(meta={"n": -1}), "invalid n"),
        (dict(meta={"counts": {"none": 1}}), "counts"),
        (dict(meta={"counts": {"none": -1, "trim": 0, "align": 0, "abstain": 0}}), "counts"),
    ]
    for kw, msg in cases:
        _write(p, good_c, good_l, good_r, **kw)
        with pytest.raises(CheckpointError, match=msg):
            RegionStore.load(p)
    bad_tensors = [
        ((good_c.double(), good_l, good_r), "dtypes"),
        ((good_c, good_l.int(), good_r), "dtypes"),
        ((good_c, good_l, good_r.float()), "dtypes"),
        ((good_c, good_l, torch.tensor([0.5, float("nan")], dtype=torch.float64)), "non-finite"),
        ((torch.tensor([[0.0, float("inf"), 0], [0, 0, 0]]), good_l, good_r), "non-finite"),
        ((good_c, good_l, torch.tensor([0.5, -0.5], dtype=torch.float64)), "negative"),
        ((good_c, torch.tensor([0, -2]), good_r), "negative"),
        ((good_c, good_l, good_r[:1]), "shapes"),
    ]
    for (c, l, r), msg in bad_tensors:
        _write(p, c, l, r, meta={"n": 2, "dim": 3})
        with pytest.raises(CheckpointError, match=msg):
            RegionStore.load(p)
    # an extra tensor
    save_tensors(p, {"centres": good_c, "labels": good_l, "radii": good_r, "x": torch.zeros(1)},
                 metadata={"certssb_region_store": json.dumps(
                     {"format": "certssb.regions", "version": FORMAT_VERSION, "dim": 3, "n": 2,
                      "counts": {k: 0 for k in UPDATE_KINDS}})})
    with pytest.raises(CheckpointError, match="expected tensors"):
        RegionStore.load(p)
    # and the good file loads
    _write(p, good_c, good_l, good_r)
    assert len(RegionStore.load(p)) == 2


def test_chunked_distances_give_the_same_decisions(monkeypatch):
    """Tiny distance blocks (as for huge stores / ImageNette-sized inputs) change nothing."""
    import certssb.regions as regions

    xs, labels, radii, abstain = random_stream(21, 10, 120)
    args = (torch.from_numpy(xs), torch.from_numpy(labels), torch.from_numpy(radii), torch.from_numpy(abstain))
    big = RegionStore()
    out_big = big.certify_stream(*args)
    monkeypatch.setattr(regions, "_CHUNK_ELEMS", 35)  # 3 rows of 10 features per block
    small = RegionStore()
    out_small = small.certify_stream(*args)
    assert torch.equal(out_big[0], out_small[0]) and torch.equal(out_big[1], out_small[1])
    assert out_big[2] == out_small[2]
    small.check_invariant()
    ref = reference_stream(xs, labels, radii, abstain, list(range(len(xs))))
    assert out_small[2] == [r[2] for r in ref]
