"""Tests for certssb.certify.region_search: the candidate search never misses a conflict (also under
severe float32 cancellation), the float32 error bound holds for FAISS, the filter does prune,
CSR results, and the choice of backend with its error messages."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import certssb.certify.region_search as ri
from certssb.errors import CertssbError
from certssb.certify.region_search import (FaissIndex, ReferenceIndex, StoreArrays, TorchDenseIndex, make_index,
                                  resolve_backend, sq_dist_error_coeff)
from certssb.certify.regions import RegionStore, exact_distances

HAS_FAISS = ri.faiss_available()
needs_faiss = pytest.mark.skipif(not HAS_FAISS, reason="faiss is not installed")
INDEXES = [pytest.param(FaissIndex, id="faiss", marks=needs_faiss),
           pytest.param(lambda: TorchDenseIndex("cpu", precision="float32"), id="torch-dense-cpu-f32c"),
           pytest.param(lambda: TorchDenseIndex("cpu", mirror=True, precision="float32"), id="torch-dense-mirror"),
           pytest.param(lambda: TorchDenseIndex("cpu", precision="float64"), id="torch-dense-f64")]


def arrays(c: torch.Tensor, labels, radii) -> StoreArrays:
    c = c.to(torch.float32).contiguous()
    return StoreArrays(c, torch.linalg.vector_norm(c.double(), dim=1), torch.as_tensor(labels, dtype=torch.int64),
                       torch.as_tensor(radii, dtype=torch.float64))


def true_conflicts(q, ql, qr, db: StoreArrays, limit=None) -> set[tuple[int, int]]:
    d = exact_distances(q, db.centres).numpy()
    conf = (db.labels.numpy()[None, :] != ql[:, None]) & (d < qr[:, None] + db.radii.numpy()[None, :])
    if limit is not None:
        conf &= np.arange(db.n)[None, :] < limit[:, None]
    return set(zip(*np.nonzero(conf)))


def pairs(cands) -> set[tuple[int, int]]:
    lims, ids = cands
    return {(j, int(i)) for j in range(len(lims) - 1) for i in ids[lims[j]:lims[j + 1]]}


def data(seed: int, n: int, b: int, dim: int, offset: float, spread: float):
    """Queries and stored centres near a common point `offset` (large offsets make the
    ||x||^2 + ||y||^2 - 2xy expansion lose nearly every digit in float32)."""
    g = torch.Generator().manual_seed(seed)
    c = offset + spread * torch.randn(n, dim, generator=g)
    q = offset + spread * torch.randn(b, dim, generator=g)
    d = exact_distances(q, c)
    med = float(d.median())
    qr = (torch.rand(b, generator=g, dtype=torch.float64) * med * 0.6).numpy()
    cr = torch.rand(n, generator=g, dtype=torch.float64) * med * 0.6
    ql = torch.randint(0, 3, (b,), generator=g).numpy()
    cl = torch.randint(0, 3, (n,), generator=g)
    return q.to(torch.float32).contiguous(), ql, qr, arrays(c, cl, cr)


@pytest.mark.parametrize("make", INDEXES)
@pytest.mark.parametrize("b,n,dim,offset,spread", [
    (40, 300, 8, 0.0, 1.0), (40, 300, 784, 0.5, 0.1), (40, 300, 784, 1000.0, 0.01), (256, 300, 784, 1000.0, 0.01),
    (40, 300, 3072, 300.0, 0.02), (256, 300, 20, 1e6, 1.0),
    # up to 16 queries: FAISS's direct distances
    (4, 300, 784, 1000.0, 0.01), (8, 300, 3, 1e6, 1.0), (8, 300, 3072, 300.0, 0.02), (8, 40, 150528, 0.5, 0.002),
])
def test_search_is_a_superset_of_the_conflicts(make, b, n, dim, offset, spread):
    """Large offsets: FAISS's BLAS path (many queries) loses every digit of ||x||^2 + ||y||^2 - 2xy."""
    q, ql, qr, db = data(0, n, b, dim, offset, spread)
    idx = make()
    qn = torch.linalg.vector_norm(q.double(), dim=1).numpy()
    cands = idx.search(q, qn, ql, qr, db)
    truth = true_conflicts(q, ql, qr, db)
    assert len(truth) >= 5  # the data has conflicts to miss
    assert cands is not None and truth <= pairs(cands)
    # limit: only rows i < limit[j]
    limit = np.arange(b, dtype=np.int64) * 7 % (n + 1)
    assert true_conflicts(q, ql, qr, db, limit) <= pairs(idx.search(q, qn, ql, qr, db, limit=limit))
    lims, ids = cands
    assert lims[0] == 0 and lims[-1] == len(ids) and np.all(np.diff(lims) >= 0)
    assert all(np.all(np.diff(ids[lims[j]:lims[j + 1]]) > 0) for j in range(b))  # ascending per query


@pytest.mark.parametrize("make", INDEXES)
@pytest.mark.parametrize("dim,offset,spread", [(16, 0.0, 1.0), (784, 1000.0, 0.01)])
def test_search_block_is_a_superset_of_the_pairs_inside_a_block(make, dim, offset, spread):
    q, ql, qr, db = data(1, 10, 64, dim, offset, spread)
    qn = torch.linalg.vector_norm(q.double(), dim=1).numpy()
    d = exact_distances(q, q).numpy()
    r_bound = 0.6 * float(np.median(d))
    got = pairs(make().search_block(q, qn, qr, r_bound))
    want = {(j, k) for j in range(64) for k in range(j) if d[j, k] < qr[j] + r_bound}
    assert len(want) > 20 and want <= got
    assert all(k < j for j, k in got)


@needs_faiss
def test_without_the_error_bound_the_float32_search_would_miss_conflicts(monkeypatch):
    """The test above can fail: under cancellation, dropping the error term loses conflicts."""
    q, ql, qr, db = data(0, 300, 256, 784, 1000.0, 0.01)
    qn = torch.linalg.vector_norm(q.double(), dim=1).numpy()
    truth = true_conflicts(q, ql, qr, db)
    monkeypatch.setattr(ri, "sq_dist_error_coeff", lambda dim, unit: 0.0)
    assert not truth <= pairs(FaissIndex().search(q, qn, ql, qr, db))


def test_the_filter_prunes():
    """Well separated points with small radii: few candidates, not the whole store."""
    g = torch.Generator().manual_seed(2)
    c = torch.rand(2000, 784, generator=g)
    q = torch.rand(64, 784, generator=g)
    db = arrays(c, torch.zeros(2000), torch.full((2000,), 1.0))
    qn = torch.linalg.vector_norm(q.double(), dim=1).numpy()
    ql, qr = np.ones(64, dtype=np.int64), np.full(64, 1.0)
    for idx in ([FaissIndex()] if HAS_FAISS else []) + [TorchDenseIndex("cpu")]:
        lims, ids = idx.search(q, qn, ql, qr, db)
        assert len(ids) == 0  # typical distances ~11.4 > 2
        lims, ids = idx.search(q, qn, ql, np.full(64, 10.0), db)  # now some are within reach
        assert 0 < len(ids) < 64 * 2000 // 2


@needs_faiss
@pytest.mark.parametrize("dim", [3, 784, 3072])
@pytest.mark.parametrize("nq", [1, 64, 300])  # FAISS: direct sums for small batches, BLAS expansion for large
def test_faiss_float32_distances_stay_within_the_bound(dim, nq):
    import faiss

    g = torch.Generator().manual_seed(dim + nq)
    rows = 500 if dim < 3072 else 150
    for offset, spread in ((0.0, 1.0), (500.0, 0.05), (1e4, 1.0)):
        c = (offset + spread * torch.randn(rows, dim, generator=g)).contiguous()
        q = (offset + spread * torch.randn(nq, dim, generator=g)).contiguous()
        res = faiss.RangeSearchResult(nq)
        faiss.range_search_L2sqr(faiss.swig_ptr(q.numpy()), faiss.swig_ptr(c.numpy()), dim, nq, rows, 3e38, res)
        lims = faiss.rev_swig_ptr(res.lims, nq + 1).astype(np.int64)
        dis = faiss.rev_swig_ptr(res.distances, int(lims[-1])).astype(np.float64)
        ids = faiss.rev_swig_ptr(res.labels, int(lims[-1])).astype(np.int64)
        qi = np.repeat(np.arange(nq), np.diff(lims))
        exact = exact_distances(q, c).numpy()[qi, ids] ** 2
        nq_ = torch.linalg.vector_norm(q.double(), dim=1).numpy()[qi]
        nc_ = torch.linalg.vector_norm(c.double(), dim=1).numpy()[ids]
        bound = sq_dist_error_coeff(dim, 2.0 ** -24) * (nq_ + nc_) ** 2
        assert len(ids) == nq * rows and np.all(np.abs(dis - exact) <= bound)


@needs_faiss
@pytest.mark.parametrize("dim", [1, 2, 3, 4, 8, 12, 16, 17, 784, 3072])
def test_faiss_direct_distances_have_a_relative_error(dim):
    """fvec_L2sqr_ny sums squared differences: error <= gamma_{D+3} d^2 even next to 1e4."""
    import faiss

    g = torch.Generator().manual_seed(dim)
    for offset in (0.0, 1e4):
        c = (offset + torch.randn(200, dim, generator=g)).contiguous()
        x = (offset + torch.randn(dim, generator=g)).contiguous()
        out = np.empty(200, dtype=np.float32)
        faiss.fvec_L2sqr_ny(faiss.swig_ptr(out), faiss.swig_ptr(x.numpy()), faiss.swig_ptr(c.numpy()), dim, 200)
        exact = exact_distances(x[None], c).numpy()[0] ** 2
        assert np.all(np.abs(out - exact) <= sq_dist_error_coeff(dim - 1, 2.0 ** -24) * exact + 1e-30)


def test_error_coefficient():
    assert sq_dist_error_coeff(784, 2.0 ** -24) == pytest.approx(788 * 2.0 ** -24, rel=2e-3)
    assert sq_dist_error_coeff(150528, 2.0 ** -24) < 0.01
    assert sq_dist_error_coeff(150528, 2.0 ** -53) < 2e-11
    assert math.isinf(sq_dist_error_coeff(1 << 24, 2.0 ** -24))


def test_huge_vectors_and_loose_bounds_switch_faiss_to_float64(monkeypatch):
    """float32 squares of norms near 1e20 overflow, and in high dimension with large norms the
    float32 error bound exceeds the reach: then the FAISS backend filters in float64."""
    calls = []
    real_range = FaissIndex._range
    monkeypatch.setattr(FaissIndex, "_range", lambda self, *a: calls.append(1) or real_range(self, *a))
    c = torch.full((5, 4), 1e20)
    db = arrays(c, [0] * 5, [1.0] * 5)
    q = torch.full((2, 4), 1e20)
    qn = torch.linalg.vector_norm(q.double(), dim=1).numpy()
    ql, qr = np.array([1, 1]), np.array([1.0, 1.0])
    if HAS_FAISS:
        got = FaissIndex().search(q, qn, ql, qr, db)
        assert pairs(got) == true_conflicts(q, ql, qr, db) == {(j, i) for j in range(2) for i in range(5)}
        assert pairs(FaissIndex().search_block(q, qn, qr, 1.0)) == {(1, 0)}
        assert not calls
        # 3072 features around 1000: float32 error ~ 1e6 >> reach^2 ~ 1e-3
        q2, ql2, qr2, db2 = data(0, 200, 40, 3072, 1000.0, 0.001)
        qn2 = torch.linalg.vector_norm(q2.double(), dim=1).numpy()
        got = pairs(FaissIndex().search(q2, qn2, ql2, qr2, db2))
        assert true_conflicts(q2, ql2, qr2, db2) <= got and not calls
        assert len(got) < 40 * 200 // 2  # float64 still prunes
        q3, ql3, qr3, db3 = data(0, 200, 40, 784, 0.5, 0.1)  # images: float32 is fine
        FaissIndex().search(q3, torch.linalg.vector_norm(q3.double(), dim=1).numpy(), ql3, qr3, db3)
        assert calls
    # and the store decides exactly
    for backend in ("faiss", "reference", "torch-gpu") if HAS_FAISS else ("reference", "torch-gpu"):
        s = RegionStore(4, backend=backend, device="cpu")
        s.update(torch.full((4,), 1e20), 0, 1.0)
        d = s.update(torch.tensor([1e20, 1e20, 1e20, 1e20 + 2**44]), 1, 2.0 ** 44)  # 2^44 apart
        assert d.kind == "trim" and d.radius == 2.0 ** 44 - 1


def test_reference_index_checks_everything():
    q = torch.zeros(3, 2)
    db = arrays(q, [0] * 3, [0] * 3)
    assert ReferenceIndex().search(q, np.zeros(3), np.zeros(3, np.int64), np.zeros(3), db) is None
    assert ReferenceIndex().search_block(q, np.zeros(3), np.zeros(3), 1.0) is None


def test_dense_mirror_follows_the_store():
    """The GPU code path (a device mirror of the store, grown by doubling), run on the CPU."""
    xs = torch.rand(300, 6, generator=torch.Generator().manual_seed(4))
    labels, radii = torch.arange(300) % 3, torch.rand(300, generator=torch.Generator().manual_seed(5)) * 0.4
    ref = RegionStore(backend="reference")
    want = ref.certify_stream(xs, labels, radii, torch.zeros(300, dtype=torch.bool))
    s = RegionStore(backend="torch-gpu", device="cpu")
    s._index = TorchDenseIndex("cpu", mirror=True, precision="float32")
    s._index.block_size = 7
    got = s.certify_stream(xs[:150], labels[:150], radii[:150], torch.zeros(150, dtype=torch.bool))
    got2 = s.certify_stream(xs[150:], labels[150:], radii[150:], torch.zeros(150, dtype=torch.bool))
    assert torch.equal(torch.cat([got[1], got2[1]]), want[1]) and got[2] + got2[2] == want[2]
    assert {"trim", "align"} <= set(want[2])
    idx = s._index
    assert idx._n == 300 and idx._cap >= 300
    assert torch.equal(idx._c[:300], s.centres - idx._centre)  # centred float32 rows
    assert torch.equal(idx._lab[:300], s.labels) and torch.equal(idx._rad[:300], s.radii)
    s.check_invariant()
    idx.sync(s._arrays(10))  # a smaller store (rebuilt): the mirror starts over
    assert idx._n == 10


# ----------------------------------------------------------------------------- backend choice
def test_auto_backend_and_errors(monkeypatch):
    auto = "faiss" if HAS_FAISS else "torch-gpu"
    assert resolve_backend("auto", "cpu") == auto
    assert make_index("auto").name == auto and RegionStore().backend == auto
    assert resolve_backend("torch-gpu", "cpu") == "torch-gpu"
    with pytest.raises(CertssbError, match="unknown region-store backend 'annoy'"):
        resolve_backend("annoy", "cpu")
    with pytest.raises(CertssbError, match="cpu or cuda"):
        resolve_backend("auto", "meta")
    with pytest.raises(CertssbError, match="'faiss-gpu' was removed.*torch-gpu"):
        resolve_backend("faiss-gpu", "cpu")
    monkeypatch.setattr(ri, "faiss_available", lambda: False)
    assert resolve_backend("auto", "cpu") == "torch-gpu"  # the float64 search, on the CPU
    with pytest.raises(CertssbError, match="pip install faiss-cpu"):
        RegionStore(backend="faiss")


def test_cuda_requests_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CertssbError, match="no CUDA device"):
        RegionStore(backend="auto", device="cuda")


def test_cpu_backends_refuse_a_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for b in ("faiss", "reference"):
        with pytest.raises(CertssbError, match="searches on the CPU"):
            resolve_backend(b, "cuda")
    assert resolve_backend("auto", "cuda") == "torch-gpu"
    with pytest.raises(CertssbError, match="torch-gpu"):
        resolve_backend("faiss-gpu", "cuda")


@pytest.mark.needs_cuda
def test_torch_gpu_search_on_cuda_matches_cpu():
    q, ql, qr, db = data(0, 300, 40, 784, 1000.0, 0.01)
    qn = torch.linalg.vector_norm(q.double(), dim=1).numpy()
    truth = true_conflicts(q, ql, qr, db)
    got = pairs(TorchDenseIndex("cuda").search(q, qn, ql, qr, db))
    assert truth <= got and got == pairs(TorchDenseIndex("cpu").search(q, qn, ql, qr, db))


# ----------------------------------------------------------------------------- the centred float32 filter
@pytest.mark.parametrize("dim,offset,spread", [(8, 0.0, 1.0), (784, 0.5, 0.3), (3072, 1000.0, 0.01),
                                               (5000, 0.5, 0.3)])
def test_centred_float32_distances_stay_within_the_bound(dim, offset, spread):
    """The computed s~ of the centred float32 filter against the exact float64 distance: inside
    (R + eta)^2 - ||a - b||^2 terms, i.e. |s~ - ||a - b||^2| <= E and | ||a - b|| - d | <= eta."""
    q, _, _, db = data(3, 200, 64, dim, offset, spread)
    idx = TorchDenseIndex("cpu", precision="float32")
    idx._set_centre(db.centres)
    qa, qn2 = idx._centred(q)
    ca, cn2 = idx._centred(db.centres)
    s = idx._sq_dists(qa, qn2, ca, cn2)
    a_max, b_max = float(qn2.max().sqrt()), float(cn2.max().sqrt())
    eta, err = idx._bound(dim, a_max, b_max)
    exact_ab = exact_distances(qa, ca)  # ||a - b|| of the rounded centred rows, float64
    assert float((s - exact_ab ** 2).abs().max()) <= err
    assert float((exact_ab - exact_distances(q, db.centres)).abs().max()) <= eta
    if offset >= 1:  # centring: the bound scales with the spread, not with ||x|| (here 1e6 times smaller)
        assert err < 1e-3 * sq_dist_error_coeff(dim, 2.0 ** -24) * (2 * float(db.norms.max())) ** 2


def test_centred_filter_slices_long_dot_products():
    """Above SPLIT features the float32 products are summed in slices: gamma_1024, not gamma_D."""
    g32, g64, h = ri.centred_error_terms(150528, TorchDenseIndex.SPLIT)
    assert g32 == pytest.approx(1024 * 2.0 ** -24, rel=2e-3) and g64 < 2e-11 and h < 6e-8
    assert sq_dist_error_coeff(150528, 2.0 ** -24) / g32 > 100
    a = torch.rand(3, 20000, generator=torch.Generator().manual_seed(0))
    idx = TorchDenseIndex("cpu", precision="float32")
    assert idx.split == TorchDenseIndex.CPU_SPLIT < 20000
    assert torch.allclose(idx._dots(a, a), a.double() @ a.double().T, rtol=1e-6)


def test_centred_filter_prefers_float64_for_huge_vectors():
    q = torch.full((3, 4), 1e20)
    db = arrays(torch.full((5, 4), 1e20), [0] * 5, [1.0] * 5)
    qn = torch.linalg.vector_norm(q.double(), dim=1).numpy()
    idx = TorchDenseIndex("cpu", precision="float32")
    got = pairs(idx.search(q, qn, np.ones(3, np.int64), np.ones(3), db))
    assert got == true_conflicts(q, np.ones(3, np.int64), np.ones(3), db) and idx.stats == {"float32": 0, "float64": 1}


def _images(seed: int, n: int, dim: int) -> torch.Tensor:
    """Images-like rows in [0, 1]: 4 smooth class templates plus pixel noise, and near-duplicates."""
    g = torch.Generator().manual_seed(seed)
    side = int(math.isqrt(dim // 3))
    base = torch.rand(4, 3, side // 16, side // 16, generator=g)
    templ = torch.nn.functional.interpolate(base, size=(side, side), mode="bilinear", align_corners=False)
    k = torch.randint(0, 4, (n,), generator=g)
    x = (templ[k] + 0.15 * torch.randn(n, 3, side, side, generator=g)).clamp(0, 1).reshape(n, -1)
    twin = torch.arange(n) % 5 == 4  # every fifth row: an earlier row plus a small perturbation
    d = torch.randn(int(twin.sum()), x.shape[1], generator=g)
    x[twin] = (x[twin.nonzero()[:, 0] - 3] + d * (0.5 / d.norm(dim=1, keepdim=True))).clamp(0, 1)
    return x.contiguous()


def test_centred_filter_at_imagenette_size_takes_the_reference_decisions():
    """D = 3 x 224 x 224 images in [0, 1] (ImageNette-sized), on the CPU: the torch search's centred
    float32 filter takes exactly the reference's decisions, never falls back to float64, and
    prunes (far fewer candidates than pairs)."""
    dim, n = 3 * 224 * 224, 90
    x = _images(7, n, dim)
    g = torch.Generator().manual_seed(8)
    labels = torch.randint(0, 2, (n,), generator=g)
    radii = torch.rand(n, generator=g, dtype=torch.float64) * 3.0
    abstain = torch.rand(n, generator=g) < 0.1
    ref = RegionStore(dim, backend="reference")
    want = ref.certify_stream(x, labels, radii, abstain)
    for mirror in (False, True):
        s = RegionStore(dim, backend="torch-gpu")
        s._index = TorchDenseIndex("cpu", mirror=mirror, precision="float32")
        s._index.block_size = 16  # several blocks: searches against stored rows and inside blocks
        got = s.certify_stream(x, labels, radii, abstain)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2]
        assert s._index.stats["float64"] == 0 and s._index.stats["float32"] > 0
        s.check_invariant()
    assert {"trim", "align"} & set(want[2])
    # the filter itself at this size: a superset of the conflicts, and it prunes
    d = torch.randn(40, dim, generator=g)
    q = (x[:40] + d * (torch.rand(40, 1, generator=g) * 4 / d.norm(dim=1, keepdim=True))).clamp(0, 1)
    ql = torch.randint(0, 2, (40,), generator=g).numpy()
    qr = (torch.rand(40, generator=g, dtype=torch.float64) * 3.0).numpy()
    db = arrays(x, labels, radii)
    qn = torch.linalg.vector_norm(q.double(), dim=1).numpy()
    idx = TorchDenseIndex("cpu", precision="float32")
    got = pairs(idx.search(q, qn, ql, qr, db))
    truth = true_conflicts(q, ql, qr, db)
    assert truth and truth <= got and len(got) < 40 * n // 4 and idx.stats == {"float32": 1, "float64": 0}


def test_default_precision_by_device():
    assert TorchDenseIndex("cpu").precision == "float64"  # measured faster on the CPU
    assert TorchDenseIndex("cpu", precision="float32").precision == "float32"
    with pytest.raises(CertssbError, match="precision must be"):
        TorchDenseIndex("cpu", precision="float16")
