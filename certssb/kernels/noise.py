"""The fused noise op: noisy copies of a batch for a block of models, with regenerated noise.

    out[k, b, ...] = x[b] + sigma[b] * eps(seed, stream, k0 + k, ids[b], ...)

eps is the project's one noise definition (see `certssb.smoothing.noise`: Philox4x32-10 +
Box-Muller, a pure function of (seed, stream, a, b, element)); the kernel never
stores it. Backward with respect to sigma regenerates it
(`torch.ops.certssb.noise_sigma_grad`); with respect to x it is a sum over models.
The pure-PyTorch reference is `certssb.smoothing.noise.noisy_copies(..., backend="reference")`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._ops import build_info  # noqa: F401  (importing certssb._ops loads certssb._C: the op schemas)
from ..errors import CertssbError
from .noise_common import MASK32 as _U32, check_noise_inputs, seed_to_int64


@torch.library.register_fake("certssb::noise")
def _noise_fake(x, sigma, ids, seed, stream, k0, models):
    return x.new_empty((models, *x.shape))


@torch.library.register_fake("certssb::noise_sigma_grad")
def _noise_sigma_grad_fake(grad_out, ids, seed, stream, k0):
    acc = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    return grad_out.new_empty((grad_out.shape[1],), dtype=acc)


def _setup_context(ctx, inputs, output):
    x, sigma, ids, seed, stream, k0, models = inputs
    ctx.save_for_backward(ids)
    ctx.words = (seed, stream, k0)
    ctx.sigma_dtype = sigma.dtype


def _backward(ctx, grad):
    (ids,) = ctx.saved_tensors
    seed, stream, k0 = ctx.words
    grad_x = grad.sum(0) if ctx.needs_input_grad[0] else None
    grad_sigma = None
    if ctx.needs_input_grad[1]:
        grad_sigma = torch.ops.certssb.noise_sigma_grad(grad.contiguous(), ids, seed, stream,
                                                        k0).to(ctx.sigma_dtype)
    return grad_x, grad_sigma, None, None, None, None, None


torch.library.register_autograd("certssb::noise", _backward, setup_context=_setup_context)


def noise(x: Tensor, sigma: Tensor, ids: Tensor, *, seed: int, stream: int, k0: int,
          models: int, check: bool = True) -> Tensor:
    """Noisy copies of x for the models k0 .. k0 + models - 1, by the native kernel.

    out[k, b, ...] = x[b] + sigma[b] * eps(seed, stream, k0 + k, ids[b], ...), eps cast to
    x's dtype first (arithmetic in float32 for float16/bfloat16 inputs).

    Args:
        x: [B, ...] float32, float64, float16 or bfloat16 (any layout; the output is contiguous).
        sigma: [B] floating noise levels (same device as x).
        ids: [B] int64 sample indices in [0, 2^32) (the `b` word; zeros for the TEST stream).
        seed: integer in [0, 2^64); stream: a `certssb.smoothing.noise.Stream` value;
        k0, models: the block of model indices (the `a` word), k0 + models - 1 < 2^32.
        check: also check values (x finite, sigma finite and > 0: one GPU sync); callers that
            validated them already (`certssb.smoothing.noise.noisy_copies`) pass False.
    Returns:
        [models, B, ...] in x's dtype. Differentiable in x and sigma.

    Example::

        x = torch.rand(8, 1, 28, 28)
        out = noise(x, torch.full((8,), 0.25), torch.arange(8), seed=0, stream=1, k0=0, models=4)
        out.shape  # torch.Size([4, 8, 1, 28, 28])
    """
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise CertssbError("x must be a floating tensor of shape [B, ...]")
    b = x.shape[0]
    if not isinstance(sigma, Tensor) or sigma.shape != (b,) or not sigma.is_floating_point():
        raise CertssbError(f"sigma must be a floating tensor of shape [{b}], got "
                           f"{list(sigma.shape) if isinstance(sigma, Tensor) else type(sigma).__name__}")
    if not isinstance(ids, Tensor) or ids.shape != (b,) or ids.dtype != torch.int64:
        raise CertssbError(f"ids must be an int64 tensor of shape [{b}]")
    if sigma.device != x.device or ids.device != x.device:
        raise CertssbError(f"x, sigma and ids must be on one device, got {x.device}, "
                           f"{sigma.device} and {ids.device}")
    if b and (int(ids.min()) < 0 or int(ids.max()) > _U32):
        raise CertssbError("ids must lie in [0, 2^32)")
    for name, v in (("stream", stream), ("k0", k0), ("models", models)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise CertssbError(f"{name} must be an integer >= 0, got {v!r}")
    if stream > _U32 or k0 + max(models, 1) - 1 > _U32:
        raise CertssbError("stream and the model indices k0 .. k0 + models - 1 must lie in [0, 2^32)")
    if check:
        check_noise_inputs(x, sigma)
    return torch.ops.certssb.noise(x, sigma, ids, seed_to_int64(seed), int(stream), int(k0),
                                   int(models))


__all__ = ["noise"]
