"""The bound registry: a bound registered in Python certifies everywhere (reference path under either
backend), unknown names list the registered ones, and the shipped bounds keep their native kernel."""
from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torch import nn

from certssb.certify import votes as votes_mod
from certssb.certify.bounds import (BOUNDS, HARD, SOFT, BoundSpec, bound_names, get_bound, pa_lower,
                                    register_bound, unregister_bound)
from certssb.certify.votes import Votes, certify_models, certify_votes
from certssb.cli import build_parser
from certssb.errors import CertssbError
from certssb.kernels import using_backend
from certssb.kernels.dispatch import use_native
from certssb.runner.config import RunConfig

LOOSE = "loose-hoeffding"
HARD_TOY = "hard-hoeffding"


def _width(m: int, alpha: float) -> float:
    return math.sqrt(math.log(1.0 / alpha) / (2.0 * m))


def _loose(top_score, m, alpha, num_classes):
    """Deliberately loose: twice Hoeffding's width (still a valid bound)."""
    return (top_score.to(torch.float64) - 2 * _width(m, alpha)).clamp(0.0, 1.0)


def _hard(top_count, m, alpha, num_classes):
    """Hoeffding on the hard votes' fraction, Bonferroni over the classes."""
    return (top_count.to(torch.float64) / m - _width(m, alpha / num_classes)).clamp(0.0, 1.0)


@pytest.fixture
def toy_bounds():
    register_bound(BoundSpec(LOOSE, SOFT, _loose))
    register_bound(BoundSpec(HARD_TOY, HARD, _hard))
    try:
        yield
    finally:
        unregister_bound(LOOSE)
        unregister_bound(HARD_TOY)


def constant(logits: list[float], features: int) -> nn.Module:
    """A model whose logits ignore the input: zero weights, the logits as bias."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(features, len(logits)))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor(logits))
    return model


def _forbid_kernel(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the native radius op ran for a bound without a kernel id")
    monkeypatch.setattr(votes_mod, "certify_radius", boom)


def _radius(pa: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    pa = pa.numpy()
    r = sigma.double().numpy() * (stats.norm.ppf(pa) - stats.norm.ppf(1 - pa)) / 2
    return torch.from_numpy(r).where(torch.from_numpy(pa) > 0.5, torch.zeros(()).double())


def _votes() -> Votes:
    # row 0: class 1 leads both soft and hard votes; row 1: class 0 leads the soft votes (80 models
    # very sure), class 2 the hard ones (the other 120, mildly sure); rows 1 and 2 abstain under LOOSE
    m = 200
    v = Votes.zeros(3, 3)
    logits = torch.zeros(m, 3, 3)
    logits[:, 0] = torch.tensor([0.0, 12.0, 0.0])
    logits[:, 1] = torch.tensor([0.0, 0.0, 0.1])
    logits[:80, 1] = torch.tensor([20.0, 0.0, 0.0])
    logits[:, 2] = torch.tensor([0.0, 0.3, 0.0])
    v.add_logits(logits, backend="reference")
    return v


def test_toy_bounds_are_registered(toy_bounds):
    assert bound_names() == ("hoeffding", "clopper-pearson", LOOSE, HARD_TOY)
    assert BOUNDS == bound_names() and LOOSE in BOUNDS and len(BOUNDS) == 4
    assert get_bound(LOOSE).kernel is None and get_bound("hoeffding").kernel == "hoeffding"
    # the CLI and the run config accept it (the parser reads the registry when it is built)
    args = build_parser().parse_args(["certify", "--out", "x", "--bound", LOOSE])
    assert args.bound == LOOSE
    RunConfig(bound=LOOSE).validate()


def test_registry_refuses_bad_specs(toy_bounds):
    with pytest.raises(CertssbError, match="already registered"):
        register_bound(BoundSpec(LOOSE, SOFT, _loose))
    with pytest.raises(CertssbError, match="statistic must be one of soft, hard"):
        register_bound(BoundSpec("wilson", "median", _loose))
    with pytest.raises(CertssbError, match="BoundSpec"):
        register_bound(LOOSE)
    assert "wilson" not in BOUNDS


@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_toy_soft_bound_certifies_through_the_reference_path(toy_bounds, monkeypatch, backend):
    _forbid_kernel(monkeypatch)
    v = _votes()
    sigma = torch.tensor([0.25, 0.5, 1.0])
    cert = certify_votes(v, sigma, bound=LOOSE, alpha=0.001, backend=backend)
    soft_mean = v.soft_sum / v.models
    top_score = soft_mean.max(1).values
    pa = (top_score - 2 * _width(v.models, 0.001)).clamp(0, 1)
    assert cert.predict.tolist() == [1, 0, 1] and cert.bound == LOOSE
    torch.testing.assert_close(cert.pa_lower, pa, rtol=0, atol=1e-15)
    torch.testing.assert_close(cert.pb_upper, 1 - pa, rtol=0, atol=1e-15)
    torch.testing.assert_close(cert.radius, _radius(pa, sigma), rtol=1e-12, atol=1e-15)
    assert cert.abstain.tolist() == (pa <= 0.5).tolist() == [False, True, True]
    assert cert.radius[0] > 0 and cert.radius[2] == 0
    assert torch.equal(cert.pa_lower, pa_lower(LOOSE, top_score=top_score, m=v.models, alpha=0.001,
                                               num_classes=3))


def test_toy_hard_bound_ranks_by_counts(toy_bounds, monkeypatch):
    _forbid_kernel(monkeypatch)
    v = _votes()
    sigma = torch.full((3,), 0.5)
    cert = certify_votes(v, sigma, bound=HARD_TOY, alpha=0.01, backend="kernels")
    assert cert.predict.tolist() == [1, 2, 1]  # row 1: the hard-vote leader, not the soft one
    k = torch.tensor([200.0, 120.0, 200.0], dtype=torch.float64)
    pa = (k / 200 - _width(200, 0.01 / 3)).clamp(0, 1)
    torch.testing.assert_close(cert.pa_lower, pa, rtol=0, atol=1e-15)
    torch.testing.assert_close(cert.radius, _radius(pa, sigma), rtol=1e-12, atol=1e-15)


def test_toy_bound_through_certify_models(toy_bounds, monkeypatch):
    _forbid_kernel(monkeypatch)
    m, alpha, sigma = 200, 0.001, 0.5
    x = torch.rand(4, 1, 3, 3)
    with using_backend("kernels"):
        assert use_native("radius_certify", "cpu")  # the backend would take the kernels...
        cert = certify_models([constant([0.0, 50.0], 9)] * m, x, sigma, num_classes=2, bound=LOOSE, alpha=alpha)
    pa = max(0.0, 1.0 - 2 * _width(m, alpha))  # ...but the toy bound has none: the reference ran
    assert (cert.predict == 1).all() and not cert.abstain.any()
    torch.testing.assert_close(cert.pa_lower, torch.full((4,), pa, dtype=torch.float64), rtol=0, atol=1e-9)
    expected = sigma * (stats.norm.ppf(pa) - stats.norm.ppf(1 - pa)) / 2
    torch.testing.assert_close(cert.radius, torch.full((4,), expected, dtype=torch.float64),
                               rtol=1e-9, atol=0)


def test_unknown_bound_lists_the_registered_ones(toy_bounds):
    listed = f"choose one of hoeffding, clopper-pearson, {LOOSE}, {HARD_TOY}"
    v = _votes()
    for call in (lambda: certify_votes(v, torch.ones(3), bound="wilson"),
                 lambda: certify_models([constant([0.0, 1.0], 4)], torch.rand(2, 1, 2, 2), 0.5, num_classes=2,
                                        bound="wilson"),
                 lambda: pa_lower("wilson", top_score=torch.ones(1), m=5, alpha=0.1, num_classes=2),
                 lambda: get_bound("wilson")):
        with pytest.raises(CertssbError, match=f"unknown bound 'wilson'; {listed}"):
            call()
    with pytest.raises(CertssbError, match="unknown bound"):
        RunConfig(bound="wilson").validate()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["certify", "--out", "x", "--bound", "wilson"])


@pytest.mark.parametrize("bound", ["hoeffding", "clopper-pearson"])
def test_shipped_bounds_use_the_native_kernel(monkeypatch, bound):
    calls = []
    real = votes_mod.certify_radius

    def spy(*args, **kwargs):
        calls.append(kwargs["bound"])
        return real(*args, **kwargs)

    monkeypatch.setattr(votes_mod, "certify_radius", spy)
    v = _votes()
    sigma = torch.tensor([0.25, 0.5, 1.0])
    native = certify_votes(v, sigma, bound=bound, alpha=0.001, backend="kernels")
    assert calls == [bound]
    reference = certify_votes(v, sigma, bound=bound, alpha=0.001, backend="reference")
    assert calls == [bound]  # the reference backend does not call it
    assert torch.equal(native.predict, reference.predict)
    torch.testing.assert_close(native.radius, reference.radius, rtol=1e-12, atol=1e-15)
