"""Tests for certssb.models: shapes, parameter counts, trainability, vmap, errors."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, stack_module_state

from certssb.errors import CertssbError
from certssb.models import ARCHS, build_model, count_parameters, default_arch


@pytest.mark.parametrize(
    "arch,shape,classes",
    [
        ("digits-cnn", (1, 8, 8), 2),
        ("digits-cnn", (1, 8, 8), 10),
        ("digits-cnn", (3, 9, 7), 3),  # odd sizes: floor pooling
        ("mnist-cnn", (1, 28, 28), 2),
        ("mnist-cnn", (1, 28, 28), 10),
        ("mnist-cnn", (3, 32, 32), 7),
        ("cifar-preact-resnet", (3, 32, 32), 2),
        ("cifar-preact-resnet", (3, 32, 32), 10),
        ("cifar-preact-resnet", (1, 28, 28), 5),
        ("cifar-preact-resnet", (3, 64, 64), 3),
        ("resnet18", (3, 32, 32), 2),
        ("resnet18", (3, 64, 64), 10),
        ("resnet18", (1, 8, 8), 4),
    ],
)
def test_output_shapes(arch: str, shape: tuple[int, int, int], classes: int) -> None:
    torch.manual_seed(0)
    c, h, w = shape
    model = build_model(arch, c, classes, (h, w))
    out = model(torch.rand(2, c, h, w))
    assert out.shape == (2, classes)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_resnet18_imagenet_forward() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 3, 10, (224, 224)).eval()
    # the 7x7/2 stem with max-pool is used for large inputs
    assert isinstance(model.stem[0], nn.Conv2d) and model.stem[0].kernel_size == (7, 7)
    assert isinstance(model.stem[-1], nn.MaxPool2d)
    with torch.no_grad():
        out = model(torch.rand(1, 3, 224, 224))
    assert out.shape == (1, 10)


def test_resnet18_small_stem() -> None:
    model = build_model("resnet18", 3, 10, (64, 64))
    assert model.stem[0].kernel_size == (3, 3) and model.stem[0].stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())


def test_parameter_counts() -> None:
    # mnist-cnn on 28x28, 10 classes: conv 1*16*25+16, conv 16*32*25+32, fc 512*512+512, fc 512*10+10
    expected_mnist = (16 * 25 + 16) + (16 * 32 * 25 + 32) + (512 * 512 + 512) + (512 * 10 + 10)
    assert count_parameters(build_model("mnist-cnn", 1, 10, (28, 28))) == expected_mnist
    # digits-cnn on 8x8x1, 10 classes
    expected_digits = (9 * 16 + 16) + (16 * 32 * 9 + 32) + (32 * 16 * 128 + 128) + (128 * 10 + 10)
    assert count_parameters(build_model("digits-cnn", 1, 10, (8, 8))) == expected_digits
    preact = count_parameters(build_model("cifar-preact-resnet", 3, 10, (32, 32)))
    assert 0.44e6 < preact < 0.48e6
    # torchvision's resnet18 with 1000 classes has exactly 11,689,512 parameters
    assert count_parameters(build_model("resnet18", 3, 1000, (224, 224))) == 11_689_512
    small = count_parameters(build_model("resnet18", 3, 10, (32, 32)))
    assert 11.1e6 < small < 11.3e6


def test_count_parameters_only_trainable() -> None:
    model = build_model("digits-cnn", 1, 2, (8, 8))
    total = count_parameters(model)
    for p in model.classifier.parameters():
        p.requires_grad_(False)
    frozen = sum(p.numel() for p in model.classifier.parameters())
    assert count_parameters(model) == total - frozen


def test_preact_structure() -> None:
    model = build_model("cifar-preact-resnet", 3, 10, (32, 32))
    assert model.stem.out_channels == 16 and model.stem.kernel_size == (3, 3)
    assert len(model.layers) == 15
    projections = [b for b in model.layers if b.shortcut is not None]
    # only the first blocks of stages 2 and 3 change shape
    assert len(projections) == 2
    assert all(b.shortcut.kernel_size == (1, 1) and b.shortcut.stride == (2, 2) for b in projections)
    assert model.fc.in_features == 64


@pytest.mark.parametrize(
    "arch,shape",
    [("digits-cnn", (1, 8, 8)), ("mnist-cnn", (1, 28, 28)), ("cifar-preact-resnet", (3, 16, 16))],
)
def test_sgd_reduces_loss(arch: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    c, h, w = shape
    model = build_model(arch, c, 3, (h, w))
    x = torch.rand(12, c, h, w)
    y = torch.arange(12) % 3
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    with torch.no_grad():
        first = loss_fn(model(x), y).item()
    for _ in range(80):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = loss_fn(model(x), y).item()
    assert last < 0.5 * first


@pytest.mark.parametrize("arch,shape", [("mnist-cnn", (1, 28, 28)), ("digits-cnn", (1, 8, 8))])
def test_vmap_functional_call_matches_loop(arch: str, shape: tuple[int, int, int]) -> None:
    c, h, w = shape
    torch.manual_seed(1)
    models = [build_model(arch, c, 4, (h, w)).eval() for _ in range(2)]
    # the two copies really differ
    assert not torch.equal(next(models[0].parameters()), next(models[1].parameters()))
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.rand(2, 5, c, h, w)  # one batch per model

    def run(p: dict, b: dict, xb: torch.Tensor) -> torch.Tensor:
        return functional_call(base, (p, b), (xb,))

    with torch.no_grad():
        out = torch.vmap(run)(params, buffers, x)
        ref = torch.stack([m(x[i]) for i, m in enumerate(models)])
    assert out.shape == (2, 5, 4)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_no_inplace_relu() -> None:
    for arch in ARCHS:
        model = build_model(arch, 3, 2, (32, 32))
        for m in model.modules():
            if isinstance(m, nn.ReLU):
                assert m.inplace is False


def test_default_arch() -> None:
    assert default_arch("digits", (1, 8, 8)) == "digits-cnn"
    assert default_arch("mnist", (1, 28, 28)) == "mnist-cnn"
    assert default_arch("cifar10", (3, 32, 32)) == "cifar-preact-resnet"
    assert default_arch("imagenette", (3, 224, 224)) == "resnet18"
    assert default_arch("imagenette", (3, 64, 64)) == "resnet18"
    assert default_arch("MNIST", (1, 28, 28)) == "mnist-cnn"
    assert default_arch("folder", (3, 16, 16)) == "digits-cnn"
    assert default_arch("numpy", (1, 12, 10)) == "digits-cnn"
    assert default_arch("numpy", (1, 28, 28)) == "mnist-cnn"
    assert default_arch("numpy", (1, 8, 30)) == "digits-cnn"  # too thin for mnist-cnn
    assert default_arch("folder", (3, 32, 32)) == "cifar-preact-resnet"
    assert default_arch("folder", (1, 64, 64)) == "cifar-preact-resnet"
    assert default_arch("folder", (3, 65, 64)) == "resnet18"
    assert default_arch("folder", (3, 128, 128)) == "resnet18"
    # every default can be built and run on its shape
    for shape in [(1, 12, 10), (1, 8, 30), (1, 20, 20), (3, 40, 24)]:
        c, h, w = shape
        model = build_model(default_arch("numpy", shape), c, 2, (h, w))
        assert model(torch.rand(1, c, h, w)).shape == (1, 2)


def test_errors() -> None:
    with pytest.raises(CertssbError, match="unknown architecture 'vgg'.*digits-cnn, mnist-cnn"):
        build_model("vgg", 3, 10, (32, 32))
    with pytest.raises(CertssbError, match="at least 16x16.*digits-cnn"):
        build_model("mnist-cnn", 1, 10, (8, 8))
    with pytest.raises(CertssbError, match="at least 16x16"):
        build_model("mnist-cnn", 1, 10, (28, 15))
    build_model("mnist-cnn", 1, 10, (16, 16))  # smallest size that works
    with pytest.raises(CertssbError, match="at least 2x2"):
        build_model("digits-cnn", 1, 10, (1, 8))
    with pytest.raises(CertssbError, match="num_classes must be an integer >= 2"):
        build_model("digits-cnn", 1, 1, (8, 8))
    with pytest.raises(CertssbError, match="in_channels must be a positive integer"):
        build_model("digits-cnn", 0, 2, (8, 8))
    with pytest.raises(CertssbError, match=r"image_size must be a pair \(H, W\)"):
        build_model("digits-cnn", 1, 2, (8,))
    with pytest.raises(CertssbError, match=r"image_size must be a pair \(H, W\)"):
        build_model("resnet18", 1, 2, (8, 0))
    with pytest.raises(CertssbError, match=r"image_shape must be \(C, H, W\)"):
        default_arch("folder", (28, 28))
    with pytest.raises(CertssbError, match=r"image_shape must be \(C, H, W\)"):
        default_arch("numpy", (1, -3, 28))
