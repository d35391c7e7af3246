"""Per-sample sigma search: gradient ascent through the model, clamps, purity."""
import pytest
import torch
from torch import nn

from certssb.errors import CertssbError
from certssb.smoothing.noise import sample_ids
from certssb.smoothing.sigma import SigmaSearch, optimize_sigma, sigma_stats


class Margin(nn.Module):
    """Logits (s * x_mean, -s * x_mean): confident far from 0, so noise hurts near 0."""

    def __init__(self, scale=4.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, x):
        m = x.flatten(1).mean(1, keepdim=True) - 0.5
        return torch.cat([m, -m], 1) * self.scale * 10


def test_confident_model_pushes_sigma_up_to_the_clamp():
    # the clamped proxy's gradient in sigma is PhiInv(0.98) - PhiInv(0.02) > 0 for a confident model
    x = torch.zeros(5, 1, 4, 4)  # far from the decision boundary
    s = SigmaSearch(sigma0=0.25, steps=20, draws=4, lr=0.05, sigma_min=0.125, sigma_max=0.5)
    sigma = optimize_sigma(Margin(), x, sample_ids("train", 5), s, seed=0)
    assert torch.allclose(sigma, torch.full((5,), 0.5))


def test_boundary_samples_get_lower_sigma_than_confident_ones():
    x = torch.cat([torch.zeros(4, 1, 4, 4), torch.full((4, 1, 4, 4), 0.47)])
    s = SigmaSearch(sigma0=0.25, steps=15, draws=16, lr=0.05, sigma_min=0.05, sigma_max=1.0)
    sigma = optimize_sigma(Margin(), x, sample_ids("train", 8), s, seed=3)
    assert sigma[:4].min() > sigma[4:].max()
    assert (sigma >= 0.05).all() and (sigma <= 1.0).all()


def test_same_result_whatever_the_batch_size_and_grads_are_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x = torch.rand(7, 1, 4, 4)
    ids = sample_ids("clean", 7)
    s = SigmaSearch(sigma0=0.3, steps=3, draws=5, lr=0.1, sigma_min=0.1, sigma_max=0.9)
    a = optimize_sigma(model, x, ids, s, seed=11, batch_size=7)
    b = optimize_sigma(model, x, ids, s, seed=11, batch_size=2)
    assert torch.allclose(a, b, atol=1e-6)
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    c = optimize_sigma(model, x, ids, s, seed=12, batch_size=7)
    assert not torch.allclose(a, c)


def test_zero_steps_keeps_sigma0():
    s = SigmaSearch(sigma0=0.3, steps=0, draws=1, lr=0.1, sigma_min=0.1, sigma_max=0.9)
    out = optimize_sigma(Margin(), torch.rand(3, 1, 2, 2), sample_ids("train", 3), s, seed=0)
    assert torch.equal(out, torch.full((3,), 0.3))


def test_validation_and_stats():
    with pytest.raises(CertssbError, match="sigma_min <= sigma0 <= sigma_max"):
        SigmaSearch(sigma0=0.3, sigma_min=0.4, sigma_max=0.9).validate()
    with pytest.raises(CertssbError, match="sigma-draws"):
        SigmaSearch(sigma0=0.3, draws=0, sigma_min=0.1, sigma_max=0.9).validate()
    with pytest.raises(CertssbError, match="clamp"):
        SigmaSearch(sigma0=0.3, sigma_min=0.1, sigma_max=0.9, prob_clamp=(0.6, 0.9)).validate()
    st = sigma_stats(torch.tensor([0.1, 0.2, 0.4]))
    assert st["min"] == pytest.approx(0.1) and st["median"] == pytest.approx(0.2) and st["max"] == pytest.approx(0.4)
    assert sigma_stats(torch.empty(0))["min"] is None
