"""``resnet18``: the standard ResNet-18 (BasicBlock, [2, 2, 2, 2]).

ImageNet stem (7x7 stride 2 + max-pool) for inputs of at least 128 pixels, a 3x3
stride-1 stem without max-pool for small inputs.
"""
from __future__ import annotations

import torch
from torch import nn

from .registry import register_arch


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


@register_arch("resnet18")
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
