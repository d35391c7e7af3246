"""Coverage of the certificate bounds, end to end through `certify_votes`, on both backends.

Synthetic ensembles with KNOWN class probabilities: each of the M models of a
trial outputs one of a few fixed logit vectors ("templates"), template j with
probability w_j, independently. So the hard votes are Multinomial(M, q) with
q_c = sum of w_j over the templates whose argmax is c, and the soft vote of a
model is the fixed-point softmax of its template, whose expectation
p_c = sum_j w_j units_j[c] / 2^40 is known exactly. One trial is one row of a
`Votes` (the [TRIALS, K] template counts times the [K, C] template units), so
20,000 trials are certified in one `certify_votes` call.

A bound FAILS on a trial when pA_lower > p[predict] (or pB_upper < max_{c !=
predict} p[c]); the failure rate must stay <= alpha + 4 binomial standard
errors, for Hoeffding (soft) and Clopper-Pearson (hard), 2 and 10 classes,
M in {10, 100, 1000}, true pA in {0.5, 0.9, 0.999}, alpha in {0.05, 0.1}.
The same harness catches deliberately wrong bounds (so it can fail), and the
radius is checked to be monotone in pA_lower and sigma, and 0 with abstain
exactly when pA_lower <= pB_upper. (tests/test_bounds.py checks the bounds
alone on raw scores; this file checks the certificate pipeline around them.)
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from certssb.certify import bounds
from certssb.certify.votes import Certificates, Votes, certify_votes
from certssb.kernels.radius import certify_radius
from certssb.kernels.vote import UNITS_PER_ONE, vote_accumulate

F64 = torch.float64
TRIALS = 20_000
ALPHAS = (0.05, 0.1)
BACKENDS = ("reference", "kernels")
SIGMA = 0.25


def margin(alpha: float, trials: int = TRIALS) -> float:
    """Monte Carlo slack: 4 binomial standard errors of a failure rate alpha over `trials`."""
    return 4.0 * math.sqrt(alpha * (1.0 - alpha) / trials)


@dataclass
class Ensemble:
    """A synthetic ensemble: K templates (logits), their probabilities w, and what follows from them."""

    logits: torch.Tensor  # [K, C] float64: the logit vector of each template
    w: np.ndarray  # [K] probability of each template (a model outputs template j w.p. w_j)
    units: torch.Tensor  # [K, C] int64: fixed-point softmax of each template (the vote op's)
    p_soft: torch.Tensor  # [C] float64: E[soft vote] = w @ units / 2^40 (exact)
    p_hard: torch.Tensor  # [C] float64: P(hard vote = c)


def make_ensemble(pa: float, c: int, family: str) -> Ensemble:
    """Templates whose hard-vote probabilities are (pa, (1 - pa)/(c - 1), ...).

    family "sharp": template c is one-hot in fixed point (logit 40 on class c: the
    other classes round to 0 units), so soft and hard probabilities coincide and every
    soft vote is 0 or 1 (the largest variance a [0, 1] score can have: the worst case
    for Hoeffding). "mixed": half the mass on sharp templates, half on diffuse ones
    (softmax 0.6 on their class, the rest shared), so soft votes are not 0/1.
    """
    q = np.full(c, (1.0 - pa) / (c - 1))
    q[0] = pa
    sharp = 40.0 * torch.eye(c, dtype=F64)
    if family == "sharp":
        logits, w = sharp, q
    else:
        # logit gap g with e^g / (e^g + c - 1) = 0.6
        g = math.log(0.6 * (c - 1) / 0.4)
        diffuse = g * torch.eye(c, dtype=F64)
        logits, w = torch.cat([sharp, diffuse]), np.concatenate([q / 2, q / 2])
    units = torch.zeros(logits.shape, dtype=torch.int64)
    vote_accumulate(logits[None], units, torch.zeros_like(units))  # the op's own fixed point
    wt = torch.from_numpy(w)
    p_soft = (wt[:, None] * units.double()).sum(0) / float(UNITS_PER_ONE)
    p_hard = torch.zeros(c, dtype=F64).index_add_(0, logits.argmax(1), wt)
    return Ensemble(logits, w, units, p_soft, p_hard)


def draw_votes(ens: Ensemble, m: int, trials: int, seed: int) -> Votes:
    """`trials` independent ensembles of m models, one per row of the returned Votes."""
    rng = np.random.default_rng(seed)
    counts = torch.from_numpy(rng.multinomial(m, ens.w, size=trials))  # [trials, K] int64
    soft = counts @ ens.units
    hard = torch.zeros(trials, ens.units.shape[1], dtype=torch.int64)
    hard.index_add_(1, ens.logits.argmax(1), counts)
    return Votes(soft, hard, m)


def failure_rates(cert: Certificates, p_true: torch.Tensor) -> tuple[float, float]:
    """(rate of pA_lower > p[predict], rate of pB_upper < max_{c != predict} p[c]) over the trials."""
    pa_true = p_true[cert.predict]
    others = p_true.expand(cert.predict.shape[0], -1).clone()
    others.scatter_(1, cert.predict[:, None], -1.0)
    pb_true = others.max(dim=1).values
    pa_fail = (cert.pa_lower > pa_true).double().mean().item()
    pb_fail = (cert.pb_upper < pb_true).double().mean().item()
    return pa_fail, pb_fail


def covered(rate: float, alpha: float, trials: int = TRIALS) -> bool:
    """Whether an observed failure rate is compatible with a failure probability <= alpha."""
    return rate <= alpha + margin(alpha, trials)


# ----------------------------------------------------------------------------- coverage
@pytest.mark.parametrize("m", [10, 100, 1000])
@pytest.mark.parametrize("c", [2, 10])
@pytest.mark.parametrize("bound", bounds.BOUNDS)
def test_failure_rate_at_most_alpha(bound, c, m):
    """P(pA_lower > pA) and P(pB_upper < pB) stay <= alpha (+ 4 s.e.), on both backends."""
    families = ("sharp", "mixed") if bound == "hoeffding" else ("sharp",)
    report = []
    for pa in (0.5, 0.9, 0.999):
        for family in families:
            ens = make_ensemble(pa, c, family)
            p_true = ens.p_soft if bound == "hoeffding" else ens.p_hard
            votes = draw_votes(ens, m, TRIALS, seed=zlib.crc32(repr((bound, c, m, pa, family)).encode()))
            sigma = torch.full((TRIALS,), SIGMA, dtype=F64)
            for alpha in ALPHAS:
                certs = {b: certify_votes(votes, sigma, bound=bound, alpha=alpha, backend=b)
                         for b in BACKENDS}
                # the two backends give the same certificates on the same votes
                ref, ker = certs["reference"], certs["kernels"]
                assert torch.equal(ref.predict, ker.predict)
                torch.testing.assert_close(ker.pa_lower, ref.pa_lower, rtol=1e-12, atol=1e-15)
                assert torch.equal(ref.abstain, ker.abstain)
                for backend, cert in certs.items():
                    pa_fail, pb_fail = failure_rates(cert, p_true)
                    report.append((pa, family, alpha, backend, pa_fail, pb_fail))
                    assert covered(pa_fail, alpha), (bound, c, m, pa, family, alpha, backend, pa_fail)
                    assert covered(pb_fail, alpha), (bound, c, m, pa, family, alpha, backend, pb_fail)
                    # pB_upper = 1 - pA_lower >= 1 - pA >= pB: a pB failure needs a pA failure
                    assert pb_fail <= pa_fail
    assert len(report) == 3 * len(families) * len(ALPHAS) * len(BACKENDS)


def test_binary_tie_is_the_hardest_case_and_still_covered():
    """pA = pB = 1/2 (binary): the argmax picks the luckier class, the bound must still hold.

    Clopper-Pearson at level alpha / 2 per class (Bonferroni) is close to tight here:
    its failure rate is a sizeable part of alpha, which shows the harness measures real
    failures rather than zeros.
    """
    ens = make_ensemble(0.5, 2, "sharp")
    votes = draw_votes(ens, 100, TRIALS, seed=5)
    sigma = torch.full((TRIALS,), SIGMA, dtype=F64)
    for backend in BACKENDS:
        cert = certify_votes(votes, sigma, bound="clopper-pearson", alpha=0.1, backend=backend)
        pa_fail, _ = failure_rates(cert, ens.p_hard)
        assert covered(pa_fail, 0.1)
        assert pa_fail > 0.1 / 4


# ----------------------------------------------------------------------------- the harness can fail
def test_harness_catches_a_bound_at_the_wrong_level():
    """Clopper-Pearson computed at alpha = 0.5 but claimed at 0.05 fails the coverage check."""
    ens = make_ensemble(0.9, 2, "sharp")
    votes = draw_votes(ens, 100, TRIALS, seed=11)
    sigma = torch.full((TRIALS,), SIGMA, dtype=F64)
    for backend in BACKENDS:
        honest = certify_votes(votes, sigma, bound="clopper-pearson", alpha=0.05, backend=backend)
        wrong = certify_votes(votes, sigma, bound="clopper-pearson", alpha=0.5, backend=backend)
        assert covered(failure_rates(honest, ens.p_hard)[0], 0.05)
        pa_fail, pb_fail = failure_rates(wrong, ens.p_hard)
        assert not covered(pa_fail, 0.05) and not covered(pb_fail, 0.05)


def test_harness_catches_a_hard_coded_ensemble_size():
    """Hoeffding with M hard-coded to 1000 (as the original Cert-SSB code) on a 10-model
    ensemble: the width shrinks by 10x and the claimed level is violated."""
    ens = make_ensemble(0.9, 10, "sharp")
    votes = draw_votes(ens, 10, TRIALS, seed=12)
    sigma = torch.full((TRIALS,), SIGMA, dtype=F64)
    alpha = 0.05
    honest = certify_votes(votes, sigma, bound="hoeffding", alpha=alpha)
    assert covered(failure_rates(honest, ens.p_soft)[0], alpha)
    top, score, _, _ = bounds.top2(votes.soft_units)
    p_hat = score.double() / (float(UNITS_PER_ONE) * votes.models)
    for backend in BACKENDS:
        if backend == "kernels":
            pa, pb, _, _ = certify_radius(p_hat, None, sigma, models=1000, alpha=alpha, num_classes=10,
                                          bound="hoeffding")
        else:
            pa = bounds.hoeffding_lower(p_hat, 1000, alpha)
            pb = 1.0 - pa
        wrong = Certificates(predict=top, pa_lower=pa, pb_upper=pb, radius=pa, abstain=pa <= 0.5,
                             sigma=sigma, radius_conservative=pa, bound="hoeffding", mode="rab",
                             alpha=alpha, models=1000)
        pa_fail, _ = failure_rates(wrong, ens.p_soft)
        assert not covered(pa_fail, alpha), pa_fail


# ----------------------------------------------------------------------------- radius shape
def test_radius_monotone_in_pa_lower_and_sigma_and_abstains_at_half():
    """radius(pA_lower, sigma) is non-decreasing in both, 0 with abstain iff pA_lower <= pB_upper."""
    pa = torch.cat([torch.linspace(0, 1, 2001, dtype=F64),
                    torch.tensor([0.5, 0.5 + 1e-15, 1 - 1e-13, 1 - 1e-12, 1 - 1e-15], dtype=F64)])
    pa = pa.sort().values
    sigmas = torch.tensor([1e-30, 1e-6, 0.1, 0.25, 1.0, 3.0, 1e6, 1e30], dtype=F64)
    radius, pb, abstain = bounds.certified_radius(pa[:, None], sigmas[None, :])
    assert torch.isfinite(radius).all() and (radius >= 0).all()
    assert (radius.diff(dim=0) >= 0).all()  # in pA_lower, at every sigma
    assert (radius.diff(dim=1) >= 0).all()  # in sigma, at every pA_lower
    lost = (pa <= 1 - pa)[:, None].expand_as(abstain)  # pA_lower <= pB_upper
    assert torch.equal(abstain, lost) and torch.equal(lost, (pa <= 0.5)[:, None].expand_as(lost))
    assert (radius[abstain] == 0).all() and (radius[~abstain] > 0).all()
    assert torch.equal(pb, (1 - pa)[:, None].expand_as(pb))


@pytest.mark.parametrize("bound", bounds.BOUNDS)
def test_native_radius_monotone_and_abstains(bound):
    """The kernel's radius: non-decreasing in the top score / vote count and in sigma."""
    m = 200
    if bound == "hoeffding":
        score = torch.linspace(0, 1, 1001, dtype=F64)
        count = None
        n = score.shape[0]
    else:
        score = None
        count = torch.arange(m + 1)
        n = count.shape[0]
    prev = None
    for s in (1e-30, 0.01, 0.25, 1.0, 1e30):
        pa, pb, radius, abstain = certify_radius(score, count, torch.full((n,), s, dtype=F64), models=m,
                                                 alpha=0.01, num_classes=10, bound=bound)
        assert (pa.diff() >= 0).all() and (radius.diff() >= 0).all()
        assert torch.equal(abstain, pa <= pb) and (radius[abstain] == 0).all() and (radius[~abstain] > 0).all()
        assert torch.isfinite(radius).all()
        if prev is not None:
            assert (radius >= prev).all()
        prev = radius


@pytest.mark.parametrize("backend", BACKENDS)
def test_certify_votes_radius_monotone_in_votes(backend):
    """More votes for the top class never lower the radius; a split vote abstains."""
    m = 50
    k = torch.arange(m + 1)
    hard = torch.stack([k, m - k, torch.zeros_like(k)], dim=1)
    soft = hard * UNITS_PER_ONE
    votes = Votes(soft, hard, m)
    sigma = torch.full((m + 1,), 0.5, dtype=F64)
    for bound in bounds.BOUNDS:
        cert = certify_votes(votes, sigma, bound=bound, alpha=0.01, backend=backend)
        top_votes = torch.maximum(k, m - k)
        order = top_votes.argsort(stable=True)
        assert (cert.radius[order].diff() >= 0).all() and (cert.pa_lower[order].diff() >= 0).all()
        assert torch.equal(cert.abstain, cert.pa_lower <= cert.pb_upper)
        assert cert.abstain[m // 2]  # 25 vs 25
        assert (cert.radius[cert.abstain] == 0).all() and (cert.radius[~cert.abstain] > 0).all()
