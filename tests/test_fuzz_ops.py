"""Fuzzing of the ops with hypothesis: extreme values never put a NaN into a certificate.

Every op is run on both paths (the native kernel and its pure-PyTorch reference)
over inputs drawn from the edges: probabilities exactly 0 and 1 and ties, logits
of +-1e30 (and +-3e38 in float32, next to its largest value), -inf/inf/NaN logits,
sigma from 1e-30 to 1e30 (and up to the 1e300 limit where float64 allows it),
M = 1, huge M, empty batches, one class winning every vote. Properties:

- the two paths agree (same classes and counts; values to the ops' documented
  tolerance);
- a certificate never holds a NaN: pA_lower in [0, 1], pB_upper = 1 - pA_lower,
  radius finite and >= 0, and radius == 0 exactly when abstaining;
- inputs that cannot give a certificate (non-finite logits, sigma outside
  (0, 1e300]) are refused with a CertssbError by both paths, never turned into
  numbers.

Bounded and reproducible: each test runs at most 60-100 examples, derandomized,
without deadlines (the first call of an op may be slow).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certssb.certify import bounds
from certssb.certify.votes import Votes, certify_votes
from certssb.errors import CertssbError
from certssb.kernels.noise import noise
from certssb.kernels.radius import certify_radius, radius_proxy
from certssb.kernels.vote import MAX_MODELS, UNITS_PER_ONE, reference_accumulate, vote_accumulate, vote_top2
from certssb.smoothing.noise import noisy_copies

F64 = torch.float64
FUZZ = settings(max_examples=80, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DTYPES = st.sampled_from([torch.float32, torch.float64])
SIGMAS = st.one_of(st.sampled_from([1e-30, 1e-12, 1e-6, 0.25, 1.0, 1e6, 1e12, 1e30]),
                   st.floats(min_value=1e-30, max_value=1e30, allow_nan=False, allow_infinity=False))
PROBS = st.one_of(st.sampled_from([0.0, 1.0, 0.5, 0.02, 0.98, 1e-30, 1.0 - 1e-7, 0.5 + 1e-7]),
                  st.floats(min_value=0.0, max_value=1.0, allow_nan=False))
LOGITS32 = st.one_of(st.sampled_from([0.0, 1.0, -1.0, 1e30, -1e30, 3e38, -3e38, 88.7, -88.7, 745.0,
                                      -745.0, 1e-30]),
                     st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32))
ALPHAS = st.one_of(st.sampled_from([1e-300, 1e-12, 1e-3, 0.05, 0.5, 1.0 - 1e-16]),
                   st.floats(min_value=1e-300, max_value=1.0 - 1e-16, exclude_min=False))


def assert_sound(pa: torch.Tensor, pb: torch.Tensor, radius: torch.Tensor, abstain: torch.Tensor) -> None:
    """No NaN reaches a certificate: the properties every certificate must have."""
    assert pa.dtype == pb.dtype == radius.dtype == F64 and abstain.dtype == torch.bool
    assert not torch.isnan(pa).any() and not torch.isnan(pb).any() and not torch.isnan(radius).any()
    assert ((pa >= 0) & (pa <= 1)).all()
    assert torch.equal(pb, 1.0 - pa)
    assert torch.isfinite(radius).all() and (radius >= 0).all()
    assert torch.equal(abstain, pa <= 0.5)
    assert (radius[abstain] == 0).all()


def tensor_of(draw, elements, shape, dtype) -> torch.Tensor:
    n = math.prod(shape)
    values = draw(st.lists(elements, min_size=n, max_size=n))
    return torch.tensor(values, dtype=dtype).reshape(shape)


# ----------------------------------------------------------------------------- noise
@st.composite
def noise_case(draw):
    dtype = draw(DTYPES)
    b = draw(st.integers(0, 3))
    feat = draw(st.sampled_from([(0,), (1,), (5,), (1, 3, 3), (2, 2, 1)]))
    x = tensor_of(draw, st.one_of(st.sampled_from([0.0, 1.0, -1.0, 0.5, 1e-30, 1e30, -1e30]),
                                  st.floats(-10.0, 10.0)), (b, *feat), dtype)
    sigma = tensor_of(draw, SIGMAS, (b,), dtype)
    ids = torch.tensor(draw(st.lists(st.integers(0, 2**32 - 1), min_size=b, max_size=b)), dtype=torch.int64)
    models = draw(st.integers(0, 3))
    k0 = draw(st.integers(0, 2**32 - max(models, 1)))
    seed = draw(st.integers(0, 2**64 - 1))
    stream = draw(st.integers(0, 3))
    return x, sigma, ids, models, k0, seed, stream


@FUZZ
@given(noise_case())
def test_noise_kernel_equals_reference_at_extremes(case):
    x, sigma, ids, models, k0, seed, stream = case
    out = noise(x, sigma, ids, seed=seed, stream=stream, k0=k0, models=models)
    ref = noisy_copies(x, sigma, seed=seed, stream=stream, models=list(range(k0, k0 + models)), ids=ids,
                       backend="reference")
    assert out.shape == ref.shape == (models, *x.shape) and out.dtype == x.dtype
    assert torch.isfinite(out).all()  # |eps| <= 6.67: x + sigma * eps stays far below the dtype's max
    scale = x.abs().unsqueeze(0) + 7.0 * sigma.reshape(1, -1, *([1] * (x.dim() - 1))).abs()
    assert ((out - ref).abs() <= 1e-6 * scale).all()


@FUZZ
@given(noise_case())
def test_noise_backward_equals_reference_autograd(case):
    x, sigma, ids, models, k0, seed, stream = case
    x = x.double().clamp(-10, 10)
    sigma = sigma.double()
    g = torch.Generator().manual_seed(seed % 2**31)
    upstream = torch.randn((models, *x.shape), generator=g, dtype=F64)
    grads = []
    for backend in ("kernels", "reference"):
        xs = x.clone().requires_grad_(True)
        ss = sigma.clone().requires_grad_(True)
        out = noisy_copies(xs, ss, seed=seed, stream=stream, models=list(range(k0, k0 + models)), ids=ids,
                           backend=backend)
        gx, gs = torch.autograd.grad((out * upstream).sum(), (xs, ss), allow_unused=True)
        gx = torch.zeros_like(x) if gx is None else gx
        gs = torch.zeros_like(sigma) if gs is None else gs
        assert torch.isfinite(gx).all() and torch.isfinite(gs).all()
        grads.append((gx, gs))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- votes
@st.composite
def logits_case(draw, max_models: int = 4):
    dtype = draw(DTYPES)
    m = draw(st.integers(0, max_models))
    b = draw(st.integers(0, 4))
    c = draw(st.integers(2, 6))
    logits = tensor_of(draw, LOGITS32, (m, b, c), dtype)
    if draw(st.booleans()) and m and b:
        # one class wins every vote by a huge margin, or every class ties
        if draw(st.booleans()):
            logits[..., draw(st.integers(0, c - 1))] = 1e30
        else:
            logits[...] = draw(LOGITS32)
    return logits


def accumulate(logits: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    soft = torch.zeros(logits.shape[1:], dtype=torch.int64)
    hard = torch.zeros_like(soft)
    (vote_accumulate if backend == "kernels" else reference_accumulate)(logits, soft, hard)
    return soft, hard


@FUZZ
@given(logits_case())
def test_vote_accumulate_kernel_equals_reference(logits):
    m, b, c = logits.shape
    soft_k, hard_k = accumulate(logits, "kernels")
    soft_r, hard_r = accumulate(logits, "reference")
    assert torch.equal(hard_k, hard_r)  # argmax, ties to the lowest class, on both paths
    assert ((soft_k - soft_r).abs() <= m).all()  # at most one unit of rounding per model
    assert torch.equal(hard_k.sum(1), torch.full((b,), m, dtype=torch.int64))
    assert (soft_k >= 0).all() and (soft_k <= m * UNITS_PER_ONE).all()
    assert ((soft_k.sum(1) - m * UNITS_PER_ONE).abs() <= m * c).all()  # each model's softmax sums to 1


@FUZZ
@given(logits_case(), st.sampled_from([math.inf, -math.inf, math.nan]), st.data())
def test_vote_accumulate_refuses_non_finite_logits(logits, bad, data):
    if logits.numel() == 0:
        return
    flat = logits.reshape(-1)
    flat[data.draw(st.integers(0, flat.numel() - 1))] = bad
    for backend in ("kernels", "reference"):
        soft = torch.zeros(logits.shape[1:], dtype=torch.int64)
        hard = torch.zeros_like(soft)
        fn = vote_accumulate if backend == "kernels" else reference_accumulate
        with pytest.raises(CertssbError, match="NaN or Inf"):
            fn(logits, soft, hard)
        assert not soft.any() and not hard.any()  # nothing half-accumulated
        votes = Votes.zeros(logits.shape[1], logits.shape[2])
        with pytest.raises(CertssbError, match="NaN or Inf"):
            votes.add_logits(logits, backend=backend)
        assert votes.models == 0


@FUZZ
@given(st.integers(0, 5), st.integers(2, 6), st.booleans(), st.data())
def test_vote_top2_equals_reference_with_ties(b, c, by_count, data):
    values = st.one_of(st.integers(0, 3), st.sampled_from([0, 1, UNITS_PER_ONE, 2**62]))
    soft = torch.tensor(data.draw(st.lists(values, min_size=b * c, max_size=b * c)),
                        dtype=torch.int64).reshape(b, c)
    hard = torch.tensor(data.draw(st.lists(values, min_size=b * c, max_size=b * c)),
                        dtype=torch.int64).reshape(b, c)
    cls, units, counts = vote_top2(soft, hard, by_count=by_count)
    top, _, second, _ = bounds.top2(hard if by_count else soft)
    assert torch.equal(cls[:, 0], top) and torch.equal(cls[:, 1], second)
    assert torch.equal(units, soft.gather(1, cls)) and torch.equal(counts, hard.gather(1, cls))


# ----------------------------------------------------------------------------- radius_certify
@st.composite
def certify_case(draw):
    bound = draw(st.sampled_from(bounds.BOUNDS))
    m = draw(st.one_of(st.sampled_from([1, 2, 3, 10, 1000, 2**24, 2**31 + 1]), st.integers(1, 10**7)))
    alpha = draw(ALPHAS)
    c = draw(st.one_of(st.just(2), st.just(10), st.integers(2, 1000)))
    b = draw(st.integers(0, 6))
    score_values = st.one_of(st.sampled_from([0.0, 1.0, 0.5, 1.0 + 1e-6, -1e-6, 0.5 + 1e-16, 1.0 - 1e-16]),
                             st.floats(0.0, 1.0))
    score = tensor_of(draw, score_values, (b,), draw(DTYPES))
    count_values = st.one_of(st.sampled_from([0, 1, m // 2, (m + 1) // 2, m - 1, m]), st.integers(0, m))
    count = torch.tensor(draw(st.lists(count_values, min_size=b, max_size=b)), dtype=torch.int64)
    sigma = tensor_of(draw, st.one_of(SIGMAS, st.sampled_from([1e-300, 1e300])), (b,), F64)
    return bound, m, alpha, c, score, count, sigma


@settings(FUZZ, max_examples=100)
@given(certify_case())
def test_radius_certify_is_sound_and_matches_reference(case):
    bound, m, alpha, c, score, count, sigma = case
    got = certify_radius(score, count, sigma, models=m, alpha=alpha, num_classes=c, bound=bound)
    assert_sound(*got)
    pa_ref = bounds.pa_lower(bound, top_score=score, top_count=count, m=m, alpha=alpha, num_classes=c)
    radius_ref, pb_ref, abstain_ref = bounds.certified_radius(pa_ref, sigma)
    assert_sound(pa_ref, pb_ref, radius_ref, abstain_ref)
    # Clopper-Pearson against SciPy: 1e-12 relative up to M = 1e4 (test_kernels_radius); looser for
    # huge M, and for levels below 1e-100, where SciPy's own betaincinv is only that accurate (the
    # kernel is checked against mpmath there: test_clopper_pearson_at_tiny_levels_matches_mpmath).
    # A pA_lower within rounding of 1/2 may land on either side of it, so abstain is only compared
    # away from the boundary.
    if bound == "hoeffding":
        rtol = 1e-12
    elif alpha / c < 1e-100:
        rtol = 1e-6
    else:
        rtol = 1e-12 if m <= 10_000 else 1e-9
    torch.testing.assert_close(got[0], pa_ref, rtol=rtol, atol=1e-300)
    clear = (pa_ref - 0.5).abs() > 1e-9
    assert torch.equal(got[3][clear], abstain_ref[clear])
    both = clear & ~got[3]
    torch.testing.assert_close(got[2][both], radius_ref[both], rtol=max(rtol, 1e-10) * 1e3, atol=0)


@FUZZ
@given(st.sampled_from(bounds.BOUNDS),
       st.sampled_from([0.0, -1e-30, -1.0, math.inf, -math.inf, math.nan, 1.01e300, 1.7e308]),
       st.integers(1, 4), st.data())
def test_radius_certify_refuses_bad_sigma_on_both_paths(bound, bad, b, data):
    sigma = torch.full((b,), 0.25, dtype=F64)
    sigma[data.draw(st.integers(0, b - 1))] = bad
    score = torch.full((b,), 0.99, dtype=F64)
    count = torch.full((b,), 100, dtype=torch.int64)
    with pytest.raises(CertssbError, match="sigma"):
        certify_radius(score, count, sigma, models=100, alpha=0.001, num_classes=2, bound=bound)
    pa = bounds.pa_lower(bound, top_score=score, top_count=count, m=100, alpha=0.001, num_classes=2)
    with pytest.raises(CertssbError, match="sigma"):
        bounds.certified_radius(pa, sigma)
    # the raw op checks the values itself on the CPU (no wrapper in front of it)
    with pytest.raises(RuntimeError, match="sigma"):
        torch.ops.certssb.radius_certify(score, count, sigma, 100, 0.001, 2, bound)


# ----------------------------------------------------------------------------- radius_proxy
@st.composite
def proxy_case(draw):
    dtype = draw(DTYPES)
    b = draw(st.integers(0, 4))
    c = draw(st.integers(2, 5))
    probs = tensor_of(draw, PROBS, (b, c), dtype)
    if b and draw(st.booleans()):  # an exact tie between the two leading classes
        probs[:, 1] = probs[:, 0]
    sigma = tensor_of(draw, SIGMAS, (b,), dtype)
    return probs, sigma


@FUZZ
@given(proxy_case())
def test_radius_proxy_and_backward_finite_and_match_reference(case):
    probs, sigma = case
    tol = dict(rtol=1e-12, atol=0) if probs.dtype == F64 else dict(rtol=2e-6, atol=0)
    p_k = probs.clone().requires_grad_(True)
    s_k = sigma.clone().requires_grad_(True)
    r_k = radius_proxy(p_k, s_k)
    p_r = probs.clone().requires_grad_(True)
    s_r = sigma.clone().requires_grad_(True)
    r_r = bounds.radius_proxy(p_r, s_r)
    assert r_k.dtype == r_r.dtype == probs.dtype and r_k.shape == (probs.shape[0],)
    assert torch.isfinite(r_k).all() and (r_k >= 0).all()  # pA >= pB after the same clamp
    torch.testing.assert_close(r_k, r_r, **tol)
    if probs.shape[0] == 0:
        return
    w = torch.linspace(-1, 1, probs.shape[0], dtype=probs.dtype)
    g_k = torch.autograd.grad((r_k * w).sum(), (p_k, s_k))
    g_r = torch.autograd.grad((r_r * w).sum(), (p_r, s_r))
    for a, b in zip(g_k, g_r):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **tol)


# ----------------------------------------------------------------------------- certify_votes
@FUZZ
@given(logits_case(max_models=6).filter(lambda t: t.shape[0] >= 1), SIGMAS, ALPHAS,
       st.sampled_from(bounds.BOUNDS))
def test_certify_votes_from_extreme_logits(logits, sigma, alpha, bound):
    """Votes accumulated from extreme logits certify to sound, backend-independent certificates."""
    m, b, c = logits.shape
    votes = {}
    for backend in ("kernels", "reference"):
        v = Votes.zeros(b, c)
        v.add_logits(logits, backend=backend)
        votes[backend] = v
    sig = torch.full((b,), sigma, dtype=F64)
    certs = {}
    for vb, v in votes.items():
        for cb in ("kernels", "reference"):
            cert = certify_votes(v, sig, bound=bound, alpha=alpha, backend=cb)
            assert cert.predict.shape == (b,) and ((cert.predict >= 0) & (cert.predict < c)).all()
            assert_sound(cert.pa_lower, cert.pb_upper, cert.radius, cert.abstain)
            certs[vb, cb] = cert
    first = certs["kernels", "kernels"]
    for cert in certs.values():
        if bound == "clopper-pearson":  # counts are exact integers on every path
            assert torch.equal(cert.predict, first.predict)
        torch.testing.assert_close(cert.pa_lower, first.pa_lower, rtol=1e-9, atol=1e-12)


@FUZZ
@given(st.sampled_from([1, 2, 7, 1000, MAX_MODELS]), st.integers(0, 3), st.integers(2, 10), st.integers(0, 9),
       SIGMAS, ALPHAS, st.sampled_from(bounds.BOUNDS), st.sampled_from(["kernels", "reference"]))
def test_certify_votes_unanimous_empty_and_tied(m, b, c, winner, sigma, alpha, bound, backend):
    """One class winning every vote, an exact two-way tie, and empty batches, at any M."""
    winner %= c
    unanimous = torch.zeros(b, c, dtype=torch.int64)
    unanimous[:, winner] = m
    half = torch.zeros(b, c, dtype=torch.int64)
    half[:, 0] = m // 2
    half[:, 1] = m - m // 2
    sig = torch.full((b,), sigma, dtype=F64)
    for hard in (unanimous, half):
        votes = Votes(hard * UNITS_PER_ONE, hard.clone(), m)
        cert = certify_votes(votes, sig, bound=bound, alpha=alpha, backend=backend)
        assert cert.predict.shape == (b,)
        assert_sound(cert.pa_lower, cert.pb_upper, cert.radius, cert.abstain)
        if b:
            assert (cert.predict == int(hard[0].argmax())).all()  # ties: the lowest class
        if hard is half and m % 2 == 0:
            assert cert.abstain.all()  # an exact tie (half the votes) can never certify
    # one more model would overflow the int64 soft accumulators: refused, never wrapped around
    if m == MAX_MODELS:
        with pytest.raises(CertssbError, match="exceed"):
            certify_votes(Votes(unanimous * UNITS_PER_ONE, unanimous.clone(), m + 1), sig, bound=bound,
                          alpha=alpha, backend=backend)


# ----------------------------------------------------------------------------- regressions found here
# Quantiles of Beta(k, m - k + 1) at level alpha / 2 = 1e-300 (1e-307 for the last), computed with
# mpmath at 40 digits (bisection of the regularized incomplete beta in ln x). Before the fix the
# kernel stopped after 300 crawling Halley steps ABOVE the quantile (7, 6: 9.29e-45, a "lower
# bound" 1e6 times too high) and lost x / x0 in the centred prefactor (30, 29: 5.4e-10).
TAIL_QUANTILES = [  # (m, k, level, quantile)
    (3, 2, 1e-300, 5.7735026918962576e-151),
    (7, 6, 1e-300, 7.2302002639948378e-51),
    (10, 9, 1e-300, 3.5938136638046273e-34),
    (30, 12, 1e-100, 1.0121654135533248e-9),
    (30, 13, 1e-150, 6.9203793946855086e-13),
    (30, 20, 1e-300, 4.22777025349215e-16),
    (30, 29, 1e-307, 2.3059924856909432e-11),
    (100, 89, 1e-300, 0.0002952755050907355),
    (1000, 500, 1e-300, 0.067855930991965924),
]


@pytest.mark.parametrize("m,k,level,quantile", TAIL_QUANTILES)
def test_clopper_pearson_at_tiny_levels_matches_mpmath(m, k, level, quantile):
    count = torch.tensor([k])
    got = certify_radius(None, count, 1.0, models=m, alpha=2 * level, num_classes=2, bound="clopper-pearson")
    assert got[0].item() == pytest.approx(quantile, rel=1e-13)
    # The reference: SciPy's betaincinv gives NaN at some of these levels (a bisection on betainc
    # takes over) and is only ~1e-8 accurate at others: a number, close, never NaN.
    ref = bounds.pa_lower("clopper-pearson", top_count=count, m=m, alpha=2 * level, num_classes=2)
    assert ref.item() == pytest.approx(quantile, rel=1e-6)


@settings(FUZZ, max_examples=100)
@given(st.integers(2, 2000), st.data(), st.integers(2, 250))
def test_clopper_pearson_brackets_its_level(m, data, exponent):
    """I_x(k, m-k+1) at the kernel's x crosses the level within 1e-10 of x: the bound is the
    quantile, never above it beyond rounding (SciPy's betainc is the oracle down to 1e-250)."""
    import numpy as np
    import scipy.special

    k = data.draw(st.integers(1, m))
    level = 10.0 ** -exponent
    x = certify_radius(None, torch.tensor([k]), 1.0, models=m, alpha=2 * level, num_classes=2,
                       bound="clopper-pearson")[0].item()
    a, b = float(k), float(m - k + 1)
    below = scipy.special.betainc(a, b, x * (1 - 1e-10))
    above = scipy.special.betainc(a, b, min(x * (1 + 1e-10), 1.0))
    assert below <= level * (1 + 1e-9) and above >= level * (1 - 1e-9), (m, k, level, x)
    assert np.isfinite(x) and 0 < x < 1


@pytest.mark.needs_cuda
@pytest.mark.parametrize("m,k,level,quantile", TAIL_QUANTILES)
def test_cuda_clopper_pearson_at_tiny_levels_matches_mpmath(m, k, level, quantile):
    """The CUDA kernel shares stats.h: the same tail quantiles (PhiInv of the first guess differs)."""
    got = certify_radius(None, torch.tensor([k], device="cuda"), 1.0, models=m, alpha=2 * level, num_classes=2,
                         bound="clopper-pearson")
    assert got[0].item() == pytest.approx(quantile, rel=1e-13)


@pytest.mark.needs_cuda
def test_cuda_raw_op_never_certifies_a_sigma_above_the_limit():
    """The raw CUDA op does not throw on values (the wrapper does): such rows come out NaN and abstain."""
    sigma = torch.tensor([0.25, 1.01e300, 1e300], dtype=F64, device="cuda")
    score = torch.full((3,), 0.999, dtype=F64, device="cuda")
    count = torch.zeros(3, dtype=torch.int64, device="cuda")
    pa, pb, radius, abstain = torch.ops.certssb.radius_certify(score, count, sigma, 1000, 0.001, 2, "hoeffding")
    assert torch.isnan(radius[1]) and abstain[1] and torch.isfinite(radius[[0, 2]]).all()
    with pytest.raises(CertssbError, match="sigma"):
        certify_radius(score, None, sigma, models=1000, alpha=0.001, num_classes=2, bound="hoeffding")
