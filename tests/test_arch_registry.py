"""The architecture registry: every registered architecture runs grouped; a new one plugs in by registering."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from certssb.errors import CertssbError
from certssb.models import GroupedModel, arch_names, build_model, get_arch, register_arch, unregister_arch
from certssb.runner.config import RunConfig

EPS64 = torch.finfo(torch.float64).eps


def _tolerance(model: nn.Module, out: torch.Tensor) -> float:
    """Worst-case rounding gap between two float64 evaluations that sum in different orders.

    A dot product of n terms summed in any order is within gamma_n ~ n * eps of the exact one
    (relative to the sum of |terms|); grouped kernels reorder the sums of every Conv2d / Linear /
    BatchNorm layer, so the gaps add up over the layers: L layers of fan-in at most n give about
    L * n * eps, relative to the activations' scale (here the logits' largest magnitude, at least 1).
    """
    fan_ins = [m.weight[0].numel() if isinstance(m, (nn.Conv2d, nn.Linear)) else 1
               for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))]
    scale = max(1.0, float(out.abs().max()))
    return len(fan_ins) * max(fan_ins) * EPS64 * scale


def _check_grouped_matches_plain(arch: str, channels: int = 3, classes: int = 3, models: int = 2) -> None:
    side = max(get_arch(arch).min_size, 8)
    torch.manual_seed(0)
    plain = [build_model(arch, channels, classes, (side, side)).double() for _ in range(models)]
    x = torch.rand(models, 4, channels, side, side, dtype=torch.float64)
    group = GroupedModel(plain)
    for train in (True, False):  # batch statistics, then the (copied) running statistics
        group.train(train)
        for m in plain:
            m.train(train)
        with torch.no_grad():
            want = torch.stack([m(x[k]) for k, m in enumerate(plain)])
            got = group(x)
        assert got.dtype == torch.float64 and got.shape == (models, 4, classes)
        tol = _tolerance(plain[0], want)
        assert (got - want).abs().max().item() <= tol, (arch, train, (got - want).abs().max().item(), tol)


@pytest.mark.parametrize("arch", arch_names())
def test_every_registered_arch_runs_grouped(arch: str) -> None:
    # parametrized over the registry: a newly registered architecture is checked here automatically
    _check_grouped_matches_plain(arch)


class _Toy(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, image_size: tuple[int, int]) -> None:
        super().__init__()
        h, w = image_size
        self.conv = nn.Conv2d(in_channels, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * (h - 2) * (w - 2), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


@pytest.fixture
def toy_arch():
    register_arch("toy-net", min_size=3, size_reason="one 3x3 convolution without padding")(_Toy)
    try:
        yield "toy-net"
    finally:
        unregister_arch("toy-net")
    assert "toy-net" not in arch_names()


def test_registered_toy_arch_is_buildable_and_accepted(toy_arch: str) -> None:
    assert toy_arch in arch_names()
    model = build_model(toy_arch, 1, 2, (5, 6))
    assert isinstance(model, _Toy) and model(torch.rand(3, 1, 5, 6)).shape == (3, 2)
    cfg = RunConfig(arch=toy_arch).resolve()
    assert cfg.arch == toy_arch
    with pytest.raises(CertssbError, match=r"toy-net needs images of at least 3x3 pixels \(one 3x3 "
                                           r"convolution without padding\), got 2x6"):
        build_model(toy_arch, 1, 2, (2, 6))
    with pytest.raises(CertssbError, match="already registered"):
        register_arch(toy_arch, _Toy)
    _check_grouped_matches_plain(toy_arch)


def test_unknown_arch_lists_the_registered_ones() -> None:
    with pytest.raises(CertssbError, match="unknown architecture 'nope'; choose one of digits-cnn, mnist-cnn"):
        build_model("nope", 1, 2, (8, 8))
    with pytest.raises(CertssbError, match="unknown architecture 'nope'"):
        RunConfig(arch="nope").resolve()
