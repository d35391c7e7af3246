"""Tests for certssb.certify.regions: hand-made storage updates, random streams against an independent
numpy re-implementation, the invariant, stream order, persistence and errors, each run with
every CPU search backend (reference, faiss, torch-gpu on CPU tensors) and, under needs_cuda,
the GPU backend. Decisions must be bit-identical across backends."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certssb.errors import CertssbError, CheckpointError
from certssb.core.files import save_tensors
from certssb.certify.region_search import faiss_available
from certssb.certify.regions import FORMAT_VERSION, UPDATE_KINDS, RegionDecision, RegionStore


HAS_FAISS = faiss_available()
_ALL_CPU = [dict(backend="reference"), dict(backend="faiss"), dict(backend="torch-gpu", device="cpu")]
CPU_BACKENDS = [b for b in _ALL_CPU if HAS_FAISS or b["backend"] != "faiss"]  # the ones this machine has
FAST_BACKENDS = CPU_BACKENDS[1:]


@pytest.fixture(params=[pytest.param(b, id=b["backend"], marks=pytest.mark.skipif(
    b["backend"] == "faiss" and not HAS_FAISS, reason="faiss is not installed")) for b in _ALL_CPU])
def backend(request) -> dict:
    """Keyword arguments of RegionStore selecting one CPU backend."""
    return request.param


def P(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


# ----------------------------------------------------------------------------- hand-made cases
def test_empty_store_and_same_label_are_none(backend):
    s = RegionStore(**backend)
    assert len(s) == 0 and s.dim is None
    assert s.update(P(0, 0), 1, 1.0) == RegionDecision(1, 1.0, "none", -1)
    assert s.dim == 2
    # same label, overlapping: no conflict
    assert s.update(P(0.5, 0), 1, 3.0) == RegionDecision(1, 3.0, "none", -1)
    assert len(s) == 2


def test_touching_is_not_a_conflict(backend):
    s = RegionStore(2, **backend)
    s.update(P(0, 0), 0, 1.0)
    # ||x - x_0|| = 3 = R_0 + R exactly: open balls do not overlap
    assert s.update(P(3, 0), 1, 2.0) == RegionDecision(1, 2.0, "none", -1)
    # 3-4-5 triangle: distance exactly 5
    assert s.update(P(3, 4), 1, 4.0).kind == "none"


def test_trim(backend):
    s = RegionStore(2, **backend)
    s.update(P(0, 0), 0, 1.0)
    d = s.update(P(3, 0), 1, 2.5)
    assert d == RegionDecision(1, 2.0, "trim", 0)  # R = ||x - x_0|| - R_0 = 3 - 1
    s.check_invariant()


def test_trim_to_zero_on_the_boundary(backend):
    s = RegionStore(2, **backend)
    s.update(P(0, 0), 0, 1.0)
    # x exactly on the boundary of ball 0 (not inside: the ball is open): m == 0 -> trim to 0
    d = s.update(P(1, 0), 1, 0.5)
    assert d == RegionDecision(1, 0.0, "trim", 0)
    s.check_invariant()


def test_align(backend):
    s = RegionStore(2, **backend)
    s.update(P(0, 0), 0, 1.0)
    d = s.update(P(0.5, 0), 1, 2.0)
    # x inside ball 0: take its label, R = R_0 - ||x - x_0||
    assert d == RegionDecision(0, 0.5, "align", 0)
    assert s.labels.tolist() == [0, 0]
    s.check_invariant()


def test_argmin_over_several_conflicts_and_ties(backend):
    s = RegionStore(2, **backend)
    s.update(P(0, 0), 0, 1.0)     # margin for x=(5,0): 5 - 1 = 4
    s.update(P(10, 0), 2, 3.0)    # margin: 5 - 3 = 2
    s.update(P(5, 6), 3, 4.0)     # margin: 6 - 4 = 2 (tie with index 1)
    s.update(P(5, -20), 4, 1.0)   # far: not a conflict
    s.update(P(5, 3), 1, 2.5)     # same label as the query: ignored (margin would be 0.5)
    d = s.update(P(5, 0), 1, 4.5)
    assert d == RegionDecision(1, 2.0, "trim", 1)  # tie broken by the lowest index
    s.check_invariant()
    # align picks the most negative margin
    s2 = RegionStore(2, **backend)
    s2.update(P(0, 0), 0, 2.0)    # x=(1,0): margin 1 - 2 = -1
    s2.update(P(1, 2), 0, 4.0)    # x=(1,0): margin 2 - 4 = -2  -> i* = 1
    s2.update(P(7, 0), 2, 1.0)    # x=(1,0): margin 6 - 1 = 5
    d2 = s2.update(P(1, 0), 1, 5.5)
    assert d2 == RegionDecision(0, 2.0, "align", 1)
    s2.check_invariant()


def test_duplicates_and_zero_radii(backend):
    s = RegionStore(2, **backend)
    s.update(P(1, 1), 0, 2.0)
    # the same point with another label: inside ball 0 (distance 0) -> align with the full radius
    assert s.update(P(1, 1), 1, 0.7) == RegionDecision(0, 2.0, "align", 0)
    # zero radius at a point inside a ball of another label: align
    assert s.update(P(1.5, 1), 3, 0.0) == RegionDecision(0, 1.5, "align", 0)
    # zero-radius (empty) balls never conflict with each other
    t = RegionStore(2, **backend)
    t.update(P(0, 0), 0, 0.0)
    assert t.update(P(0, 0), 1, 0.0) == RegionDecision(1, 0.0, "none", -1)
    # a positive ball on top of an empty one of another label: m = 0 - 0 -> trim to 0
    assert t.update(P(0, 0), 2, 1.0) == RegionDecision(2, 0.0, "trim", 0)
    # a zero-radius query exactly on a boundary: not inside, no conflict
    u = RegionStore(2, **backend)
    u.update(P(0, 0), 0, 1.0)
    assert u.update(P(0, 1), 1, 0.0) == RegionDecision(1, 0.0, "none", -1)
    for store in (s, t, u):
        store.check_invariant()


def test_views_dtypes_and_counts(backend):
    s = RegionStore(**backend)
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


def test_growth_keeps_contents(backend):
    s = RegionStore(3, **backend)
    g = torch.Generator().manual_seed(0)
    xs = torch.rand(100, 3, generator=g)
    for i in range(100):
        s.update(xs[i], 0, 0.1)
    assert torch.equal(s.centres, xs) and len(s) == 100


def test_validation_errors(backend):
    s = RegionStore(2, **backend)
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
        RegionStore(0, **backend)
    assert len(s) == 0 and s.counts == {k: 0 for k in UPDATE_KINDS}
    # tensors and numpy ints are accepted as label / radius
    assert s.update(P(0, 0), torch.tensor(2), torch.tensor(0.5)).label == 2
    assert s.update(P(9, 9), np.int64(3), np.float64(0.5)).label == 3



# ----------------------------------------------------------------------------- reference
def reference_stream(xs: np.ndarray, labels: np.ndarray, radii: np.ndarray, abstain: np.ndarray,
                     order: list[int]) -> list[tuple[int, float, str, int]]:
    """Straightforward float64 re-implementation of the storage update (docs/THEORY.md section 6; one loop over the store)."""
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
    sq = (sub * sub).sum(1)
    dists = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * sub @ sub.T, 0))  # a scale only
    scale = float(np.median(dists[np.triu_indices(len(sub), 1)]))
    radii = rng.random(n) * 0.8 * scale
    radii[rng.random(n) < 0.05] = 0.0
    labels = rng.integers(0, 3, n)
    abstain = rng.random(n) < 0.1
    return xs, labels, radii, abstain


def lattice_stream(seed: int, dim: int, n: int, offset: float = 0.0):
    """Points on the integer grid {0..4}^3 (embedded in dim features; the other features hold
    `offset`, which inflates the norms and so the float32 error bound of the search without
    changing any distance), radii in halves: distances like 1, 2, 3, 5 equal R_i + R exactly,
    so boundaries, exact ties, touching balls, duplicates and zero radii are everywhere. Every
    distance is exact in float64, whatever the summation order."""
    rng = np.random.default_rng(seed)
    xs = np.full((n, dim), offset, dtype=np.float32)
    k = min(3, dim)
    xs[:, :k] = rng.integers(0, 5, (n, k))
    radii = rng.choice([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 5.0], n)
    labels = rng.integers(0, 3, n)
    abstain = rng.random(n) < 0.1
    return xs, labels, radii, abstain


def small_blocks(store: RegionStore, size: int) -> RegionStore:
    """Search in blocks of `size` inputs (exercises the pairs inside a block)."""
    store._index.block_size = size
    return store


def stream_args(xs, labels, radii, abstain):
    return (torch.from_numpy(xs), torch.from_numpy(labels), torch.from_numpy(radii), torch.from_numpy(abstain))


@pytest.mark.parametrize("dim,n,seed", [(2, 300, 0), (2, 300, 1), (10, 250, 3), (784, 150, 4)])
def test_random_stream_matches_reference_and_keeps_invariant(dim, n, seed, backend):
    xs, labels, radii, abstain = random_stream(seed, dim, n)
    order = np.random.default_rng(seed + 100).permutation(n).tolist()
    ref = reference_stream(xs, labels, radii, abstain, order)
    s = RegionStore(dim, **backend)
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


def _certify(store, xs, labels, radii, abstain, order):
    return store.certify_stream(*stream_args(xs, labels, radii, abstain), order=torch.from_numpy(order))


def _same_store(a: RegionStore, b: RegionStore) -> None:
    assert len(a) == len(b) and a.counts == b.counts
    assert torch.equal(a.centres, b.centres) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.radii, b.radii) and torch.equal(a.queries, b.queries)


@pytest.mark.parametrize("maker,dim,n,seed", [
    (random_stream, 2, 200, 30), (random_stream, 10, 200, 31), (random_stream, 784, 120, 32),
    (random_stream, 3072, 60, 33), (random_stream, 150528, 16, 34),
    (lattice_stream, 3, 300, 40), (lattice_stream, 784, 150, 41), (lattice_stream, 3072, 80, 42),
    (lattice_stream, 150528, 24, 43),
])
def test_every_backend_takes_the_reference_decisions_bit_for_bit(maker, dim, n, seed):
    """certify_stream (blocked search, several block sizes) on every backend equals the
    brute-force reference exactly: labels, radii (==, not approx), kinds, stored arrays."""
    xs, labels, radii, abstain = maker(seed, dim, n)
    order = np.random.default_rng(seed).permutation(n)
    ref = RegionStore(backend="reference")
    out_ref = _certify(ref, xs, labels, radii, abstain, order)
    ref.check_invariant()
    kinds = set(out_ref[2])
    assert {"none", "abstain"} <= kinds and ({"trim", "align"} & kinds)
    for kw in FAST_BACKENDS:
        for bs in (1, 7, None):
            s = RegionStore(**kw)
            if bs is not None:
                small_blocks(s, bs)
            out = _certify(s, xs, labels, radii, abstain, order)
            assert torch.equal(out[0], out_ref[0]) and torch.equal(out[1], out_ref[1]), (kw, bs)
            assert out[2] == out_ref[2], (kw, bs)
            _same_store(s, ref)
    s.check_invariant()


def test_lattice_stream_matches_the_numpy_reference_exactly():
    # integer coordinates: every distance is exact, so even the radii agree exactly with numpy
    xs, labels, radii, abstain = lattice_stream(5, 3, 400)
    order = np.random.default_rng(5).permutation(400)
    ref = reference_stream(xs, labels, radii, abstain, order.tolist())
    for kw in CPU_BACKENDS:
        lab, rad, kinds = _certify(small_blocks(RegionStore(**kw), 16), xs, labels, radii, abstain, order)
        assert lab.tolist() == [r[0] for r in ref] and rad.tolist() == [r[1] for r in ref]
        assert kinds == [r[2] for r in ref]
    counts = {k: kinds.count(k) for k in UPDATE_KINDS}
    assert min(counts.values()) > 10, counts  # every branch, many times
    # boundaries really happen: some stored trimmed balls touch their conflict exactly
    assert sum(1 for r in ref if r[2] == "trim" and r[1] == 0.0) > 0


coords = st.integers(-3, 3).map(lambda v: v / 2)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_property_every_backend_equals_the_reference_and_keeps_the_invariant(data):
    dim = data.draw(st.integers(1, 4), label="dim")
    n = data.draw(st.integers(1, 24), label="n")
    xs = np.array(data.draw(st.lists(st.lists(coords, min_size=dim, max_size=dim), min_size=n, max_size=n)),
                  dtype=np.float32).reshape(n, dim)
    radii = np.array(data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.5]) | st.floats(0, 4),
                                        min_size=n, max_size=n)), dtype=np.float64)
    labels = np.array(data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)), dtype=np.int64)
    abstain = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
    order = np.array(data.draw(st.permutations(list(range(n)))), dtype=np.int64)
    block = data.draw(st.integers(1, 6), label="block")
    ref = reference_stream(xs, labels, radii, abstain, order.tolist())
    expect = ([r[0] for r in ref], [r[1] for r in ref], [r[2] for r in ref])
    # one input at a time, invariant after every insertion
    s = RegionStore(backend=data.draw(st.sampled_from(["reference", "faiss" if HAS_FAISS else "torch-gpu"])),
                    device="cpu")
    for q in order:
        if not abstain[q]:
            dec = s.update(torch.from_numpy(xs[q]), int(labels[q]), float(radii[q]))
            assert (dec.label, dec.radius, dec.kind, dec.conflict) == ref[q]
            s.check_invariant(since=len(s) - 1)
    # blocked streams on every backend
    for kw in CPU_BACKENDS:
        lab, rad, kinds = _certify(small_blocks(RegionStore(**kw), block), xs, labels, radii, abstain, order)
        assert (lab.tolist(), rad.tolist(), kinds) == expect


def test_certify_stream_with_order_equals_updates_in_that_order(backend):
    xs, labels, radii, abstain = random_stream(11, 10, 150)
    n = len(xs)
    order = torch.from_numpy(np.random.default_rng(5).permutation(n))
    a = small_blocks(RegionStore(**backend), 16)
    lab_a, rad_a, kinds_a = a.certify_stream(torch.from_numpy(xs).reshape(n, 2, 5), torch.from_numpy(labels),
                                             torch.from_numpy(radii), torch.from_numpy(abstain), order=order)
    b = RegionStore(**backend)
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
    # the order is recorded: stored ball k came from query number queries[k] (abstentions count)
    rank = torch.empty(n, dtype=torch.int64).scatter_(0, order, torch.arange(n))
    stored = order[~torch.from_numpy(abstain)[order]]
    assert torch.equal(a.queries, rank[stored]) and torch.equal(a.centres, torch.from_numpy(xs)[stored])
    # abstained inputs are untouched and not stored
    ab = torch.from_numpy(abstain)
    assert torch.equal(lab_a[ab], torch.from_numpy(labels)[ab]) and len(a) == n - int(abstain.sum())
    # the default order is 0..N-1, and the order matters
    c = RegionStore(**backend)
    lab_c, rad_c, _ = c.certify_stream(torch.from_numpy(xs), torch.from_numpy(labels), torch.from_numpy(radii),
                                       torch.from_numpy(abstain), progress=True)
    ref = reference_stream(xs, labels, radii, abstain, list(range(n)))
    assert lab_c.tolist() == [r[0] for r in ref]
    assert not torch.equal(rad_c, rad_a)
    assert c.last_stream["inputs"] == n and c.last_stream["stored"] == len(c)
    assert c.last_stream["inputs_per_s"] > 0 and c.last_stream["backend"] == c.backend


def test_a_stream_in_pieces_continues_exactly():
    """Certifying a stream in several calls (a deployed certifier, or a long stream read in
    chunks) gives the same store, decisions and query numbers as one call."""
    xs, labels, radii, abstain = random_stream(12, 10, 200)
    whole = RegionStore()
    out = whole.certify_stream(*stream_args(xs, labels, radii, abstain))
    parts = RegionStore(backend="torch-gpu", device="cpu")
    pieces = [parts.certify_stream(*stream_args(xs[a:a + 70], labels[a:a + 70], radii[a:a + 70], abstain[a:a + 70]))
              for a in range(0, 200, 70)]
    assert torch.equal(torch.cat([p[0] for p in pieces]), out[0])
    assert torch.equal(torch.cat([p[1] for p in pieces]), out[1])
    assert sum((p[2] for p in pieces), []) == out[2]
    _same_store(whole, parts)
    assert parts.n_queries == 200
    # an empty piece (an empty chunk of a stream) changes nothing, before or after stored inputs
    for store in (RegionStore(), parts):
        before = (len(store), store.n_queries)
        lab, rad, kinds = store.certify_stream(torch.empty(0, 12), torch.empty(0, dtype=torch.long),
                                               torch.empty(0), torch.empty(0, dtype=torch.bool))
        assert lab.shape == (0,) and rad.shape == (0,) and kinds == []
        assert (len(store), store.n_queries) == before


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
    # an all-abstained stream on an empty store stores nothing and counts the abstentions
    e = RegionStore()
    e.certify_stream(torch.zeros(2, 5), torch.tensor([0, 1]), torch.ones(2), torch.ones(2, dtype=torch.bool))
    assert len(e) == 0 and e.dim is None and e.counts["abstain"] == 2


def test_decide_batch_equals_decide_and_stores_nothing(backend):
    xs, labels, radii, abstain = random_stream(13, 10, 120)
    s = RegionStore(**backend)
    s.certify_stream(*stream_args(xs[:80], labels[:80], radii[:80], abstain[:80]))
    before = (len(s), s.counts)
    q = torch.from_numpy(xs[80:])
    decs = s.decide_batch(q, torch.from_numpy(labels[80:]), torch.from_numpy(radii[80:]))
    assert decs == [s.decide(q[i], int(labels[80 + i]), float(radii[80 + i])) for i in range(40)]
    assert (len(s), s.counts) == before
    assert {d.kind for d in decs} >= {"none", "trim"}
    ref = RegionStore(backend="reference")
    ref.certify_stream(*stream_args(xs[:80], labels[:80], radii[:80], abstain[:80]))
    assert decs == ref.decide_batch(q, torch.from_numpy(labels[80:]), torch.from_numpy(radii[80:]))
    with pytest.raises(CertssbError, match="labels"):
        s.decide_batch(q[:2], torch.tensor([0, -1]), torch.ones(2))
    with pytest.raises(CertssbError, match="one entry per input"):
        s.decide_batch(q[:2], torch.tensor([0]), torch.ones(2))
    with pytest.raises(CertssbError, match="radii"):
        s.decide_batch(q[:2], torch.tensor([0, 1]), torch.tensor([1.0, float("inf")]))
    assert RegionStore(**backend).decide_batch(q[:3], torch.tensor([0, 1, 2]), torch.ones(3))[2].kind == "none"


def test_set_backend_keeps_the_decisions():
    xs, labels, radii, abstain = random_stream(14, 10, 200)
    a, b = RegionStore(backend="reference"), RegionStore()
    assert b.backend == ("faiss" if HAS_FAISS else "torch-gpu") and b.device == torch.device("cpu")
    for s in (a, b):
        s.certify_stream(*stream_args(xs[:100], labels[:100], radii[:100], abstain[:100]))
    b.set_backend("torch-gpu", device="cpu")
    assert b.backend == "torch-gpu" and "torch-gpu" in repr(b)
    outs = [s.certify_stream(*stream_args(xs[100:], labels[100:], radii[100:], abstain[100:])) for s in (a, b)]
    assert torch.equal(outs[0][1], outs[1][1]) and outs[0][2] == outs[1][2]
    b.set_backend("reference")
    b.check_invariant()
    _same_store(a, b)
    with pytest.raises(CertssbError, match="unknown region-store backend"):
        b.set_backend("annoy")


@pytest.mark.needs_cuda
@pytest.mark.parametrize("maker,dim,n", [(random_stream, 784, 300), (lattice_stream, 3072, 200)])
def test_gpu_backend_takes_the_reference_decisions(maker, dim, n):
    xs, labels, radii, abstain = maker(50, dim, n)
    order = np.random.default_rng(50).permutation(n)
    ref = RegionStore(backend="reference")
    out_ref = _certify(ref, xs, labels, radii, abstain, order)
    for bs in (5, None):
        s = RegionStore(backend="auto", device="cuda")
        assert s.backend == "torch-gpu"
        if bs:
            small_blocks(s, bs)
        out = _certify(s, xs, labels, radii, abstain, order)
        assert torch.equal(out[0], out_ref[0]) and torch.equal(out[1], out_ref[1]) and out[2] == out_ref[2]
        _same_store(s, ref)
        s.check_invariant()


# ----------------------------------------------------------------------------- invariant check
def test_check_invariant_detects_overlap(tmp_path, backend):
    # a crafted (valid-format) file holding two overlapping balls with different labels
    path = tmp_path / "bad.safetensors"
    _write(path, torch.tensor([[0.0, 0.0], [5.0, 5.0], [1.5, 0.0]]), torch.tensor([0, 0, 1]),
           torch.tensor([1.0, 1.0, 0.6], dtype=torch.float64), meta={"counts": {"none": 3, "trim": 0, "align": 0,
                                                                               "abstain": 0}})
    s = RegionStore.load(path, **backend)
    with pytest.raises(CertssbError, match="balls 0 .* and 2 .* overlap"):
        s.check_invariant()
    with pytest.raises(CertssbError, match="overlap"):
        s.check_invariant(since=2)
    s.check_invariant(since=3)  # nothing new to check
    # touching exactly is fine, and same-label overlaps are fine
    s._radii[2] = 0.5
    s.check_invariant()


# ----------------------------------------------------------------------------- persistence
def test_save_load_round_trip(tmp_path, backend):
    xs, labels, radii, abstain = random_stream(7, 10, 120)
    s = RegionStore()
    s.certify_stream(torch.from_numpy(xs), torch.from_numpy(labels), torch.from_numpy(radii),
                     torch.from_numpy(abstain), order=torch.from_numpy(np.random.default_rng(1).permutation(120)))
    path = tmp_path / "store.safetensors"
    digest = s.save(path)
    assert isinstance(digest, str) and len(digest) == 64
    t = RegionStore.load(path, **backend)  # any backend rebuilds from the same file
    assert t.backend == backend["backend"]
    _same_store(s, t)
    assert t.dim == s.dim and t.n_queries == 120
    t.check_invariant()
    # a loaded store continues exactly like the original
    extra = torch.rand(30, 10, generator=torch.Generator().manual_seed(1))
    for i in range(30):
        assert s.update(extra[i], i % 3, 0.3) == t.update(extra[i], i % 3, 0.3)
    assert t.queries[-1] == 149
    # empty stores, with and without dim
    for e in (RegionStore(), RegionStore(4)):
        e.save(tmp_path / "e.safetensors")
        f = RegionStore.load(tmp_path / "e.safetensors", **backend)
        assert len(f) == 0 and f.dim == e.dim
        f.update(torch.zeros(4), 0, 1.0)
        assert len(f) == 1


def test_version_1_files_still_load(tmp_path):
    path = tmp_path / "v1.safetensors"
    _write(path, torch.tensor([[0.0, 0.0], [3.0, 0.0]]), torch.tensor([0, 1]),
           torch.tensor([1.0, 2.0], dtype=torch.float64),
           meta={"version": 1, "counts": {"none": 2, "trim": 0, "align": 0, "abstain": 1}})
    s = RegionStore.load(path)
    assert s.queries.tolist() == [-1, -1] and s.n_queries == 3  # the order of old files is unknown
    assert s.update(P(1.5, 0), 2, 1.0) == RegionDecision(1, 0.5, "align", 1)  # inside ball 1
    assert s.queries.tolist() == [-1, -1, 3]
    s.save(path)
    assert RegionStore.load(path).queries.tolist() == [-1, -1, 3]  # written back as version 2


def _write(path, centres, labels, radii, meta=None, raw_meta=None, queries=None):
    m = {"format": "certssb.regions", "version": FORMAT_VERSION,
         "dim": centres.shape[1] if centres.dim() == 2 else None,
         "n": labels.shape[0], "counts": {k: 0 for k in UPDATE_KINDS}}
    if meta:
        m.update(meta)
    if "counts" not in (meta or {}):
        m["counts"] = {**m["counts"], "none": labels.shape[0]}
    md = {"certssb_region_store": raw_meta if raw_meta is not None else json.dumps(m)}
    tensors = {"centres": centres, "labels": labels, "radii": radii}
    if m.get("version") == 2:
        tensors["queries"] = torch.arange(labels.shape[0]) if queries is None else queries
    save_tensors(path, tensors, metadata=md)


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
        (dict(meta={"version": 0}), "version"),
        (dict(meta={"version": True}), "version"),
        (dict(meta={"n": 3}), "shapes"),
        (dict(meta={"dim": 4}), "shapes"),
        (dict(meta={"n": -1}), "invalid n"),
        (dict(meta={"counts": {"none": 1}}), "counts"),
        (dict(meta={"counts": {"none": -1, "trim": 0, "align": 0, "abstain": 0}}), "counts"),
        (dict(queries=torch.tensor([1, 0])), "query numbers"),
        (dict(queries=torch.tensor([0, 2])), "query numbers"),  # only 2 queries were counted
        (dict(queries=torch.tensor([-2, 0])), "query numbers"),
        (dict(queries=torch.tensor([0, 1], dtype=torch.int32)), "dtypes"),
        (dict(queries=torch.tensor([0])), "shapes"),
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
    # an extra tensor, a missing one
    for tensors in ({"centres": good_c, "labels": good_l, "radii": good_r, "queries": torch.arange(2),
                     "x": torch.zeros(1)},
                    {"centres": good_c, "labels": good_l, "radii": good_r}):
        save_tensors(p, tensors, metadata={"certssb_region_store": json.dumps(
            {"format": "certssb.regions", "version": FORMAT_VERSION, "dim": 3, "n": 2,
             "counts": {"none": 2, "trim": 0, "align": 0, "abstain": 0}})})
        with pytest.raises(CheckpointError, match="expected tensors"):
            RegionStore.load(p)
    # and the good file loads
    _write(p, good_c, good_l, good_r)
    assert len(RegionStore.load(p)) == 2


def test_chunked_distances_give_the_same_decisions(monkeypatch):
    """Tiny distance blocks (as for huge stores / ImageNette-sized inputs) change nothing."""
    import certssb.certify.region_decisions as decisions
    import certssb.certify.regions as regions

    xs, labels, radii, abstain = random_stream(21, 10, 120)
    args = (torch.from_numpy(xs), torch.from_numpy(labels), torch.from_numpy(radii), torch.from_numpy(abstain))
    big = RegionStore(backend="reference")
    out_big = big.certify_stream(*args)
    for module in (regions, decisions):  # 3 rows of 10 features per block
        monkeypatch.setattr(module, "CHUNK_ELEMS", 35)
    small = RegionStore(backend="reference")
    out_small = small.certify_stream(*args)
    assert torch.equal(out_big[0], out_small[0]) and torch.equal(out_big[1], out_small[1])
    assert out_big[2] == out_small[2]
    small.check_invariant()
    ref = reference_stream(xs, labels, radii, abstain, list(range(len(xs))))
    assert out_small[2] == [r[2] for r in ref]


def test_exact_distances_do_not_depend_on_the_other_rows():
    """What makes candidate-only decisions bit-identical: the distance to a row is the same
    whether it is computed alone, among candidates, or in a full scan (any D)."""
    from certssb.certify.region_decisions import exact_distances

    g = torch.Generator().manual_seed(3)
    for dim in (1, 7, 784, 3072):
        c = torch.rand(50, dim, generator=g) * 3 - 1
        x = torch.rand(1, dim, generator=g)
        full = exact_distances(x, c)[0]
        idx = torch.tensor([49, 3, 0, 17])
        assert torch.equal(exact_distances(x, c[idx])[0], full[idx])
        assert all(torch.equal(exact_distances(x, c[i:i + 1])[0], full[i:i + 1]) for i in (0, 17, 49))
        assert torch.equal(exact_distances(torch.cat([c[5:6], x]), c)[1], full)


def test_a_search_that_declines_the_block_pairs_still_decides_exactly():
    """search_block may return None ("check every earlier input of the block"); and search may
    return None ("check every stored row"): both fall back to exact checks of everything."""
    xs, labels, radii, abstain = lattice_stream(8, 5, 200)
    order = np.arange(200)
    ref = RegionStore(backend="reference")
    want = _certify(ref, xs, labels, radii, abstain, order)
    for kw in FAST_BACKENDS:
        for declined in ("search_block", "search"):
            s = small_blocks(RegionStore(**kw), 9)
            setattr(s._index, declined, lambda *a, **k: None)
            got = _certify(s, xs, labels, radii, abstain, order)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2]
            _same_store(s, ref)


def test_copy_is_independent_and_can_switch_backend():
    xs, labels, radii, abstain = random_stream(15, 10, 160)
    a = RegionStore(backend="reference")
    a.certify_stream(*stream_args(xs[:100], labels[:100], radii[:100], abstain[:100]))
    b = a.copy(backend="torch-gpu", device="cpu")
    assert b.backend == "torch-gpu" and a.backend == "reference"
    _same_store(a, b)
    rest = stream_args(xs[100:], labels[100:], radii[100:], abstain[100:])
    out_b = b.certify_stream(*rest)
    assert len(a) < len(b)  # the original did not move
    out_a = a.certify_stream(*rest)
    assert torch.equal(out_a[1], out_b[1]) and out_a[2] == out_b[2]
    _same_store(a, b)
