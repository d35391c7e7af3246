"""Pretrained initialisation (``--init-weights FILE``): every model of a run starts from a ResNet-18 checkpoint.

The file is read without running any code from it (`certssb.smoothing.ensemble.load_user_weights`:
safetensors, or a torch state dict through ``torch.load(weights_only=True)``). Two key layouts are
accepted: torchvision's ``resnet18().state_dict()`` (mapped by `torchvision_key`) and certssb's own
(``certssb.models.build_model("resnet18", ...)``). The classifier head (torchvision's ``fc``: 1000
ImageNet classes) is never taken from the file: each model keeps the head of its own seeded
initialisation (`EnsembleSpec.new_model` seeds every model k differently), so the models of an
ensemble start from the same backbone and differ in their heads, then in their training noise.

Key map (torchvision -> certssb ``resnet18``), for every parameter and BatchNorm buffer
(weight, bias, running_mean, running_var, num_batches_tracked):

    conv1.*                      -> stem.0.*
    bn1.*                        -> stem.1.*
    layer{s}.{i}.conv1/bn1/conv2/bn2.*  -> layers.{2 (s - 1) + i}.conv1/bn1/conv2/bn2.*   (s = 1..4, i = 0, 1)
    layer{s}.0.downsample.0.*    -> layers.{2 (s - 1)}.shortcut.0.*                       (s = 2..4)
    layer{s}.0.downsample.1.*    -> layers.{2 (s - 1)}.shortcut.1.*
    fc.*                         -> (dropped: the task's head is the model's own)

The pretrained stem is torchvision's ImageNet stem (conv 7x7 stride 2, max-pool), which certssb's
``resnet18`` builds for images of at least 128 x 128 pixels (`PRETRAINED_MIN_SIZE`); smaller images
get the 3 x 3 CIFAR stem, which a pretrained checkpoint does not fit, so they are refused with a
message (use --image-size 128 or more; ImageNette's default is 224). Inputs must have 3 channels.
Pixels stay in [0, 1] without ImageNet's mean/std normalisation (sigma and radii are in pixel
units): the backbone adapts during training, as with any fine-tuning from a different input scale.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..core.files import sha256_file
from ..errors import CertssbError

__all__ = ["PRETRAINED_ARCHS", "PRETRAINED_MIN_SIZE", "PretrainedInit", "torchvision_key", "map_state"]

#: architectures a pretrained checkpoint can initialise
PRETRAINED_ARCHS = ("resnet18",)
#: smallest image side with the ImageNet stem (certssb.models.resnet18 switches stems at 128)
PRETRAINED_MIN_SIZE = 128

_HEAD = ("fc.weight", "fc.bias")
_LAYER = re.compile(r"^layer([1-4])\.([01])\.(conv1|bn1|conv2|bn2|downsample\.0|downsample\.1)\.(.+)$")


def torchvision_key(key: str) -> Optional[str]:
    """The certssb ``resnet18`` name of a torchvision ``resnet18`` state-dict key; None for the head
    (fc.*); the key unchanged when it is not a torchvision name (then it must be certssb's own)."""
    if key in _HEAD:
        return None
    for tv, ours in (("conv1.", "stem.0."), ("bn1.", "stem.1.")):
        if key.startswith(tv):
            return ours + key[len(tv):]
    m = _LAYER.match(key)
    if m is None:
        return key
    stage, block, part, rest = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
    part = {"downsample.0": "shortcut.0", "downsample.1": "shortcut.1"}.get(part, part)
    return f"layers.{2 * (stage - 1) + block}.{part}.{rest}"


def map_state(state: dict[str, torch.Tensor], model: nn.Module, where: str) -> dict[str, torch.Tensor]:
    """The checkpoint's backbone tensors under `model`'s names (head excluded), checked: every
    backbone tensor of the model present with its shape, nothing else in the file."""
    torchvision = "conv1.weight" in state
    ours_head = {"fc.weight", "fc.bias"}
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = torchvision_key(key) if torchvision else (None if key in ours_head else key)
        if name is not None:
            mapped[name] = value
    target = {k: v for k, v in model.state_dict().items() if k not in ours_head}
    unexpected = sorted(set(mapped) - set(target))
    missing = sorted(set(target) - set(mapped))
    layout = "torchvision" if torchvision else "certssb"
    if unexpected:
        shown = ", ".join(unexpected[:4]) + (f" (+{len(unexpected) - 4} more)" if len(unexpected) > 4 else "")
        raise CertssbError(f"{where} is not a ResNet-18 checkpoint ({layout} key layout): it has tensors a "
                           f"ResNet-18 does not, e.g. {shown}; --init-weights takes a torchvision "
                           f"resnet18().state_dict() (or a certssb resnet18 model file)")
    if missing:
        shown = ", ".join(missing[:4]) + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else "")
        raise CertssbError(f"{where} lacks {len(missing)} ResNet-18 tensor(s) ({layout} key layout), e.g. "
                           f"{shown}; pass a complete resnet18 state dict")
    for name, want in target.items():
        got = mapped[name]
        if tuple(got.shape) != tuple(want.shape):
            raise CertssbError(f"{where}: tensor for {name} has shape {list(got.shape)}, the ResNet-18 "
                               f"here needs {list(want.shape)}; the checkpoint is of another width or "
                               f"input-channel count")
        if want.is_floating_point() != got.is_floating_point():
            raise CertssbError(f"{where}: tensor for {name} is {got.dtype}, expected a "
                               f"{'floating-point' if want.is_floating_point() else 'integer'} tensor")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise CertssbError(f"{where}: tensor for {name} holds NaN or infinite values")
    return {k: mapped[k].to(target[k].dtype).contiguous() for k in target}


@dataclass
class PretrainedInit:
    """A checked pretrained backbone for one run's models: `apply` it to a freshly built model.

    Built by `PretrainedInit.load`; `sha256` (of the file) enters the stage fingerprints."""

    path: str
    sha256: str
    backbone: dict[str, torch.Tensor] = field(repr=False)

    @classmethod
    def load(cls, path: str | os.PathLike, arch: str, in_channels: int, num_classes: int,
             image_size: tuple[int, int]) -> "PretrainedInit":
        """Read and check `path` for models `build_model(arch, in_channels, num_classes, image_size)`.

        CertssbError (one message each): another architecture than resnet18, images below 128 px
        (the CIFAR stem), not 3 channels, a file that is not a safe tensor file (a pickle with
        code), wrong architecture, missing tensors, wrong shapes."""
        from ..models import build_model
        from .ensemble import load_user_weights

        flag = f"--init-weights {path}"
        if arch not in PRETRAINED_ARCHS:
            raise CertssbError(f"{flag}: pretrained initialisation supports --arch "
                               f"{', '.join(PRETRAINED_ARCHS)}, not {arch!r}; use --arch resnet18 or drop "
                               "--init-weights")
        h, w = image_size
        if min(h, w) < PRETRAINED_MIN_SIZE:
            raise CertssbError(f"{flag}: the pretrained ResNet-18 stem (7x7 stride-2 conv + max-pool) is built "
                               f"for images of at least {PRETRAINED_MIN_SIZE}x{PRETRAINED_MIN_SIZE} pixels; these "
                               f"are {h}x{w} and get the 3x3 small-image stem, which the checkpoint does not fit: "
                               f"use --image-size {PRETRAINED_MIN_SIZE} or more (ImageNette's default is 224) "
                               "or drop --init-weights")
        if in_channels != 3:
            raise CertssbError(f"{flag}: a pretrained ResNet-18 takes RGB images (3 channels), these have "
                               f"{in_channels}")
        state = load_user_weights(path)
        model = build_model(arch, in_channels, num_classes, image_size)
        backbone = map_state(state, model, str(path))
        return cls(str(path), sha256_file(Path(path)), backbone)

    def apply(self, model: nn.Module) -> nn.Module:
        """Copy the backbone into `model` (in place); its head (fc) stays as initialised."""
        missing, unexpected = model.load_state_dict(self.backbone, strict=False)
        if unexpected or set(missing) - {"fc.weight", "fc.bias"}:
            raise CertssbError(f"--init-weights {self.path} does not fit this model "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return model

    def fingerprint(self) -> tuple:
        """The parts a stage fingerprint adds for it (empty without pretrained weights)."""
        return ({"init_weights_sha256": self.sha256},)
