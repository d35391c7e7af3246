"""``mnist-cnn``: the MNIST network of RAB and the Cert-SSB paper; images of at least 16x16."""
from __future__ import annotations

import torch
from torch import nn

from .registry import register_arch


def _mnist_cnn_spatial(size: int) -> int:
    """Side length after conv5 -> pool2 -> conv5 -> pool2 (no padding, floor pooling)."""
    return ((size - 4) // 2 - 4) // 2


@register_arch("mnist-cnn", min_size=16, size_reason="two 5x5 convolutions and two 2x2 poolings",
               size_hint="use arch 'digits-cnn' for smaller images")
class MnistCNN(nn.Module):
    """RAB's MNIST net.

    Conv(Cin,16,5)-ReLU-Pool2-Conv(16,32,5)-ReLU-Pool2-Linear(flat,512)-ReLU-Linear(512,K).

    ``flat = 32 * h' * w'`` with ``h' = ((H - 4) // 2 - 4) // 2`` (4 on 28x28, so 512).
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: tuple[int, int]) -> None:
        super().__init__()
        h, w = image_size
        fh, fw = _mnist_cnn_spatial(h), _mnist_cnn_spatial(w)
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
