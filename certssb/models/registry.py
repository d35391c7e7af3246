"""The architecture registry: build the base and ensemble models by name.

An architecture is a constructor ``build(in_channels, num_classes, image_size)``
-> ``nn.Module`` registered with `register_arch` together with the smallest image
side it accepts (``min_size``). Adding one takes a new module in this package plus
one import line in ``certssb/models/__init__.py``; `ARCHS`, ``--arch`` and
`RunConfig` validation then know it, and tests/test_arch_registry.py checks that
it runs grouped (`certssb.models.grouped.GroupedModel`) with the plain outputs.

Every model maps float images ``x`` of shape ``[B, C, H, W]`` to logits
``[B, num_classes]``. Activations are never modified in place and ``forward``
keeps no Python-side state, so ``torch.func.functional_call`` + ``torch.vmap``
can run many stacked copies of a model at once. Layers with parameters must be
``nn.Conv2d`` (zero padding), ``nn.BatchNorm2d`` or ``nn.Linear`` (what
`GroupedModel` groups); BatchNorm running statistics are buffers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from torch import nn

from ..data.registry import dataset_names, get_dataset
from ..core.registry import Registry
from ..errors import CertssbError

Builder = Callable[[int, int, "tuple[int, int]"], nn.Module]


@dataclass(frozen=True)
class ArchSpec:
    """A registered architecture.

    build(in_channels, num_classes, (H, W)) -> a fresh model; min_size: the
    smallest H and W it accepts; size_reason / size_hint: why, and what to do
    instead (they complete the error for smaller images).
    """

    name: str
    build: Builder
    min_size: int = 1
    size_reason: str = ""
    size_hint: str = "use a larger image size or another architecture"

    def check_size(self, size: tuple[int, int]) -> None:
        h, w = size
        if min(h, w) < self.min_size:
            why = f" ({self.size_reason})" if self.size_reason else ""
            raise CertssbError(f"{self.name} needs images of at least {self.min_size}x{self.min_size} pixels"
                               f"{why}, got {h}x{w}; {self.size_hint}")


_ARCHS: Registry[ArchSpec] = Registry("architecture")

# Dataset name -> architecture used by the paper / RAB for it (`default_arch`).
def register_arch(name: str, build: Optional[Builder] = None, *, min_size: int = 1, size_reason: str = "",
                  size_hint: str = "use a larger image size or another architecture"):
    """Register an architecture; with ``build`` left out, a decorator (on a function or an nn.Module class).

    Example (a new file ``certssb/models/mynet.py``, then ``from . import mynet`` in
    ``certssb/models/__init__.py``)::

        @register_arch("mynet", min_size=4, size_reason="it pools by 4")
        class MyNet(nn.Module):
            def __init__(self, in_channels, num_classes, image_size): ...
    """
    def decorate(fn: Builder) -> Builder:
        if not (isinstance(min_size, int) and min_size >= 1):
            raise CertssbError(f"min_size of architecture {name!r} must be an integer >= 1, got {min_size!r}")
        _ARCHS.add(name, ArchSpec(name, fn, min_size, size_reason, size_hint))
        return fn
    return decorate if build is None else decorate(build)


unregister_arch = _ARCHS.remove
arch_names = _ARCHS.names
get_arch = _ARCHS.get


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
        arch: one of ``ARCHS`` (the registered architectures).
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
    spec = get_arch(arch)
    spec.check_size(size)
    return spec.build(in_channels, num_classes, size)


def default_arch(dataset: str, image_shape: tuple[int, int, int]) -> str:
    """The architecture used for a dataset when none is given.

    The dataset's own `default_arch` in the dataset registry (digits -> digits-cnn,
    mnist -> mnist-cnn, cifar10 -> cifar-preact-resnet, imagenette -> resnet18). Any
    other dataset (folder, numpy, or a name not registered) by image shape (C, H, W):
    H, W <= 16 -> digits-cnn; one channel and H, W <= 32 -> mnist-cnn (digits-cnn if
    min(H, W) < 16, which mnist-cnn cannot take); H, W <= 64 -> cifar-preact-resnet;
    else resnet18.
    """
    if str(dataset).lower() in dataset_names():
        declared = get_dataset(str(dataset).lower()).default_arch
        if declared is not None:
            return declared
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


__all__ = ["ArchSpec", "register_arch", "unregister_arch", "arch_names", "get_arch", "build_model",
           "default_arch", "count_parameters"]
