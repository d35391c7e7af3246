"""Classifier architectures: build the base and ensemble models by name.

Four architectures, all written here (no torchvision, no weight download):

- ``digits-cnn``: a tiny CNN for 8x8 scikit-learn digits (fast on CPU).
- ``mnist-cnn``: the MNIST network of RAB and the Cert-SSB paper.
- ``cifar-preact-resnet``: a pre-activation ResNet-32 (He et al. 2016, "Identity
  mappings in deep residual networks"), 16/32/64 channels, about 0.46M parameters.
- ``resnet18``: the standard ResNet-18 (BasicBlock, [2, 2, 2, 2]); ImageNet stem
  (7x7 stride 2 + max-pool) for inputs of at least 128 pixels, a 3x3 stride-1
  stem without max-pool for small inputs.

Every model maps float images ``x`` of shape ``[B, C, H, W]`` to logits
``[B, num_classes]``. Activations are never modified in place and ``forward``
keeps no Python-side state, so ``torch.func.functional_call`` + ``torch.vmap``
can run many stacked copies of a model at once (the ensemble trainer does).
BatchNorm layers (the two ResNets) hold running statistics as buffers: under
``vmap`` in train mode they must be handled by the caller (e.g. batch
statistics only); in eval mode they are plain inputs.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import CertssbError

ARCHS = ("digits-cnn", "mnist-cnn", "cifar-preact-resnet", "resnet18")

# Dataset name -> architecture used by the paper / RAB for it.
_DATASET_ARCH = {
    "digits": "digits-cnn",
    "mnist": "mnist-cnn",
    "cifar10": "cifar-preact-resnet",
    "imagenette": "resnet18",
}


# ---------------------------------------------------------------------------
# small CNNs


class DigitsCNN(nn.Module):
    """Small CNN for 8x8 digits.

    Conv(Cin,16,3,p1)-ReLU-Conv(16,32,3,p1)-ReLU-MaxPool2-Linear(32*(H//2)*(W//2),128)
    -ReLU-Linear(128,K). Narrow on purpose: the embedded demo trains ~80 of them on 2 cores.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: tuple[int, int]) -> None:
        super().__init__()
        h, w = image_size
        if h < 2 or w < 2:
            raise CertssbError(
                f"digits-cnn needs images of at least 2x2 pixels (it max-pools by 2), got {h}x{w}; "
                "use a larger image size or another architecture"
            )
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1),
            nn.ReLU(inplace=False),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * (h // 2) * (w // 2), 128),
            nn.ReLU(inplace=False),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, Cin, H, W] float -> logits [B, K]."""
        return self.classifier(self.features(x))


def _mnist_cnn_spatial(size: int) -> int:
    """Side length after conv5 -> pool2 -> conv5 -> pool2 (no padding, floor pooling)."""
    return ((size - 4) // 2 - 4) // 2


class MnistCNN(nn.Module):
    """RAB's MNIST net.

    Conv(Cin,16,5)-ReLU-Pool2-Conv(16,32,5)-ReLU-Pool2-Linear(flat,512)-ReLU-Linear(512,K).

    ``flat = 32 * h' * w'`` with ``h' = ((H - 4) // 2 - 4) // 2`` (4 on 28x28, so 512).
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: tuple[int, int]) -> None:
        super().__init__()
        h, w = image_size
        fh, fw = _mnist_cnn_spatial(h), _mnist_cnn_spatial(w)
        if fh < 1 or fw < 1:
            raise CertssbError(
                f"mnist-cnn needs images of at least 16x16 pixels (two 5x5 convolutions and two "
                f"2x2 poolings), got {h}x{w}; use arch 'digits-cnn' for smaller images"
            )
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 5),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * fh * fw, 512),
            nn.ReLU(inplace=False),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, Cin, H, W] float -> logits [B, K]."""
        return self.classifier(self.features(x))


# ---------------------------------------------------------------------------
# pre-activation ResNet (CIFAR)


class PreActBlock(nn.Module):
    """Pre-activation basic block: out = F(x) + shortcut, F = BN-ReLU-conv3x3-BN-ReLU-conv3x3.

    When the shape changes (stride or width), the shortcut is a 1x1 convolution
    of the pre-activated input (as in He et al.'s identity-mapping code);
    otherwise it is the identity on the raw input.
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, in_planes, H, W] -> [B, planes, ceil(H/stride), ceil(W/stride)]."""
        out = self.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + skip


class PreActResNet(nn.Module):
    """Pre-activation ResNet-(6n+2) for small images; n = 5 gives ResNet-32 (~0.46M params).

    conv3x3(Cin,16) -> 3 stages of n PreActBlocks (16, 32, 64 channels; stride 2
    at the start of stages 2 and 3) -> BN-ReLU -> global average pool -> Linear(64, K).
    """

    def __init__(self, in_channels: int, num_classes: int, blocks_per_stage: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        layers: list[nn.Module] = []
        in_planes = 16
        for stage, planes in enumerate((16, 32, 64)):
            for i in range(blocks_per_stage):
                stride = 2 if (stage > 0 and i == 0) else 1
                layers.append(PreActBlock(in_planes, planes, stride))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, Cin, H, W] float -> logits [B, K]."""
        out = self.layers(self.stem(x))
        out = self.pool(self.relu(self.bn(out)))
        return self.fc(torch.flatten(out, 1))


# ---------------------------------------------------------------------------
# ResNet-18


class BasicBlock(nn.Module):
    """ResNet basic block: ReLU(BN(conv3x3(ReLU(BN(conv3x3(x))))) + shortcut(x)).

    Shortcut: identity, or conv1x1(stride)-BN when the shape changes.
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, in_planes, H, W] -> [B, planes, ceil(H/stride), ceil(W/stride)]."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = self.shortcut(x) if self.shortcut is not None else x
        return self.relu(out + skip)


class ResNet18(nn.Module):
    """ResNet-18: stem -> 4 stages of 2 BasicBlocks (64, 128, 256, 512) -> GAP -> Linear(512, K).

    Stem: conv7x7/2-BN-ReLU-maxpool3x3/2 when ``min(H, W) >= 128`` (ImageNet
    style), else conv3x3/1-BN-ReLU without max-pool, so small images keep
    enough resolution (the usual CIFAR variant).
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: tuple[int, int]) -> None:
        super().__init__()
        if min(image_size) >= 128:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(inplace=False),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(inplace=False),
            )
        layers: list[nn.Module] = []
        in_planes = 64
        for stage, planes in enumerate((64, 128, 256, 512)):
            for i in range(2):
                stride = 2 if (stage > 0 and i == 0) else 1
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, Cin, H, W] float -> logits [B, K]."""
        out = self.pool(self.layers(self.stem(x)))
        return self.fc(torch.flatten(out, 1))


# ---------------------------------------------------------------------------
# public API


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    try:
        h, w = image_size  # type: ignore[misc]
    except (TypeError, ValueError):
        raise CertssbError(
            f"image_size must be a pair (H, W) of positive integers, got {image_size!r}"
        ) from None
    if not (_positive_int(h) and _positive_int(w)):
        raise CertssbError(
            f"image_size must be a pair (H, W) of positive integers, got {image_size!r}"
        )
    return int(h), int(w)


def build_model(
    arch: str, in_channels: int, num_classes: int, image_size: tuple[int, int]
) -> nn.Module:
    """Build a freshly initialized classifier (PyTorch default init; seed with ``torch.manual_seed``).

    Args:
        arch: one of ``ARCHS``.
        in_channels: image channels C (>= 1).
        num_classes: number of classes K (>= 2).
        image_size: (H, W) of the inputs; sizes the linear layers of the CNNs
            and picks the ResNet-18 stem.

    Returns:
        an ``nn.Module`` mapping float ``[B, C, H, W]`` to logits ``[B, K]``.

    Raises:
        CertssbError: unknown arch, bad sizes, or an image too small for the arch.
    """
    if not _positive_int(in_channels):
        raise CertssbError(f"in_channels must be a positive integer, got {in_channels!r}")
    if not (isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes >= 2):
        raise CertssbError(
            f"num_classes must be an integer >= 2 (a classifier needs two classes), got {num_classes!r}"
        )
    size = _check_image_size(image_size)
    if arch == "digits-cnn":
        return DigitsCNN(in_channels, num_classes, size)
    if arch == "mnist-cnn":
        return MnistCNN(in_channels, num_classes, size)
    if arch == "cifar-preact-resnet":
        return PreActResNet(in_channels, num_classes)
    if arch == "resnet18":
        return ResNet18(in_channels, num_classes, size)
    raise CertssbError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHS)}")


def default_arch(dataset: str, image_shape: tuple[int, int, int]) -> str:
    """The architecture used for a dataset when none is given.

    digits -> digits-cnn, mnist -> mnist-cnn, cifar10 -> cifar-preact-resnet,
    imagenette -> resnet18. Any other dataset (folder, numpy) by image shape
    (C, H, W): H, W <= 16 -> digits-cnn; one channel and H, W <= 32 ->
    mnist-cnn (digits-cnn if min(H, W) < 16, which mnist-cnn cannot take);
    H, W <= 64 -> cifar-preact-resnet; else resnet18.
    """
    key = str(dataset).lower()
    if key in _DATASET_ARCH:
        return _DATASET_ARCH[key]
    try:
        c, h, w = image_shape
    except (TypeError, ValueError):
        raise CertssbError(
            f"image_shape must be (C, H, W) of positive integers, got {image_shape!r}"
        ) from None
    if not all(_positive_int(v) for v in (c, h, w)):
        raise CertssbError(f"image_shape must be (C, H, W) of positive integers, got {image_shape!r}")
    side = max(h, w)
    if side <= 16:
        return "digits-cnn"
    if c == 1 and side <= 32:
        return "mnist-cnn" if min(h, w) >= 16 else "digits-cnn"
    if side <= 64:
        return "cifar-preact-resnet"
    return "resnet18"


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameter elements (``requires_grad``) of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
