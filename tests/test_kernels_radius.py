"""Tests for the native radius ops (certssb.kernels.radius) against the bounds.py references.

radius_certify must match pa_lower + certified_radius to 1e-12 relative (Clopper-Pearson
against SciPy's betaincinv included), radius_proxy and its gradient match the reference
and its autograd to 1e-12 in float64 and to rounding in float32/float16; plus opcheck,
gradcheck, error messages, and CPU-vs-CUDA agreement where a GPU exists.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from certssb.certify import bounds
from certssb.errors import CertssbError
from certssb.kernels.radius import certify_radius, radius_proxy

F64 = torch.float64
OPS = torch.ops.certssb
# pb_upper = 1 - pa_lower: for pa_lower near 1 one ulp of pa_lower (1.1e-16) is up to
# ~1e-12 of pb_upper, so pb_upper also gets an absolute slack of two ulps of 1.
PB_ATOL = 2.3e-16


def reference(bound: str, score, count, sigma, m: int, alpha: float, c: int):
    """(pa_lower, pb_upper, radius, abstain) by the pure-PyTorch/SciPy path."""
    pa = bounds.pa_lower(bound, top_score=score, top_count=count, m=m, alpha=alpha, num_classes=c)
    radius, pb, abstain = bounds.certified_radius(pa, sigma)
    return pa, pb, radius, abstain


def assert_certs_close(got, want) -> None:
    pa, pb, radius, abstain = got
    rpa, rpb, rradius, rabstain = want
    assert pa.dtype == pb.dtype == radius.dtype == F64 and abstain.dtype == torch.bool
    torch.testing.assert_close(pa, rpa, rtol=1e-12, atol=0)
    torch.testing.assert_close(pb, rpb, rtol=1e-12, atol=PB_ATOL)
    torch.testing.assert_close(radius, rradius, rtol=1e-12, atol=0)
    assert torch.equal(abstain, rabstain)


def count_grid(m: int, rng: np.random.Generator) -> torch.Tensor:
    """Every count 0..m for small m; the edges and a random sample for large m."""
    if m <= 1000:
        k = np.arange(m + 1)
    else:
        k = np.unique(np.r_[np.arange(0, 40), np.arange(m - 40, m + 1), rng.integers(0, m + 1, 150)])
    return torch.from_numpy(k).to(torch.int64)


# ----------------------------------------------------------------------------- radius_certify
@pytest.mark.parametrize("m", [1, 2, 7, 100, 1000, 10000])
def test_certify_clopper_pearson_matches_scipy(m):
    rng = np.random.default_rng(m)
    k = count_grid(m, rng)
    sigma = torch.from_numpy(rng.uniform(0.05, 1.0, k.shape[0]))
    for alpha in (1e-3, 0.05, 0.5):
        for c in (2, 10):
            want = reference("clopper-pearson", None, k, sigma, m, alpha, c)
            got = certify_radius(None, k, sigma, models=m, alpha=alpha, num_classes=c,
                                 bound="clopper-pearson")
            assert_certs_close(got, want)
            # k = 0 gives 0; k = m the closed form (alpha / c) ** (1 / m)
            assert got[0][0].item() == 0.0 and got[3][0].item()
            assert got[0][-1].item() == pytest.approx((alpha / c) ** (1 / m), rel=1e-13)


@pytest.mark.parametrize("m", [1, 2, 7, 100, 1000, 10000])
def test_certify_hoeffding_matches_reference(m):
    rng = np.random.default_rng(100 + m)
    score = np.r_[0.0, 1.0, 0.5, 1.0 + 1e-6, -1e-6, rng.uniform(0, 1, 60), 1 - rng.uniform(0, 1e-3, 20)]
    sigma = torch.from_numpy(rng.uniform(0.05, 1.0, score.shape[0]))
    for dtype in (torch.float32, F64):
        s = torch.from_numpy(score).to(dtype)
        for alpha in (1e-3, 0.05, 0.5):
            for c in (2, 10):
                want = reference("hoeffding", s, None, sigma, m, alpha, c)
                got = certify_radius(s, None, sigma, models=m, alpha=alpha, num_classes=c, bound="hoeffding")
                assert_certs_close(got, want)


def test_certify_pa_exactly_half_abstains():
    m, alpha = 100, 0.001
    w = math.sqrt(math.log(1.0 / alpha) / (2.0 * m))
    s = 0.5 + w
    while s - w != 0.5:  # the score whose bound is exactly 1/2 in float64
        s = np.nextafter(s, 1.0 if s - w < 0.5 else 0.0)
    score = torch.tensor([s, np.nextafter(s, 1.0)], dtype=F64)
    sigma = torch.tensor([0.5, 0.5], dtype=F64)
    pa, pb, radius, abstain = certify_radius(score, None, sigma, models=m, alpha=alpha, num_classes=2,
                                             bound="hoeffding")
    assert pa[0].item() == 0.5 and pb[0].item() == 0.5
    assert abstain.tolist() == [True, False]
    assert radius[0].item() == 0.0 and radius[1].item() > 0.0
    assert_certs_close((pa, pb, radius, abstain), reference("hoeffding", score, None, sigma, m, alpha, 2))


def test_certify_unanimous_vote_is_capped():
    # pA_lower above PA_MAX (k = m of 1e13 votes) is clamped before PhiInv: the radius is
    # PhiInv(PA_MAX) * sigma, finite. (Also the per-row path: the table would be too big.)
    m = 10**13
    k = torch.tensor([m, m - 1], dtype=torch.int64)
    sigma = torch.tensor([1.0, 2.0], dtype=F64)
    got = certify_radius(None, k, sigma, models=m, alpha=0.5, num_classes=2, bound="clopper-pearson")
    assert got[0][0].item() > bounds.PA_MAX
    cap = float(torch.special.ndtri(torch.tensor(bounds.PA_MAX, dtype=F64)))
    assert got[2][0].item() == pytest.approx(cap, rel=1e-14)
    assert got[2][1].item() == pytest.approx(2 * cap, rel=1e-14)
    assert_certs_close(got, reference("clopper-pearson", None, k, sigma, m, 0.5, 2))


@pytest.mark.parametrize("bound", list(bounds.BOUNDS))
def test_certify_shapes_strides_dtypes(bound):
    gen = torch.Generator().manual_seed(7)
    m = 50
    # empty, size 1, odd
    for n in (0, 1, 37):
        score = torch.rand(n, generator=gen, dtype=F64)
        count = torch.randint(0, m + 1, (n,), generator=gen)
        sigma = torch.rand(n, generator=gen, dtype=F64) + 0.1
        got = certify_radius(score, count, sigma, models=m, alpha=0.01, num_classes=3, bound=bound)
        assert all(t.shape == (n,) for t in got)
        if n:
            assert_certs_close(got, reference(bound, score, count, sigma, m, 0.01, 3))
    # non-contiguous inputs (every other element; sigma broadcast with stride 0)
    score = torch.rand(80, generator=gen, dtype=F64)[::2]
    count = torch.randint(0, m + 1, (40, 3), generator=gen)[:, 1]
    sigma = torch.tensor(0.3, dtype=F64).expand(40)
    assert not score.is_contiguous() and not count.is_contiguous() and sigma.stride(0) == 0
    want = reference(bound, score, count, sigma.contiguous(), m, 0.01, 3)
    assert_certs_close(certify_radius(score, count, sigma, models=m, alpha=0.01, num_classes=3, bound=bound),
                       want)
    assert_certs_close(OPS.radius_certify(score, count, sigma, m, 0.01, 3, bound), want)
    # a number as sigma; other dtypes of counts, scores and sigma
    assert_certs_close(certify_radius(score, count, 0.3, models=m, alpha=0.01, num_classes=3, bound=bound),
                       want)
    for cdt in (torch.uint8, torch.int16, torch.int32):
        got = certify_radius(score.float(), count.to(cdt), sigma.float(), models=m, alpha=0.01,
                             num_classes=3, bound=bound)
        assert_certs_close(got, reference(bound, score.float(), count, sigma.float().double(), m, 0.01, 3))
    # integer-valued float counts are accepted by the wrapper
    got = certify_radius(score, count.double(), sigma, models=m, alpha=0.01, num_classes=3, bound=bound)
    assert_certs_close(got, want)
    # float16 scores are read as float16 values
    got = certify_radius(score.half(), count, sigma, models=m, alpha=0.01, num_classes=3, bound=bound)
    assert_certs_close(got, reference(bound, score.half(), count, sigma.contiguous(), m, 0.01, 3))


def test_certify_repeated_counts_use_one_solve_each():
    # Many rows share few counts (the table path) and few rows span many counts (per row):
    # both paths give the reference.
    rng = np.random.default_rng(3)
    for n, m in ((3000, 1000), (5, 5000)):
        k = torch.from_numpy(rng.integers(m - 30, m + 1, n))
        sigma = torch.full((n,), 0.25, dtype=F64)
        got = certify_radius(None, k, sigma, models=m, alpha=0.001, num_classes=10, bound="clopper-pearson")
        assert_certs_close(got, reference("clopper-pearson", None, k, sigma, m, 0.001, 10))


# ----------------------------------------------------------------------------- radius_proxy
def proxy_rows(dtype=F64) -> torch.Tensor:
    """Rows with ties, exact 0 / 1, clamp edges, values beyond both edges, random rows."""
    rows = [
        [0.5, 0.5, 0.0],            # tie at the top: top = 0, runner-up = 1
        [1 / 3, 1 / 3, 1 / 3],      # three-way tie
        [1.0, 0.0, 0.0],            # certain: both clamped
        [0.98, 0.02, 0.0],          # exactly at the clamp edges (gradient passes)
        [0.1, 0.7, 0.2],            # top not first
        [0.2, 0.3, 0.3],            # runner-up tie below a unique top
        [0.01, 0.99, 0.0],          # both outside the clamp range
        [0.0, 0.0, 1.0],            # top last, tie for runner-up
    ]
    gen = torch.Generator().manual_seed(11)
    rand = torch.softmax(3 * torch.randn(24, 3, generator=gen, dtype=F64), dim=1)
    return torch.cat([torch.tensor(rows, dtype=F64), rand]).to(dtype)


def reference_proxy_and_grads(p: torch.Tensor, s: torch.Tensor, clamp=(0.02, 0.98)):
    p = p.detach().clone().requires_grad_(True)
    s = s.detach().clone().requires_grad_(True)
    r = bounds.radius_proxy(p, s, clamp=clamp)
    w = torch.linspace(0.5, 1.5, r.shape[0], dtype=r.dtype, device=r.device)
    gp, gs = torch.autograd.grad((r * w).sum(), (p, s))
    return r.detach(), gp, gs


def proxy_and_grads(p: torch.Tensor, s: torch.Tensor, clamp=(0.02, 0.98)):
    p = p.detach().clone().requires_grad_(True)
    s = s.detach().clone().requires_grad_(True)
    r = radius_proxy(p, s, clamp=clamp)
    w = torch.linspace(0.5, 1.5, r.shape[0], dtype=r.dtype, device=r.device)
    gp, gs = torch.autograd.grad((r * w).sum(), (p, s))
    return r.detach(), gp, gs


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_proxy_and_gradient_match_reference(dtype):
    p = proxy_rows(dtype)
    s = (torch.rand(p.shape[0], generator=torch.Generator().manual_seed(2), dtype=F64) + 0.1).to(dtype)
    got = proxy_and_grads(p, s)
    want = reference_proxy_and_grads(p, s)
    tol = dict(rtol=1e-12, atol=1e-15) if dtype == F64 else dict(rtol=2e-6, atol=2e-6)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == dtype
        torch.testing.assert_close(g, w, **tol)
    # ties: equal top-2 values give exactly 0; clamp-edge gradients are nonzero
    assert got[0][0].item() == 0.0 and got[0][1].item() == 0.0
    assert got[1][3, 0].item() > 0 and got[1][3, 1].item() < 0
    assert got[1][6].abs().sum().item() == 0.0  # both outside [lo, hi]: no gradient


def test_proxy_wider_rows_other_clamp_and_noncontiguous():
    gen = torch.Generator().manual_seed(5)
    base = torch.softmax(2 * torch.randn(41, 2 * 13, generator=gen, dtype=F64), dim=1)
    p = base[:, ::2]  # non-contiguous columns; rows are not normalised, which is fine
    s = (torch.rand(82, generator=gen, dtype=F64) + 0.1)[::2]
    assert not p.is_contiguous() and not s.is_contiguous()
    for clamp in ((0.02, 0.98), (0.001, 0.5)):
        got = proxy_and_grads(p, s, clamp)
        want = reference_proxy_and_grads(p, s, clamp)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-15)
    # transposed storage
    pt = base.t().contiguous().t()
    torch.testing.assert_close(radius_proxy(pt, s), bounds.radius_proxy(pt, s), rtol=1e-12, atol=1e-15)


def test_proxy_scalar_sigma_and_dtype_promotion():
    p = proxy_rows(torch.float32)
    # a number or 0-d sigma does not promote (as the reference); a [B] float64 sigma does
    assert radius_proxy(p, 0.5).dtype == torch.float32
    assert radius_proxy(p, torch.tensor(0.5, dtype=F64)).dtype == torch.float32
    s64 = torch.full((p.shape[0],), 0.5, dtype=F64)
    r = radius_proxy(p, s64)
    assert r.dtype == F64
    torch.testing.assert_close(r, bounds.radius_proxy(p, s64), rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(radius_proxy(p, 0.5), bounds.radius_proxy(p, 0.5), rtol=2e-6, atol=2e-6)
    # gradient of a 0-d sigma sums over the batch
    sig = torch.tensor(0.4, dtype=F64, requires_grad=True)
    p64 = proxy_rows(F64)
    (g,) = torch.autograd.grad(radius_proxy(p64, sig).sum(), sig)
    sig_ref = torch.tensor(0.4, dtype=F64, requires_grad=True)
    (g_ref,) = torch.autograd.grad(bounds.radius_proxy(p64, sig_ref).sum(), sig_ref)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_proxy_half_types_compute_in_float32(dtype):
    p = proxy_rows(dtype)
    s = torch.full((p.shape[0],), 0.5, dtype=dtype)
    r = radius_proxy(p, s)
    assert r.dtype == dtype
    # The reference has no CPU ndtri for half types: run it on the same values in float32.
    want = bounds.radius_proxy(p.float(), s.float()).to(dtype)
    torch.testing.assert_close(r, want, rtol=0, atol=0)
    got = proxy_and_grads(p, s)
    ref = reference_proxy_and_grads(p.float(), s.float())
    torch.testing.assert_close(got[1], ref[1].to(dtype))
    torch.testing.assert_close(got[2], ref[2].to(dtype))


def test_proxy_empty_and_single_row():
    p = torch.empty(0, 4, dtype=F64)
    assert radius_proxy(p, torch.empty(0, dtype=F64)).shape == (0,)
    gp, gs = OPS.radius_proxy_backward(torch.empty(0, dtype=F64), p, torch.empty(0, dtype=F64), 0.02, 0.98)
    assert gp.shape == (0, 4) and gs.shape == (0,)
    p1 = torch.tensor([[0.3, 0.6]], dtype=F64)
    s1 = torch.tensor([0.2], dtype=F64)
    torch.testing.assert_close(radius_proxy(p1, s1), bounds.radius_proxy(p1, s1), rtol=1e-12, atol=0)


def test_proxy_gradcheck():
    # Well-separated values strictly inside the clamp range: the top-2 and the clamp
    # branches do not change under gradcheck's perturbations.
    p = torch.tensor([[0.60, 0.25, 0.10, 0.05], [0.05, 0.15, 0.30, 0.50], [0.33, 0.03, 0.64, 0.0]],
                     dtype=F64, requires_grad=True)
    s = torch.tensor([0.25, 0.5, 1.0], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: radius_proxy(a, b), (p, s), eps=1e-6, atol=1e-8)
    assert torch.autograd.gradcheck(lambda a, b: OPS.radius_proxy(a, b, 0.02, 0.98), (p, s), eps=1e-6,
                                    atol=1e-8)


# ----------------------------------------------------------------------------- opcheck
def test_opcheck_radius_certify():
    gen = torch.Generator().manual_seed(1)
    score = torch.rand(9, generator=gen, dtype=F64)
    count = torch.randint(0, 21, (9,), generator=gen)
    sigma = torch.rand(9, generator=gen, dtype=F64) + 0.1
    for bound in bounds.BOUNDS:
        torch.library.opcheck(OPS.radius_certify.default, (score, count, sigma, 20, 0.01, 4, bound))


def test_opcheck_radius_proxy_and_backward():
    p = torch.tensor([[0.60, 0.25, 0.15], [0.1, 0.2, 0.7]], dtype=F64, requires_grad=True)
    s = torch.tensor([0.25, 0.5], dtype=F64, requires_grad=True)
    torch.library.opcheck(OPS.radius_proxy.default, (p, s, 0.02, 0.98))
    torch.library.opcheck(OPS.radius_proxy.default, (p.detach().float(), s.detach().float(), 0.02, 0.98))
    grad = torch.tensor([1.0, -0.5], dtype=F64)
    torch.library.opcheck(OPS.radius_proxy_backward.default, (grad, p.detach(), s.detach(), 0.02, 0.98))


def test_fake_kernels_give_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        p = torch.empty(5, 3, dtype=torch.float32)
        s = torch.empty(5, dtype=F64)
        assert OPS.radius_proxy(p, s, 0.02, 0.98).dtype == F64
        pa, pb, r, ab = OPS.radius_certify(torch.empty(5), torch.empty(5, dtype=torch.int64), s, 3, 0.1, 2,
                                           "hoeffding")
        assert pa.shape == (5,) and ab.dtype == torch.bool
        gp, gs = OPS.radius_proxy_backward(torch.empty(5, dtype=F64), p, s, 0.02, 0.98)
        assert gp.shape == (5, 3) and gp.dtype == torch.float32 and gs.dtype == F64


# ----------------------------------------------------------------------------- errors
def test_certify_wrapper_errors():
    score = torch.tensor([0.9, 0.8], dtype=F64)
    count = torch.tensor([9, 8])
    sigma = torch.tensor([0.5, 0.5], dtype=F64)
    kw = dict(models=10, alpha=0.01, num_classes=3)
    with pytest.raises(CertssbError, match="unknown bound"):
        certify_radius(score, count, sigma, bound="wald", **kw)
    with pytest.raises(CertssbError, match="integer >= 1"):
        certify_radius(score, count, sigma, models=0, alpha=0.01, num_classes=3, bound="hoeffding")
    with pytest.raises(CertssbError, match=r"alpha must be a number in \(0, 1\)"):
        certify_radius(score, count, sigma, models=10, alpha=1.0, num_classes=3, bound="hoeffding")
    with pytest.raises(CertssbError, match="num_classes must be an integer >= 2"):
        certify_radius(score, count, sigma, models=10, alpha=0.01, num_classes=1, bound="hoeffding")
    with pytest.raises(CertssbError, match="needs top_score"):
        certify_radius(None, count, sigma, bound="hoeffding", **kw)
    with pytest.raises(CertssbError, match="needs top_count"):
        certify_radius(score, None, sigma, bound="clopper-pearson", **kw)
    with pytest.raises(CertssbError, match="1-D tensor"):
        certify_radius(score[None], count, sigma, bound="hoeffding", **kw)
    with pytest.raises(CertssbError, match="same length"):
        certify_radius(score, count[:1], sigma, bound="hoeffding", **kw)
    with pytest.raises(CertssbError, match="B = 2"):
        certify_radius(score, count, sigma[:1].expand(3), bound="hoeffding", **kw)
    with pytest.raises(CertssbError, match="floating-point"):
        certify_radius(count, count, sigma, bound="hoeffding", **kw)
    with pytest.raises(CertssbError, match="integer vote counts, got dtype"):
        certify_radius(score, count.bool(), sigma, bound="clopper-pearson", **kw)
    with pytest.raises(CertssbError, match="mean of scores in"):
        certify_radius(score + 0.2, count, sigma, bound="hoeffding", **kw)
    with pytest.raises(CertssbError, match="mean of scores in"):
        certify_radius(torch.tensor([0.5, float("nan")], dtype=F64), count, sigma, bound="hoeffding", **kw)
    with pytest.raises(CertssbError, match=r"\[0, m=10\]"):
        certify_radius(score, count + 3, sigma, bound="clopper-pearson", **kw)
    with pytest.raises(CertssbError, match=r"\[0, m=10\]"):
        certify_radius(score, count.double() + 0.5, sigma, bound="clopper-pearson", **kw)
    with pytest.raises(CertssbError, match="sigma must be finite and > 0"):
        certify_radius(score, count, sigma - 1, bound="hoeffding", **kw)
    with pytest.raises(CertssbError, match="sigma must be finite and > 0"):
        certify_radius(score, count, float("inf"), bound="clopper-pearson", **kw)
    with pytest.raises(CertssbError, match="one device"):
        certify_radius(score, count, torch.empty(2, device="meta"), bound="hoeffding", **kw)


def test_certify_op_checks():
    score = torch.tensor([0.9, 0.8], dtype=F64)
    count = torch.tensor([9, 8])
    sigma = torch.tensor([0.5, 0.5], dtype=F64)
    with pytest.raises(RuntimeError, match="unknown bound 'wald'"):
        OPS.radius_certify(score, count, sigma, 10, 0.01, 3, "wald")
    with pytest.raises(RuntimeError, match="models .* must be >= 1"):
        OPS.radius_certify(score, count, sigma, 0, 0.01, 3, "hoeffding")
    with pytest.raises(RuntimeError, match=r"alpha must lie in \(0, 1\)"):
        OPS.radius_certify(score, count, sigma, 10, 0.0, 3, "hoeffding")
    with pytest.raises(RuntimeError, match="num_classes must be >= 2"):
        OPS.radius_certify(score, count, sigma, 10, 0.01, 1, "hoeffding")
    with pytest.raises(RuntimeError, match=r"top_score must be a 1-D tensor \[B\]"):
        OPS.radius_certify(score[None], count, sigma, 10, 0.01, 3, "hoeffding")
    with pytest.raises(RuntimeError, match="same length B"):
        OPS.radius_certify(score, count[:1], sigma, 10, 0.01, 3, "hoeffding")
    with pytest.raises(RuntimeError, match="top_count must be an integer tensor"):
        OPS.radius_certify(score, count.double(), sigma, 10, 0.01, 3, "clopper-pearson")
    with pytest.raises(RuntimeError, match="top_score must be a floating-point tensor"):
        OPS.radius_certify(count, count, sigma, 10, 0.01, 3, "hoeffding")
    with pytest.raises(RuntimeError, match="sigma must be a floating-point tensor"):
        OPS.radius_certify(score, count, count, 10, 0.01, 3, "hoeffding")
    # values (checked by the CPU kernel itself)
    with pytest.raises(RuntimeError, match=r"top_score\[1\] = 1\.5 is not a mean probability"):
        OPS.radius_certify(torch.tensor([0.5, 1.5], dtype=F64), count, sigma, 10, 0.01, 3, "hoeffding")
    with pytest.raises(RuntimeError, match=r"top_count\[0\] = 11 is outside \[0, models = 10\]"):
        OPS.radius_certify(score, torch.tensor([11, 1]), sigma, 10, 0.01, 3, "clopper-pearson")
    with pytest.raises(RuntimeError, match=r"sigma\[1\] = 0 must be finite and > 0"):
        OPS.radius_certify(score, count, torch.tensor([0.5, 0.0], dtype=F64), 10, 0.01, 3, "hoeffding")


def test_proxy_errors():
    p = proxy_rows(F64)[:4]
    s = torch.full((4,), 0.5, dtype=F64)
    with pytest.raises(CertssbError, match="0 < lo < hi < 1"):
        radius_proxy(p, s, clamp=(0.5, 0.5))
    with pytest.raises(CertssbError, match="pair"):
        radius_proxy(p, s, clamp=0.5)
    with pytest.raises(CertssbError, match=r"\[B, C\] tensor with C >= 2"):
        radius_proxy(p[:, :1], s)
    with pytest.raises(CertssbError, match=r"\[B, C\] tensor with C >= 2"):
        radius_proxy(p[0], s)
    with pytest.raises(CertssbError, match="floating-point tensor of probabilities"):
        radius_proxy(p.long(), s)
    with pytest.raises(CertssbError, match="NaN"):
        radius_proxy(torch.where(p > 0.9, float("nan"), p), s)
    with pytest.raises(CertssbError, match="sigma must be finite and > 0"):
        radius_proxy(p, -s)
    with pytest.raises(CertssbError, match="B = 4"):
        radius_proxy(p, s[:3])
    with pytest.raises(CertssbError, match="floating-point tensor"):
        radius_proxy(p, s.long())
    with pytest.raises(CertssbError, match="one device"):
        radius_proxy(p, torch.empty(4, device="meta"))
    # the op's own checks
    with pytest.raises(RuntimeError, match="mean_probs must be a \\[B, C\\] tensor with C >= 2"):
        OPS.radius_proxy(p[:, :1], s, 0.02, 0.98)
    with pytest.raises(RuntimeError, match="mean_probs must be float16/bfloat16/float32/float64"):
        OPS.radius_proxy(p.long(), s, 0.02, 0.98)
    with pytest.raises(RuntimeError, match="sigma has 3 entries but mean_probs has 4 rows"):
        OPS.radius_proxy(p, s[:3], 0.02, 0.98)
    with pytest.raises(RuntimeError, match="0 < lo < hi < 1"):
        OPS.radius_proxy(p, s, 0.0, 0.98)
    with pytest.raises(RuntimeError, match="grad has 3 entries"):
        OPS.radius_proxy_backward(s[:3], p, s, 0.02, 0.98)
    # a NaN row through the raw op gives NaN, not a number
    r = OPS.radius_proxy(torch.tensor([[0.5, float("nan")], [0.7, 0.3]], dtype=F64), s[:2], 0.02, 0.98)
    assert math.isnan(r[0].item()) and not math.isnan(r[1].item())


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.needs_cuda
def test_cuda_certify_matches_cpu():
    rng = np.random.default_rng(9)
    for m in (1, 7, 100, 1000, 10000):
        k = count_grid(m, rng)
        score = torch.from_numpy(rng.uniform(0, 1, k.shape[0]))
        sigma = torch.from_numpy(rng.uniform(0.05, 1, k.shape[0]))
        for bound in bounds.BOUNDS:
            for alpha, c in ((1e-3, 10), (0.5, 2)):
                cpu = certify_radius(score, k, sigma, models=m, alpha=alpha, num_classes=c, bound=bound)
                gpu = certify_radius(score.cuda(), k.cuda(), sigma.cuda(), models=m, alpha=alpha,
                                     num_classes=c, bound=bound)
                assert all(t.device.type == "cuda" for t in gpu)
                assert_certs_close(tuple(t.cpu() for t in gpu), cpu)
    # float32 scores, int32 counts, strided inputs, empty input
    s32 = torch.rand(64, dtype=torch.float32)[::2]
    k32 = torch.randint(0, 51, (64,), dtype=torch.int32)[1::2]
    sig = torch.tensor(0.3).expand(32)
    for bound in bounds.BOUNDS:
        cpu = OPS.radius_certify(s32, k32, sig, 50, 0.01, 3, bound)
        gpu = OPS.radius_certify(s32.cuda(), k32.cuda(), sig.cuda(), 50, 0.01, 3, bound)
        assert_certs_close(tuple(t.cpu() for t in gpu), cpu)
        empty = OPS.radius_certify(s32[:0].cuda(), k32[:0].cuda(), sig[:0].cuda(), 50, 0.01, 3, bound)
        assert all(t.shape == (0,) and t.is_cuda for t in empty)


@pytest.mark.needs_cuda
def test_cuda_certify_invalid_rows_are_nan():
    sigma = torch.tensor([0.5, 0.5, -1.0], dtype=F64, device="cuda")
    pa, pb, r, ab = OPS.radius_certify(torch.tensor([0.9, 1.5, 0.9], dtype=F64, device="cuda"),
                                       torch.tensor([9, 11, 9], device="cuda"), sigma, 1000, 0.01, 2,
                                       "hoeffding")
    assert not math.isnan(r[0].item()) and math.isnan(r[1].item()) and math.isnan(r[2].item())
    assert ab.tolist() == [False, True, True]
    _, _, r, ab = OPS.radius_certify(torch.zeros(3, dtype=F64, device="cuda"),
                                     torch.tensor([9, 11, 9], device="cuda"), sigma, 10, 0.01, 2,
                                     "clopper-pearson")
    assert not math.isnan(r[0].item()) and math.isnan(r[1].item()) and math.isnan(r[2].item())


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
def test_cuda_proxy_matches_cpu(dtype):
    gen = torch.Generator().manual_seed(4)
    wide = torch.softmax(2 * torch.randn(300, 70, generator=gen, dtype=F64), dim=1)
    for p in (proxy_rows(F64), wide, wide[::3, ::2]):
        p = p.to(dtype)
        s = (torch.rand(p.shape[0], generator=gen, dtype=F64) + 0.1).to(dtype)
        cpu = proxy_and_grads(p, s)
        gpu = proxy_and_grads(p.cuda(), s.cuda())
        tol = dict(rtol=1e-12, atol=1e-15) if dtype == F64 else {}
        for c, g in zip(cpu, gpu):
            assert g.is_cuda and g.dtype == c.dtype
            torch.testing.assert_close(g.cpu(), c, **tol)
    # NaN rows give NaN on the device too; empty input
    r = OPS.radius_proxy(torch.tensor([[0.5, float("nan")], [0.7, 0.3]], dtype=F64, device="cuda"),
                         torch.ones(2, dtype=F64, device="cuda"), 0.02, 0.98)
    assert math.isnan(r[0].item()) and not math.isnan(r[1].item())
    assert OPS.radius_proxy(torch.empty(0, 3, device="cuda"), torch.empty(0, device="cuda"), 0.02,
                            0.98).shape == (0,)


@pytest.mark.needs_cuda
def test_cuda_opcheck_and_device_errors():
    p = torch.tensor([[0.60, 0.25, 0.15], [0.1, 0.2, 0.7]], dtype=F64, device="cuda", requires_grad=True)
    s = torch.tensor([0.25, 0.5], dtype=F64, device="cuda", requires_grad=True)
    torch.library.opcheck(OPS.radius_proxy.default, (p, s, 0.02, 0.98))
    torch.library.opcheck(OPS.radius_proxy_backward.default,
                          (torch.ones(2, dtype=F64, device="cuda"), p.detach(), s.detach(), 0.02, 0.98))
    k = torch.tensor([3, 20], device="cuda")
    for bound in bounds.BOUNDS:
        torch.library.opcheck(OPS.radius_certify.default, (s.detach(), k, s.detach(), 20, 0.01, 4, bound))
    with pytest.raises(RuntimeError, match="move all inputs to one device"):
        OPS.radius_proxy(p.detach(), s.detach().cpu(), 0.02, 0.98)
    with pytest.raises(RuntimeError, match="move all inputs to one device"):
        OPS.radius_certify(s.detach(), k.cpu(), s.detach(), 20, 0.01, 4, "hoeffding")
    with pytest.raises(CertssbError, match="one device"):
        certify_radius(s.detach(), k, s.detach().cpu(), models=20, alpha=0.01, num_classes=4,
                       bound="hoeffding")
