"""Tests for certssb.certify.bounds: exact values against SciPy, edge cases, gradients, coverage."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from certssb.certify.bounds import (
    BOUNDS,
    PA_MAX,
    certified_radius,
    clopper_pearson_lower,
    conservative_radius,
    hoeffding_lower,
    pa_lower,
    phi_inv,
    poison_budget,
    radius_proxy,
    top2,
)
from certssb.errors import CertssbError

F64 = torch.float64


# ----------------------------------------------------------------------------- phi_inv
def test_phi_inv_matches_scipy():
    p = torch.tensor([1e-10, 1e-4, 0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.98, 1 - 1e-4, 1 - 1e-10], dtype=F64)
    np.testing.assert_allclose(phi_inv(p).numpy(), scipy.stats.norm.ppf(p.numpy()), rtol=1e-12, atol=1e-12)
    assert phi_inv(torch.tensor(0.5)).item() == 0.0
    # float32 in, float32 out
    assert phi_inv(p.float()).dtype == torch.float32


def test_phi_inv_is_differentiable():
    p = torch.tensor([0.1, 0.5, 0.8], dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(phi_inv(p).sum(), p)
    expected = 1.0 / scipy.stats.norm.pdf(scipy.stats.norm.ppf(p.detach().numpy()))
    np.testing.assert_allclose(g.numpy(), expected, rtol=1e-10)


# ----------------------------------------------------------------------------- hoeffding
def test_hoeffding_exact_formula_and_clamp():
    p_hat = torch.tensor([0.0, 0.3, 0.75, 0.99, 1.0])
    m, alpha = 100, 0.001
    w = math.sqrt(math.log(1 / alpha) / (2 * m))
    out = hoeffding_lower(p_hat, m, alpha)
    assert out.dtype == F64
    expected = np.clip(p_hat.double().numpy() - w, 0, 1)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-15)
    assert out[0].item() == 0.0  # clamped
    # tiny float32 rounding above 1 is tolerated, a real excess is not
    assert hoeffding_lower(torch.tensor([1.0000001]), 10, 0.1).item() <= 1.0
    with pytest.raises(CertssbError, match="p_hat"):
        hoeffding_lower(torch.tensor([1.1]), 10, 0.1)
    with pytest.raises(CertssbError, match="p_hat"):
        hoeffding_lower(torch.tensor([float("nan")]), 10, 0.1)


# ----------------------------------------------------------------------------- clopper-pearson
@pytest.mark.parametrize("m", [1, 10, 100, 1000])
def test_clopper_pearson_matches_scipy_beta(m):
    alpha = 0.01
    k = torch.arange(0, m + 1)
    out = clopper_pearson_lower(k, m, alpha)
    assert out.dtype == F64 and out.shape == k.shape
    kn = k.numpy().astype(float)
    expected = np.where(kn == 0, 0.0, scipy.stats.beta.ppf(alpha, np.maximum(kn, 1), m - kn + 1))
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-14)
    assert out[0].item() == 0.0
    # k == m: P(Bin(m, p) >= m) = p^m = alpha  =>  p = alpha^(1/m)
    assert out[-1].item() == pytest.approx(alpha ** (1 / m), rel=1e-12)
    # monotone in k
    assert bool((out[1:] > out[:-1]).all())


def test_clopper_pearson_defining_property():
    # the bound p_L solves P(Bin(m, p_L) >= k) = alpha
    m, alpha = 50, 0.05
    k = np.array([1, 7, 25, 49])
    pl = clopper_pearson_lower(torch.from_numpy(k), m, alpha).numpy()
    np.testing.assert_allclose(scipy.stats.binom.sf(k - 1, m, pl), alpha, rtol=1e-8)


def test_clopper_pearson_accepts_float_counts_and_rejects_bad_counts():
    a = clopper_pearson_lower(torch.tensor([3.0, 5.0]), 5, 0.1)
    b = clopper_pearson_lower(torch.tensor([3, 5]), 5, 0.1)
    assert torch.equal(a, b)
    for bad in ([6], [-1], [2.5]):
        with pytest.raises(CertssbError, match="counts"):
            clopper_pearson_lower(torch.tensor(bad), 5, 0.1)


def test_pa_lower_dispatch():
    m, alpha = 20, 0.05
    s = torch.tensor([0.9, 0.6])
    c = torch.tensor([18, 12])
    np.testing.assert_array_equal(pa_lower("hoeffding", top_score=s, m=m, alpha=alpha, num_classes=2).numpy(),
                                  hoeffding_lower(s, m, alpha).numpy())
    # Bonferroni: level alpha / num_classes
    for nc in (2, 5):
        got = pa_lower("clopper-pearson", top_count=c, m=m, alpha=alpha, num_classes=nc)
        np.testing.assert_array_equal(got.numpy(), clopper_pearson_lower(c, m, alpha / nc).numpy())
    with pytest.raises(CertssbError, match="hoeffding, clopper-pearson"):
        pa_lower("wilson", top_score=s, m=m, alpha=alpha, num_classes=2)
    with pytest.raises(CertssbError, match="top_count"):
        pa_lower("clopper-pearson", top_score=s, m=m, alpha=alpha, num_classes=2)
    with pytest.raises(CertssbError, match="num_classes"):
        pa_lower("hoeffding", top_score=s, m=m, alpha=alpha, num_classes=1)
    assert BOUNDS == ("hoeffding", "clopper-pearson")


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_bad_alpha(alpha):
    with pytest.raises(CertssbError, match="alpha"):
        hoeffding_lower(torch.tensor([0.5]), 10, alpha)
    with pytest.raises(CertssbError, match="alpha"):
        clopper_pearson_lower(torch.tensor([5]), 10, alpha)


@pytest.mark.parametrize("m", [0, -3, 2.5, True])
def test_bad_m(m):
    with pytest.raises(CertssbError, match="m "):
        hoeffding_lower(torch.tensor([0.5]), m, 0.1)
    with pytest.raises(CertssbError, match="m "):
        clopper_pearson_lower(torch.tensor([0]), m, 0.1)


# ----------------------------------------------------------------------------- radius
def test_certified_radius_by_hand():
    pa = torch.tensor([0.2, 0.5, 0.6, 0.8, 0.99], dtype=F64)
    sigma = torch.tensor([0.25, 0.25, 0.5, 1.0, 0.12], dtype=F64)
    radius, pb, abstain = certified_radius(pa, sigma)
    ppf = scipy.stats.norm.ppf
    expected = [0.0, 0.0, 0.5 / 2 * (ppf(0.6) - ppf(0.4)), 1.0 / 2 * (ppf(0.8) - ppf(0.2)),
                0.12 / 2 * (ppf(0.99) - ppf(0.01))]
    np.testing.assert_allclose(radius.numpy(), expected, rtol=1e-12, atol=0)
    # = sigma * PhiInv(pa) when not abstaining
    np.testing.assert_allclose(radius[2:].numpy(), (sigma * phi_inv(pa))[2:].numpy(), rtol=1e-12)
    assert radius[2].item() == pytest.approx(0.5 * 0.2533471031357997, rel=1e-12)
    # pb_upper + pa_lower == 1 exactly (up to one rounding)
    np.testing.assert_allclose((pb + pa).numpy(), 1.0, rtol=0, atol=1e-16)
    assert abstain.tolist() == [True, True, False, False, False]
    assert radius.dtype == F64 and pb.dtype == F64 and abstain.dtype == torch.bool


def test_certified_radius_abstain_boundary_and_extremes():
    pa = torch.tensor([0.0, 0.5, 0.5 + 1e-12, 1.0], dtype=F64)
    radius, pb, abstain = certified_radius(pa, 0.3)
    assert abstain.tolist() == [True, True, False, False]
    assert radius[0].item() == 0.0 and radius[1].item() == 0.0
    assert 0 < radius[2].item() < 1e-10
    assert torch.isfinite(radius).all() and torch.isfinite(pb).all()
    # pa_lower == 1 is clamped to PA_MAX = 1 - 1e-12: finite, ~7.03 sigma
    assert radius[3].item() == pytest.approx(0.3 * scipy.stats.norm.ppf(PA_MAX), rel=1e-6)
    assert 7.0 < radius[3].item() / 0.3 < 7.1
    assert pb[3].item() == 0.0  # pb_upper itself is not clamped


def test_certified_radius_broadcast_and_errors():
    radius, pb, abstain = certified_radius(torch.tensor([0.7, 0.9]), torch.tensor([[0.1], [0.2]]))
    assert radius.shape == pb.shape == abstain.shape == (2, 2)
    for sig in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(CertssbError, match="sigma"):
            certified_radius(torch.tensor([0.7]), sig)
    for pa in (-0.1, 1.1, float("nan")):
        with pytest.raises(CertssbError, match="pa_lower"):
            certified_radius(torch.tensor([pa]), 0.5)


def test_conservative_radius():
    pa = torch.tensor([0.4, 0.8, 0.8, 0.95], dtype=F64)
    sigma_x = torch.tensor([0.5, 0.5, 0.1, 0.3], dtype=F64)
    out = conservative_radius(pa, sigma_x, 0.25)
    rho = (scipy.stats.norm.ppf(pa.numpy()) - scipy.stats.norm.ppf(1 - pa.numpy())) / 2
    expected = rho * np.minimum(sigma_x.numpy(), 0.25)
    expected[0] = 0.0
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12)
    # never larger than the paper radius
    assert bool((out <= certified_radius(pa, sigma_x)[0]).all())
    with pytest.raises(CertssbError, match="sigma_train_min"):
        conservative_radius(pa, sigma_x, 0.0)
    with pytest.raises(CertssbError, match="sigma_x"):
        conservative_radius(pa, -sigma_x, 0.2)


# ----------------------------------------------------------------------------- poison budget
def _budget_bruteforce(radius: float, delta: float) -> int:
    r = -1
    while delta * math.sqrt(r + 2) < radius:
        r += 1
    return r


def test_poison_budget_boundaries():
    delta = 1.0
    radius = torch.tensor([0.0, 0.5, 1.0, 1.0 + 1e-12, 2.0, math.nextafter(2.0, 3.0), math.sqrt(5.0),
                           3.0, math.nextafter(3.0, 0.0)], dtype=F64)
    got = poison_budget(radius, delta)
    assert got.dtype == torch.int64
    # radius <= delta: -1; radius == delta * sqrt(r+1) exactly: r is NOT covered (strict)
    assert got.tolist() == [-1, -1, -1, 0, 2, 3, _budget_bruteforce(math.sqrt(5.0), 1.0), 7, 7]
    assert got[6].item() in (3, 4)  # sqrt(5) rounds either side of the true value


def test_poison_budget_matches_bruteforce_random():
    g = torch.Generator().manual_seed(0)
    for delta in (0.1, 0.3, 1.0 / 3.0, 1.7):
        # exact-boundary radii delta * sqrt(j) and random ones
        radius = torch.cat([delta * torch.sqrt(torch.arange(0, 60, dtype=F64)),
                            torch.rand(200, generator=g, dtype=F64) * 2.0])
        got = poison_budget(radius, delta).tolist()
        assert got == [_budget_bruteforce(r, delta) for r in radius.tolist()]


def test_poison_budget_errors():
    with pytest.raises(CertssbError, match="delta"):
        poison_budget(torch.tensor([1.0]), -0.1)
    with pytest.raises(CertssbError, match="delta"):
        poison_budget(torch.tensor([1.0]), 0.0)
    with pytest.raises(CertssbError, match="radius"):
        poison_budget(torch.tensor([-1.0]), 0.1)
    with pytest.raises(CertssbError, match="radius"):
        poison_budget(torch.tensor([float("inf")]), 0.1)


# ----------------------------------------------------------------------------- radius proxy
def test_radius_proxy_value():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.995, 0.005, 0.0], [0.4, 0.4, 0.2]], dtype=F64)
    sigma = torch.tensor([0.5, 0.25, 1.0, 0.3], dtype=F64)
    out = radius_proxy(probs, sigma)
    ppf = scipy.stats.norm.ppf
    expected = [0.25 * (ppf(0.7) - ppf(0.2)), 0.125 * (ppf(0.6) - ppf(0.3)),
                0.5 * (ppf(0.98) - ppf(0.02)), 0.0]
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-15)
    assert out.shape == (4,)
    # custom clamp
    out2 = radius_proxy(probs[2:3], sigma[2:3], clamp=(0.001, 0.999))
    assert out2.item() == pytest.approx(0.5 * (ppf(0.995) - ppf(0.005)), rel=1e-12)
    with pytest.raises(CertssbError, match="clamp"):
        radius_proxy(probs, sigma, clamp=(0.5, 0.4))
    with pytest.raises(CertssbError, match="sigma"):
        radius_proxy(probs, -sigma)


def test_radius_proxy_gradcheck():
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(0.5 * torch.randn(6, 4, generator=g, dtype=F64), dim=1)
    # the function is smooth only away from the clamp corners and from top-2 ties
    assert 0.03 < probs.min().item() and probs.max().item() < 0.97
    srt = probs.sort(dim=1, descending=True).values
    assert (srt[:, :2] - srt[:, 1:3]).min().item() > 1e-4
    probs = probs.requires_grad_(True)
    sigma = (torch.rand(6, generator=g, dtype=F64) * 0.5 + 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(radius_proxy, (probs, sigma), eps=1e-7, atol=1e-6)
    # analytic gradient w.r.t. sigma is rho; w.r.t. pA is sigma/2 / phi(PhiInv(pA))
    out = radius_proxy(probs, sigma)
    gp, gs = torch.autograd.grad(out.sum(), (probs, sigma))
    np.testing.assert_allclose(gs.numpy(), (out / sigma).detach().numpy(), rtol=1e-12)
    top, pa, _, _ = top2(probs.detach())
    expected_gpa = sigma.detach().numpy() / 2 / scipy.stats.norm.pdf(scipy.stats.norm.ppf(pa.numpy()))
    np.testing.assert_allclose(gp[torch.arange(6), top].numpy(), expected_gpa, rtol=1e-10)
    # exactly two non-zero entries per row
    assert ((gp != 0).sum(dim=1) == 2).all()


def test_radius_proxy_float32_and_zero_grad_when_clamped():
    probs = torch.tensor([[0.99, 0.01]], requires_grad=True)
    sigma = torch.tensor([0.5], requires_grad=True)
    out = radius_proxy(probs, sigma)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert probs.grad.abs().sum().item() == 0.0  # both entries outside [0.02, 0.98]
    assert sigma.grad.item() == pytest.approx(out.item() / 0.5, rel=1e-6)


# ----------------------------------------------------------------------------- top2
def test_top2_ties_lowest_index():
    s = torch.tensor([
        [0.2, 0.5, 0.5, 0.1],   # tie at top: 1 then 2
        [0.3, 0.3, 0.3, 0.3],   # all tied
        [0.1, 0.4, 0.2, 0.4],   # top tie 1 and 3
        [0.9, 0.05, 0.05, 0.0],  # runner-up tie 1 and 2
        [0.0, 0.0, 0.0, 1.0],   # runner-up tie among 0,1,2
    ])
    top, v1, sec, v2 = top2(s)
    assert top.tolist() == [1, 0, 1, 0, 3]
    assert sec.tolist() == [2, 1, 3, 1, 0]
    assert torch.equal(v1, s[torch.arange(5), top]) and torch.equal(v2, s[torch.arange(5), sec])
    assert top.dtype == sec.dtype == torch.int64


def test_top2_random_against_sort_and_large_ties():
    g = torch.Generator().manual_seed(3)
    # many exact ties: small integer scores
    s = torch.randint(0, 4, (2000, 7), generator=g).double()
    top, v1, sec, v2 = top2(s)
    for row, t, u in zip(s.tolist(), top.tolist(), sec.tolist()):
        order = sorted(range(7), key=lambda j: (-row[j], j))
        assert (t, u) == (order[0], order[1])
    # integer dtype and infinities
    ti, _, si, _ = top2(torch.tensor([[5, 5, 1]]))
    assert (ti.item(), si.item()) == (0, 1)
    tf, _, sf, _ = top2(torch.tensor([[-math.inf, 2.0, -math.inf]]))
    assert (tf.item(), sf.item()) == (1, 0)


def test_top2_errors():
    with pytest.raises(CertssbError, match="C >= 2"):
        top2(torch.zeros(3, 1))
    with pytest.raises(CertssbError, match="C >= 2"):
        top2(torch.zeros(3))
    with pytest.raises(CertssbError, match="NaN"):
        top2(torch.tensor([[0.1, float("nan")]]))


# ----------------------------------------------------------------------------- coverage
TRIALS = 20_000
ALPHA = 0.05
SE = math.sqrt(ALPHA * (1 - ALPHA) / TRIALS)


def _soft_scores(p: float, m: int, gen: torch.Generator) -> torch.Tensor:
    """[TRIALS, m] iid scores in [0, 1] with mean p: a mixture of Beta(2p, 2(1-p)) and Bernoulli(p)
    draws (the Bernoulli ones have the largest variance a [0,1] variable can have)."""
    beta = torch.distributions.Beta(torch.tensor(2 * p, dtype=F64), torch.tensor(2 * (1 - p), dtype=F64))
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    b = beta.sample((TRIALS, m))
    bern = (torch.rand(TRIALS, m, generator=gen, dtype=F64) < p).to(F64)
    pick = torch.rand(TRIALS, m, generator=gen) < 0.5
    return torch.where(pick, b, bern)


@pytest.mark.parametrize("m", [10, 100])
@pytest.mark.parametrize("p", [0.3, 0.6, 0.85, 0.97])
def test_hoeffding_coverage(p, m):
    gen = torch.Generator().manual_seed(1000 * m + int(p * 100))
    x = _soft_scores(p, m, gen)
    lower = hoeffding_lower(x.mean(dim=1), m, ALPHA)
    fail = (lower > p).double().mean().item()
    assert fail <= ALPHA + 3 * SE
    # not absurdly loose: on average no further below p than the Hoeffding width (+ MC slack)
    width = math.sqrt(math.log(1 / ALPHA) / (2 * m))
    assert (p - lower).mean().item() <= width + 0.01
    # the check has power: the raw mean fails far more often than alpha
    assert ((x.mean(dim=1) > p).double().mean().item()) > ALPHA + 10 * SE


@pytest.mark.parametrize("m", [10, 100])
@pytest.mark.parametrize("p", [0.3, 0.6, 0.85, 0.97])
def test_clopper_pearson_coverage_binary(p, m):
    gen = torch.Generator().manual_seed(7 * m + int(p * 100))
    k = (torch.rand(TRIALS, m, generator=gen) < p).sum(dim=1)
    lower = clopper_pearson_lower(k, m, ALPHA)
    fail = (lower > p).double().mean().item()
    assert fail <= ALPHA + 3 * SE
    # exact bound: tighter on average than Hoeffding at the same level
    width = math.sqrt(math.log(1 / ALPHA) / (2 * m))
    assert (p - lower).mean().item() <= width + 0.01
    # and not wildly conservative where the binomial is not too discrete
    if m == 100 and 0.2 < p < 0.9:
        assert fail > ALPHA / 4


@pytest.mark.parametrize("m", [10, 100])
@pytest.mark.parametrize("probs", [(0.6, 0.1, 0.1, 0.1, 0.1), (0.35, 0.3, 0.2, 0.1, 0.05),
                                   (0.9, 0.04, 0.03, 0.02, 0.01), (0.5, 0.5, 0.0, 0.0, 0.0)])
@pytest.mark.parametrize("bound", BOUNDS)
def test_pa_lower_coverage_five_classes(bound, probs, m):
    """The bound on the probability of the argmax-selected class holds with prob >= 1 - alpha."""
    c = len(probs)
    gen = torch.Generator().manual_seed(17 * m + int(probs[0] * 100) + (bound == "hoeffding"))
    p = torch.tensor(probs, dtype=F64)
    u = torch.rand(TRIALS, m, generator=gen, dtype=F64)
    votes = torch.searchsorted(torch.cumsum(p, 0)[:-1].contiguous(), u, right=True)
    onehot = torch.nn.functional.one_hot(votes, c).to(F64)  # [TRIALS, m, c]
    if bound == "clopper-pearson":
        counts = onehot.sum(dim=1).long()
        top, _, _, _ = top2(counts)
        lower = pa_lower(bound, top_count=counts.gather(1, top[:, None])[:, 0], m=m, alpha=ALPHA,
                         num_classes=c)
    else:
        # soft scores: model j outputs lam * onehot(vote_j) + (1 - lam) * p, lam ~ U(0, 1):
        # a probability vector with expectation exactly p
        lam = torch.rand(TRIALS, m, 1, generator=gen, dtype=F64)
        mean = (lam * onehot + (1 - lam) * p).mean(dim=1)
        top, v1, _, _ = top2(mean)
        lower = pa_lower(bound, top_score=v1, m=m, alpha=ALPHA, num_classes=c)
    true = p[top]
    fail = (lower > true).double().mean().item()
    assert fail <= ALPHA + 3 * SE
    assert (true - lower).mean().item() <= math.sqrt(math.log(c / ALPHA) / (2 * m)) + 0.02
