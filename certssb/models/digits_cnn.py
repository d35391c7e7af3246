"""``digits-cnn``: a tiny CNN for 8x8 scikit-learn digits (fast on CPU); images of at least 2x2."""
from __future__ import annotations

import torch
from torch import nn

from .registry import register_arch


@register_arch("digits-cnn", min_size=2, size_reason="it max-pools by 2")
class DigitsCNN(nn.Module):
    """Small CNN for 8x8 digits.

    Conv(Cin,16,3,p1)-ReLU-Conv(16,32,3,p1)-ReLU-MaxPool2-Linear(32*(H//2)*(W//2),128)
    -ReLU-Linear(128,K). Narrow on purpose: the embedded demo trains ~80 of them on 2 cores.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: tuple[int, int]) -> None:
        super().__init__()
        h, w = image_size
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
