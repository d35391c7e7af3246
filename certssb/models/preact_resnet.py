"""``cifar-preact-resnet``: a pre-activation ResNet-32 for small images.

He et al. 2016, "Identity mappings in deep residual networks": 16/32/64 channels,
about 0.46M parameters; any image size (global average pooling).
"""
from __future__ import annotations

import torch
from torch import nn

from .registry import register_arch


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


@register_arch("cifar-preact-resnet")
def build_preact_resnet32(in_channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    """PreActResNet-32 (5 blocks per stage); ``image_size`` is not needed."""
    return PreActResNet(in_channels, num_classes)
