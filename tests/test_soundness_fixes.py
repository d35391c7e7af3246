"""Numbers no theorem supports, each fixed: the conservative radius after an `align`, the poison
budget of image-dependent triggers, and sigma in two precisions (docs/THEORY.md sections 4.3.1,
6 and 9). The 53-bit Box-Muller draws are tested in tests/test_noise.py."""
import math

import pytest
import torch

from certssb.attacks import input_trigger_norms, make_trigger
from certssb.certify.bounds import poison_budget
from certssb.certify.regions import RegionStore
from certssb.certify.votes import certify_votes, collect_votes
from certssb.report.metrics import split_metrics


def test_the_conservative_curve_ignores_an_align_that_enlarges_the_radius():
    """Ball at (0, 0): label 0, R 1, conservative R 0.2. Query (0.5, 0): label 1, R 0.3,
    conservative 0.3; the update aligns it to label 0 with R = 1 - 0.5 = 0.5. No certificate
    supports label 0 at (0.5, 0) beyond the conservative radius of the first ball minus 0.5 (< 0),
    so at r = 0.25 only the first input's conservative certificate (0.2) could count, and it is
    below 0.25: the conservative certified accuracy is 0 (it was 0.5 when the aligned row borrowed
    min(conservative, updated radius))."""
    store = RegionStore(dim=2, backend="reference")
    x = torch.tensor([[0.0, 0.0], [0.5, 0.0]])
    labels, radii, kinds = store.certify_stream(x, torch.tensor([0, 1]), torch.tensor([1.0, 0.3], dtype=torch.float64),
                                                torch.tensor([False, False]), progress=False)
    assert kinds == ["none", "align"] and labels.tolist() == [0, 0] and radii.tolist() == pytest.approx([1.0, 0.5])
    rows = {"label": torch.tensor([0, 0]), "predict_raw": torch.tensor([0, 1]), "radius_raw": torch.tensor([1.0, 0.3]),
            "predict": labels, "radius": radii, "abstain": torch.tensor([False, False]),
            "radius_conservative": torch.tensor([0.2, 0.3], dtype=torch.float64)}
    with_update = split_metrics(rows, [0.0, 0.1, 0.25], triggered=False, use_update=True, conservative=True)
    assert with_update["certified_accuracy"]["0.25"] == 1.0  # the paper's numbers keep the update
    assert with_update["certified_accuracy_conservative"] == {"0.0": 0.5, "0.1": 0.5, "0.25": 0.0}
    without = split_metrics(rows, [0.0, 0.1, 0.25], triggered=False, use_update=False, conservative=True)
    assert with_update["certified_accuracy_conservative"] == without["certified_accuracy_conservative"]


def test_the_poison_budget_uses_each_test_inputs_own_trigger_norm():
    """r poisons of norm <= delta plus a test trigger of norm t: covered while r delta^2 + t^2 < R^2."""
    radius = torch.tensor([0.5, 1.5, 3.0, 3.0, 10.0], dtype=torch.float64)
    t = torch.tensor([0.2, 1.0, 2.0, 3.0, 0.0], dtype=torch.float64)
    got = poison_budget(radius, 1.0, t)
    want = []
    for rad, tn in zip(radius.tolist(), t.tolist()):
        r = -1
        while math.sqrt((r + 1) * 1.0 + tn * tn) < rad:
            r += 1
        want.append(r)
    assert got.tolist() == want == [0, 1, 4, -1, 99]
    # without test norms: the nominal norm of an additive trigger, as before
    assert poison_budget(radius, 1.0).tolist() == poison_budget(radius, 1.0, torch.ones(5, dtype=torch.float64)).tolist()
    with pytest.raises(Exception, match="test_norm"):
        poison_budget(radius, 1.0, torch.ones(3, dtype=torch.float64))


def test_a_patch_trigger_norm_depends_on_the_image():
    """BadNets: a test image can carry a larger trigger than any poisoned training image, so its
    budget must use its own norm; additive triggers keep their nominal norm (None)."""
    g = torch.Generator().manual_seed(0)
    dark, bright = torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8)
    x = torch.cat([dark, bright, torch.rand(2, 1, 8, 8, generator=g)])
    badnets = make_trigger("badnets", 1.0, (1, 8, 8), seed=0)
    norms = input_trigger_norms(badnets, x)
    assert norms.shape == (4,) and norms.dtype == torch.float64
    assert len(set(norms.tolist())) > 1  # image-dependent
    assert torch.allclose(norms, (badnets.apply(x) - x).double().flatten(1).norm(dim=1))
    assert input_trigger_norms(make_trigger("onepixel", 1.0, (1, 8, 8)), x) is None


def test_certificates_use_the_sigma_the_noise_was_scaled_with():
    """collect_votes scales the noise by sigma cast to the inputs' dtype (float32); a float64 sigma
    that float32 rounds must be certified in its rounded value, not in float64."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    x = torch.rand(3, 1, 2, 2)
    sigma = torch.tensor([0.1 + 1e-9, 0.3 + 3e-9, 0.25], dtype=torch.float64)
    assert not torch.equal(sigma.float().double(), sigma)  # the case: two precisions differ
    votes = collect_votes([model], x, sigma, seed=0, num_classes=2)
    cert = certify_votes(votes, sigma, bound="clopper-pearson", alpha=0.5)
    assert torch.equal(cert.sigma, sigma.float().double())
    x64 = x.double()
    votes64 = collect_votes([model.double()], x64, sigma, seed=0, num_classes=2)
    assert torch.equal(certify_votes(votes64, sigma, bound="clopper-pearson", alpha=0.5).sigma, sigma)
