"""Certification: vote accumulation, bounds -> radii, modes, user-facing certify_models."""
import math

import pytest
import torch
from scipy import stats
from torch import nn

from certssb.certify.votes import Votes, certify_models, certify_votes, collect_votes
from certssb.errors import CertssbError
from certssb.smoothing.noise import Stream, noisy_copies


class Fixed(nn.Module):
    """Always the same logits, whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits, dtype=torch.float32))

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


class PixelSign(nn.Module):
    """Class 1 when the first pixel is positive: a model whose vote depends on the noise."""

    def forward(self, x):
        v = x.flatten(1)[:, :1]
        return torch.cat([-v, v], dim=1) * 10


def test_votes_accumulate_soft_and_hard():
    v = Votes.zeros(2, 3)
    logits = torch.tensor([[[0.0, 1.0, 0.0], [3.0, 0.0, 0.0]],
                           [[0.0, 0.0, 2.0], [3.0, 0.0, 0.0]]])
    v.add_logits(logits)
    assert v.models == 2
    assert torch.equal(v.hard_count, torch.tensor([[0, 1, 1], [2, 0, 0]]))
    assert torch.allclose(v.soft_sum, torch.softmax(logits.double(), -1).sum(0))
    with pytest.raises(CertssbError, match="logits must have shape"):
        v.add_logits(torch.zeros(1, 3, 3))


def test_unanimous_ensemble_radius_matches_closed_form():
    m, alpha, sigma = 100, 0.001, 0.5
    x = torch.rand(4, 1, 3, 3)
    cert = certify_models([Fixed([0.0, 50.0])] * m, x, sigma, num_classes=2, bound="clopper-pearson",
                          alpha=alpha)
    pa = (alpha / 2) ** (1 / m)  # Clopper-Pearson with all votes, Bonferroni over 2 classes
    assert torch.allclose(cert.pa_lower, torch.full((4,), pa, dtype=torch.float64))
    assert torch.allclose(cert.radius, torch.full((4,), sigma * stats.norm.ppf(pa), dtype=torch.float64))
    assert (cert.predict == 1).all() and not cert.abstain.any()
    cert_h = certify_models([Fixed([0.0, 50.0])] * m, x, sigma, num_classes=2, bound="hoeffding", alpha=alpha)
    pa_h = 1 - math.sqrt(math.log(1 / alpha) / (2 * m))
    assert torch.allclose(cert_h.pa_lower, torch.full((4,), pa_h, dtype=torch.float64), atol=1e-6)
    # Clopper-Pearson's ceiling is higher at equal M
    assert (cert.radius > cert_h.radius).all()


def test_split_ensemble_abstains():
    x = torch.rand(3, 1, 2, 2)
    models = [Fixed([0.0, 5.0])] * 10 + [Fixed([5.0, 0.0])] * 10
    cert = certify_models(models, x, 0.25, num_classes=2, bound="clopper-pearson", alpha=0.01)
    assert cert.abstain.all() and (cert.radius == 0).all()


def test_model_k_sees_its_own_test_noise():
    x = torch.zeros(5, 1, 2, 2)
    sigma = torch.full((5,), 1.0)
    votes = collect_votes([PixelSign() for _ in range(6)], x, sigma, seed=3, num_classes=2)
    eps = noisy_copies(x, sigma, seed=3, stream=int(Stream.TEST), models=range(6), ids=None)
    expect = (eps[:, :, 0, 0, 0] > 0).long().sum(0)  # votes for class 1
    assert torch.equal(votes.hard_count[:, 1], expect)
    # (k, model) pairs pick the noise index
    votes2 = collect_votes([(k, PixelSign()) for k in range(6)], x, sigma, seed=3, num_classes=2)
    assert torch.equal(votes.hard_count, votes2.hard_count)


def test_paper_mode_conservative_radius():
    x = torch.rand(2, 1, 2, 2)
    sigma = torch.tensor([0.5, 0.2])
    cert = certify_models([Fixed([0.0, 50.0])] * 50, x, sigma, num_classes=2, mode="paper",
                          sigma_train_min=0.3, bound="clopper-pearson")
    rho = torch.tensor(stats.norm.ppf(cert.pa_lower.numpy()))
    assert torch.allclose(cert.radius, rho * sigma.double())
    assert torch.allclose(cert.radius_conservative, rho * torch.tensor([0.3, 0.2], dtype=torch.float64))


def test_errors():
    x = torch.rand(2, 1, 2, 2)
    with pytest.raises(CertssbError, match="unknown bound"):
        certify_models([Fixed([0.0, 1.0])], x, 0.25, num_classes=2, bound="wilson")
    with pytest.raises(CertssbError, match="NaN"):
        certify_models([Fixed([0.0, 1.0])], x * float("nan"), 0.25, num_classes=2)
    with pytest.raises(CertssbError, match="sigma"):
        certify_models([Fixed([0.0, 1.0])], x, 0.0, num_classes=2)
    with pytest.raises(CertssbError, match="at least one model"):
        certify_models([], x, 0.25, num_classes=2)
    with pytest.raises(CertssbError, match="outputs 3 classes"):
        certify_models([Fixed([0.0, 1.0, 2.0])], x, 0.25, num_classes=2)
    with pytest.raises(CertssbError, match="paper mode"):
        certify_votes(collect_votes([Fixed([0.0, 1.0])], x, torch.full((2,), 0.3), seed=0, num_classes=2),
                      torch.full((2,), 0.3), mode="paper")
