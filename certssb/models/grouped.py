"""A group of Mc models of one architecture run as one module (grouped layers).

`GroupedModel` turns Mc plain models (same architecture, different weights)
into one module whose activations hold the Mc models side by side as channel
groups: an activation of model m with C channels occupies channels
[m*C, (m+1)*C) of a tensor [B, Mc*C, H, W]. Then

* every ``nn.Conv2d`` becomes one convolution with ``groups = Mc * groups``
  (weights stacked along the output channels);
* every ``nn.BatchNorm2d(C)`` becomes one ``BatchNorm2d(Mc*C)``: statistics are
  per channel, so each model keeps its own batch statistics and running
  buffers, exactly as if trained alone;
* every ``nn.Linear`` becomes a batched matrix product over models
  (``[Mc, B, in] @ [Mc, in, out]``);
* everything channel-wise (ReLU, pooling, residual sums, ``flatten(1)``) runs
  unchanged: ``flatten`` of [B, Mc*C, H, W] puts model m's C*H*W features in
  one contiguous block in the plain model's order.

So the architecture's own ``forward`` runs on the grouped tensors; one kernel
call does the work of Mc. One rewrite makes it cheaper: a ReLU directly
followed by a max-pool in an ``nn.Sequential`` is run as max-pool then ReLU.
The two commute exactly (both monotone), also in their gradients, and the
ReLU then touches a quarter of the values. Models are independent: the output of model m
depends only on model m's weights and input, and the gradient of a sum of
per-model losses is each model's own gradient (Adam is elementwise, so one
optimizer over the stacked parameters equals Mc separate ones).

Weights go in and out as plain per-model state dicts (`state_dicts`,
`from_states`), so checkpoints load into `certssb.models.build_model`.
"""
from __future__ import annotations

import copy
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CertssbError
from .registry import build_model

# Modules without parameters that act on each channel separately: safe on grouped tensors.
_CHANNELWISE = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity,
                nn.Sequential, nn.ModuleList)


class GroupedConv2d(nn.Module):
    """Mc ``nn.Conv2d`` with identical hyper-parameters as one grouped convolution.

    Input [B, Mc*Cin, H, W] -> output [B, Mc*Cout, H', W']; weight
    [Mc*Cout, Cin/groups, kh, kw] (model m's filters are rows m*Cout..), bias [Mc*Cout].
    """

    def __init__(self, convs: Sequence[nn.Conv2d]) -> None:
        super().__init__()
        c = convs[0]
        if c.padding_mode != "zeros" or isinstance(c.padding, str):
            raise CertssbError(f"grouped training supports zero-padded convolutions with numeric padding, "
                               f"got padding={c.padding!r}, padding_mode={c.padding_mode!r}")
        self.models = len(convs)
        self.in_channels, self.out_channels = c.in_channels, c.out_channels
        self.stride, self.padding, self.dilation, self.groups = c.stride, c.padding, c.dilation, c.groups
        self.weight = nn.Parameter(torch.cat([m.weight.detach() for m in convs]).clone())
        self.bias = (nn.Parameter(torch.cat([m.bias.detach() for m in convs]).clone())
                     if c.bias is not None else None)
        self.kernel_size = c.kernel_size
        # "grouped": one grouped convolution (cuDNN / oneDNN); "bmm": unfold + one batched matrix
        # product over the model axis (`set_conv_impl`); the same convolution either way
        self.impl = "grouped"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "bmm" and self.groups == 1:
            return self._forward_bmm(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups * self.models)

    def _forward_bmm(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution as unfold + [Mc, Cout, Cin*k] @ [Mc, Cin*k, B*L]: a dense product per model."""
        b, _, h, w = x.shape
        kh, kw = self.kernel_size
        cols = F.unfold(x, (kh, kw), dilation=self.dilation, padding=self.padding, stride=self.stride)
        k = self.in_channels * kh * kw  # unfold's rows: channel-major, so model m's rows are one block
        ho = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        wo = (w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        cols = cols.reshape(b, self.models, k, ho * wo).permute(1, 2, 0, 3).reshape(self.models, k, b * ho * wo)
        wm = self.weight.reshape(self.models, self.out_channels, k)
        out = torch.bmm(wm, cols)  # [Mc, Cout, B*L]
        if self.bias is not None:
            out = out + self.bias.reshape(self.models, self.out_channels, 1).to(out.dtype)
        out = out.reshape(self.models * self.out_channels, b, ho, wo).transpose(0, 1)
        return out.contiguous(memory_format=torch.channels_last if x.is_contiguous(
            memory_format=torch.channels_last) else torch.contiguous_format)

    def split(self) -> list[dict[str, torch.Tensor]]:
        out = []
        for m, w in enumerate(self.weight.detach().chunk(self.models)):
            d = {"weight": w}
            if self.bias is not None:
                d["bias"] = self.bias.detach()[m * self.out_channels:(m + 1) * self.out_channels]
            out.append(d)
        return out


class GroupedBatchNorm2d(nn.BatchNorm2d):
    """Mc ``nn.BatchNorm2d(C)`` as one ``BatchNorm2d(Mc*C)``: per-model statistics and buffers.

    ``num_batches_tracked`` is shared: all models of a group see the same number of batches.
    """

    def __init__(self, bns: Sequence[nn.BatchNorm2d]) -> None:
        b = bns[0]
        self.models = len(bns)
        self.channels = b.num_features
        like = b.running_mean if b.running_mean is not None else b.weight  # keep the plain models' dtype
        super().__init__(b.num_features * len(bns), eps=b.eps, momentum=b.momentum, affine=b.affine,
                         track_running_stats=b.track_running_stats,
                         dtype=like.dtype if like is not None else None)
        with torch.no_grad():
            if b.affine:
                self.weight.copy_(torch.cat([m.weight.detach() for m in bns]))
                self.bias.copy_(torch.cat([m.bias.detach() for m in bns]))
            if b.track_running_stats:
                self.running_mean.copy_(torch.cat([m.running_mean for m in bns]))
                self.running_var.copy_(torch.cat([m.running_var for m in bns]))
                self.num_batches_tracked.copy_(b.num_batches_tracked)

    def split(self) -> list[dict[str, torch.Tensor]]:
        out = []
        for m in range(self.models):
            s = slice(m * self.channels, (m + 1) * self.channels)
            d: dict[str, torch.Tensor] = {}
            if self.affine:
                d["weight"], d["bias"] = self.weight.detach()[s], self.bias.detach()[s]
            if self.track_running_stats:
                d["running_mean"], d["running_var"] = self.running_mean[s], self.running_var[s]
                d["num_batches_tracked"] = self.num_batches_tracked.clone()
            out.append(d)
        return out


class GroupedLinear(nn.Module):
    """Mc ``nn.Linear(in, out)`` as one batched matrix product.

    Input [B, Mc*in] (model m's features in columns m*in..) -> [B, Mc*out];
    weight [Mc, out, in], bias [Mc, out].
    """

    def __init__(self, linears: Sequence[nn.Linear]) -> None:
        super().__init__()
        lin = linears[0]
        self.models = len(linears)
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in linears]).clone())
        self.bias = (nn.Parameter(torch.stack([m.bias.detach() for m in linears]).clone())
                     if lin.bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = x.reshape(b, self.models, self.in_features).transpose(0, 1)  # [Mc, B, in]
        w = self.weight.transpose(1, 2)  # [Mc, in, out]
        y = torch.baddbmm(self.bias.unsqueeze(1), h, w) if self.bias is not None else torch.bmm(h, w)
        return y.transpose(0, 1).reshape(b, self.models * self.out_features)

    def split(self) -> list[dict[str, torch.Tensor]]:
        out = []
        for m in range(self.models):
            d = {"weight": self.weight.detach()[m]}
            if self.bias is not None:
                d["bias"] = self.bias.detach()[m]
            out.append(d)
        return out


_GROUPED = {nn.Conv2d: GroupedConv2d, nn.BatchNorm2d: GroupedBatchNorm2d, nn.Linear: GroupedLinear}


def _grouped_class(module: nn.Module):
    for plain, grouped in _GROUPED.items():
        if type(module) is plain:
            return grouped
    return None


class GroupedModel(nn.Module):
    """Mc models of one architecture as one module (see the module docstring).

    Args:
        models: Mc >= 1 plain models with the same architecture (same class,
            same layer shapes); their weights are copied, not shared.

    ``forward(x)``: x [Mc, B, C, H, W] (model m's own inputs in x[m]) -> logits
    [Mc, B, K]. ``forward_grouped(x)``: x already in the grouped layout
    [B, Mc*C, H, W] -> [Mc, B, K]. Example::

        g = GroupedModel([build_model("mnist-cnn", 1, 2, (28, 28)) for _ in range(8)])
        logits = g(torch.rand(8, 128, 1, 28, 28))   # [8, 128, 2]
        states = g.state_dicts()                      # 8 plain state dicts
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        models = list(models)
        if not models:
            raise CertssbError("a model group needs at least one model")
        cls = type(models[0])
        if any(type(m) is not cls for m in models):
            raise CertssbError("all models of a group must have the same architecture (class)")
        self.models = len(models)
        # a plain model, not a submodule (its weights are not the group's): rebuilds plain copies
        object.__setattr__(self, "_template", copy.deepcopy(models[0]).cpu())
        self.body = copy.deepcopy(models[0])
        _pool_before_relu(self.body)
        self._grouped: dict[str, nn.Module] = {}
        for name, module in list(models[0].named_modules()):
            grouped_cls = _grouped_class(module)
            if grouped_cls is not None:
                members = [m.get_submodule(name) for m in models]
                shapes = {tuple((k, tuple(v.shape)) for k, v in mm.state_dict().items()) for mm in members}
                if len(shapes) != 1:
                    raise CertssbError(f"layer {name!r} differs in shape between the models of a group; "
                                       f"group only models built with the same build_model arguments")
                grouped = grouped_cls(members)
                self._set(name, grouped)
                self._grouped[name] = grouped
            elif name and not isinstance(module, _CHANNELWISE) and any(
                    True for _ in module.parameters(recurse=False)):
                raise CertssbError(f"layer {name!r} ({type(module).__name__}) has parameters but no grouped "
                                   f"version; supported: Conv2d, BatchNorm2d, Linear")

    def _set(self, name: str, module: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = self.body.get_submodule(parent_name) if parent_name else self.body
        setattr(parent, child, module)

    def forward_grouped(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, Mc*C, H, W] (grouped layout) -> logits [Mc, B, K]."""
        out = self.body(x)
        return out.reshape(x.shape[0], self.models, -1).transpose(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [Mc, B, C, H, W] -> logits [Mc, B, K]."""
        if x.dim() != 5 or x.shape[0] != self.models:
            raise CertssbError(f"a group of {self.models} models takes inputs [{self.models}, B, C, H, W], "
                               f"got {list(x.shape)}")
        return self.forward_grouped(to_grouped_layout(x))

    def plain_models(self) -> list[nn.Module]:
        """The Mc models as plain modules (copies of the current weights)."""
        out = []
        for state in self.state_dicts():
            m = copy.deepcopy(self._template)
            m.load_state_dict(state)
            out.append(m)
        return out

    def split(self, size: int) -> list["GroupedModel"]:
        """Consecutive sub-groups of at most `size` models (copies), e.g. to run a group in cache-sized chunks."""
        plain = self.plain_models()
        return [GroupedModel(plain[i:i + size]) for i in range(0, self.models, size)]

    def load_states(self, states: Sequence[dict[str, torch.Tensor]]) -> None:
        """Set the weights and buffers of the Mc models from plain state dicts (inverse of `state_dicts`)."""
        if len(states) != self.models:
            raise CertssbError(f"{len(states)} state dicts for a group of {self.models} models")
        fresh = GroupedModel([_loaded(self._template, st) for st in states])
        with torch.no_grad():
            ours = dict(self.named_parameters())
            ours.update(self.named_buffers())
            theirs = dict(fresh.named_parameters())
            theirs.update(fresh.named_buffers())
            for name, t in ours.items():
                t.copy_(theirs[name])

    def state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """Mc plain state dicts (CPU, contiguous), keys as in the plain architecture's state_dict."""
        states: list[dict[str, torch.Tensor]] = [{} for _ in range(self.models)]
        for name, module in self._grouped.items():
            for m, part in enumerate(module.split()):
                for key, value in part.items():
                    states[m][f"{name}.{key}"] = value.detach().cpu().contiguous().clone()
        return states


def set_conv_impl(module: nn.Module, impl: str) -> None:
    """Run every GroupedConv2d of `module` as "grouped" (one grouped convolution) or "bmm" (unfold +
    batched matrix product over the models). Same values up to float rounding; see certssb.smoothing.engine."""
    if impl not in ("grouped", "bmm"):
        raise CertssbError(f"unknown convolution implementation {impl!r}; use grouped or bmm")
    for m in module.modules():
        if isinstance(m, GroupedConv2d):
            m.impl = impl


def _loaded(template: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    m = copy.deepcopy(template)
    m.load_state_dict(state)
    return m


def _pool_before_relu(module: nn.Module) -> None:
    """In every nn.Sequential, run (ReLU, MaxPool2d) as (MaxPool2d, ReLU): same values and gradients."""
    for seq in module.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        i = 0
        while i + 1 < len(names):
            a, b = seq._modules[names[i]], seq._modules[names[i + 1]]
            if type(a) is nn.ReLU and type(b) is nn.MaxPool2d:
                seq._modules[names[i]], seq._modules[names[i + 1]] = b, a
                i += 2
            else:
                i += 1


def activation_floats(model: nn.Module, sample_shape: Sequence[int]) -> int:
    """Floats of all layer outputs of `model` for one input sample in train mode (a forward pass on 2)."""
    total = 0

    def hook(_m, _i, out):
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = model.training
    try:
        with torch.no_grad():
            param = next(model.parameters(), None)  # the probe input takes the model's dtype (float64 models)
            dtype = param.dtype if param is not None else torch.float32
            model.train()(torch.zeros(2, *sample_shape, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total // 2


def to_grouped_layout(x: torch.Tensor) -> torch.Tensor:
    """[Mc, B, C, H, W] -> [B, Mc*C, H, W] (model m's image in channels m*C..), channels_last for 4-d."""
    mc, b = x.shape[:2]
    out = x.transpose(0, 1).reshape(b, mc * x.shape[2], *x.shape[3:])
    return out.contiguous(memory_format=torch.channels_last) if out.dim() == 4 else out


def from_states(arch: str, in_channels: int, num_classes: int, image_size: tuple[int, int],
                states: Iterable[dict[str, torch.Tensor]]) -> GroupedModel:
    """A GroupedModel from plain state dicts of `arch` (as `certssb.models.build_model` builds it)."""
    models = []
    for state in states:
        model = build_model(arch, in_channels, num_classes, image_size)
        model.load_state_dict(state)
        models.append(model)
    return GroupedModel(models)


__all__ = ["GroupedModel", "GroupedConv2d", "GroupedBatchNorm2d", "GroupedLinear", "from_states",
           "to_grouped_layout", "activation_floats", "set_conv_impl"]
