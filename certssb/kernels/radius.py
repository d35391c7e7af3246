"""Native radius ops: certificate arithmetic and the differentiable radius proxy.

This file's one job is the Python face of the `radius` op family of
`certssb._C` (csrc/cpu/radius.cpp, csrc/cuda/radius_kernel.cu): their fake
(meta) kernels, the autograd formula of the proxy, and two typed wrappers that
validate at the boundary before calling ``torch.ops.certssb.*``:

- `certify_radius`: pA_lower (Hoeffding or Clopper-Pearson), pB_upper, the
  certified radius and the abstain flag, in one pass over the batch;
- `radius_proxy`: r = sigma / 2 * (PhiInv(pA) - PhiInv(pB)) of the sigma
  search, differentiable with respect to mean_probs and sigma.

Their pure-PyTorch references are `certssb.certify.bounds.pa_lower` +
`certssb.core.radius.certified_radius` and `certssb.core.radius.radius_proxy`; both paths
agree to 1e-12 (relative) in float64 and to rounding in float32. The bounds the native op
implements are `NATIVE_BOUNDS`; a `certssb.certify.bounds.BoundSpec` names one of them as
its kernel id.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .._ops import build_info  # noqa: F401  (importing certssb._ops loads certssb._C: the op schemas)
from ..core.radius import (SCORE_TOL, HARD, SIGMA_MAX, SOFT, STATISTIC_ARGS, check_alpha, check_m,
                              check_num_classes)
from ..errors import CertssbError

__all__ = ["NATIVE_BOUNDS", "certify_radius", "radius_proxy"]

# The bound argument the radius_certify op understands, and the vote statistic each one reads.
NATIVE_BOUNDS = {"hoeffding": SOFT, "clopper-pearson": HARD}

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _op_defined(name: str) -> bool:
    """Whether torch.ops.certssb.<name> exists (False when _C was built without it)."""
    try:
        getattr(torch.ops.certssb, name)
    except (AttributeError, RuntimeError):
        return False
    return True


# ----------------------------------------------------------------------------- fake kernels
# Shapes and dtypes only, for torch.compile / meta tensors. Registered only when the
# schemas exist, so a stale _C can never make this import fail.
if _op_defined("radius_certify"):

    @torch.library.register_fake("certssb::radius_certify")
    def _radius_certify_fake(top_score: Tensor, top_count: Tensor, sigma: Tensor, models: int,
                             alpha: float, num_classes: int, bound: str
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        torch._check(sigma.dim() == 1, lambda: "radius_certify: sigma must be [B]")
        n = sigma.shape[0]
        return (sigma.new_empty((n,), dtype=torch.float64), sigma.new_empty((n,), dtype=torch.float64),
                sigma.new_empty((n,), dtype=torch.float64), sigma.new_empty((n,), dtype=torch.bool))

if _op_defined("radius_proxy"):

    @torch.library.register_fake("certssb::radius_proxy")
    def _radius_proxy_fake(mean_probs: Tensor, sigma: Tensor, lo: float, hi: float) -> Tensor:
        torch._check(mean_probs.dim() == 2, lambda: "radius_proxy: mean_probs must be [B, C]")
        out_dtype = torch.promote_types(mean_probs.dtype, sigma.dtype)
        return mean_probs.new_empty((mean_probs.shape[0],), dtype=out_dtype)

if _op_defined("radius_proxy_backward"):

    @torch.library.register_fake("certssb::radius_proxy_backward")
    def _radius_proxy_backward_fake(grad: Tensor, mean_probs: Tensor, sigma: Tensor, lo: float,
                                    hi: float) -> tuple[Tensor, Tensor]:
        return mean_probs.new_empty(mean_probs.shape), sigma.new_empty(sigma.shape)


# ----------------------------------------------------------------------------- autograd
def _proxy_setup_context(ctx, inputs, output) -> None:  # noqa: ANN001 (torch.library protocol)
    mean_probs, sigma, lo, hi = inputs
    ctx.save_for_backward(mean_probs, sigma)
    ctx.clamp = (lo, hi)


def _proxy_backward(ctx, grad: Tensor):  # noqa: ANN001, ANN202
    # The backward is itself a native op (one pass regenerating the top-2 and PhiInv);
    # lo and hi are constants.
    mean_probs, sigma = ctx.saved_tensors
    grad_probs, grad_sigma = torch.ops.certssb.radius_proxy_backward(grad, mean_probs, sigma, *ctx.clamp)
    return (grad_probs if ctx.needs_input_grad[0] else None,
            grad_sigma if ctx.needs_input_grad[1] else None, None, None)


if _op_defined("radius_proxy") and _op_defined("radius_proxy_backward"):
    torch.library.register_autograd("certssb::radius_proxy", _proxy_backward,
                                    setup_context=_proxy_setup_context)


# ----------------------------------------------------------------------------- validation
def _check_vector(x: object, name: str, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise CertssbError(f"{name} must be a tensor [B] ({what}), got {type(x).__name__}")
    if x.dim() != 1:
        raise CertssbError(f"{name} must be a 1-D tensor [B] ({what}), got shape {tuple(x.shape)}; "
                           "pass one value per sample")
    return x


def _sigma_vector(sigma: Tensor | float, n: int, device: torch.device, name: str = "sigma") -> Tensor:
    """sigma as a [n] tensor on `device`: a number or a 0-d / 1-element tensor is broadcast."""
    if not isinstance(sigma, Tensor):
        if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
            raise CertssbError(f"{name} must be a tensor or a number, got {type(sigma).__name__}")
        sigma = torch.tensor(float(sigma), dtype=torch.float64, device=device)
    if sigma.dtype not in _FLOAT_DTYPES:
        raise CertssbError(f"{name} must be a floating-point tensor, got {sigma.dtype}; "
                           "pass noise levels as float32 or float64")
    if sigma.device != device:
        raise CertssbError(f"{name} is on {sigma.device} but the scores are on {device}; "
                           "move all inputs to one device")
    if sigma.dim() == 0 or (sigma.dim() == 1 and sigma.shape[0] == 1 and n != 1):
        return sigma.reshape(()).expand(n)  # a view: gradients still reach the scalar
    if sigma.dim() != 1 or sigma.shape[0] != n:
        raise CertssbError(f"{name} must be a number or a [B] tensor with B = {n}, got shape "
                           f"{tuple(sigma.shape)}")
    return sigma


def _extremes(tensors: list[Tensor], extra: list[Tensor] | None = None) -> list[float]:
    """[min, max] of each (non-empty) tensor, then the 0-d `extra` values, as floats.

    NaN propagates into both extremes, so comparisons on them fail for NaN inputs. All
    values travel to the host together: one synchronisation on a GPU.
    """
    parts = [v.to(torch.float64) for t in tensors for v in torch.aminmax(t.detach())]
    parts += [v.to(torch.float64) for v in (extra or [])]
    return torch.stack(parts).tolist()


def _raise_if(flags: list[bool], messages: list[str]) -> None:
    for ok, msg in zip(flags, messages):
        if not ok:
            raise CertssbError(msg)


_SIGMA_MSG = (f"sigma must be finite and > 0 everywhere, at most {SIGMA_MAX:g} (noise levels in "
              "[0, 1] pixel units); check the sigma file / settings")


# ----------------------------------------------------------------------------- wrappers
def certify_radius(top_score: Tensor | None, top_count: Tensor | None, sigma: Tensor | float, *,
                   models: int, alpha: float, num_classes: int, bound: str
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Certificates of a batch: pA_lower, pB_upper, radius and abstain, natively.

    Math (docs/THEORY.md; reference: `bounds.pa_lower` then `radius.certified_radius`):

    - bound "hoeffding": pA_lower = clamp(top_score - sqrt(ln(1/alpha) / (2 models)), 0, 1),
      a (1 - alpha) lower bound on the mean soft score of the top class;
    - bound "clopper-pearson": pA_lower = the alpha / num_classes quantile of
      Beta(k, models - k + 1) for k = top_count (0 when k = 0): the exact binomial bound,
      Bonferroni-corrected over the classes;
    - pB_upper = 1 - pA_lower; radius = sigma / 2 * (PhiInv(pA) - PhiInv(pB)) with pA
      clamped to [1/2, 1 - 1e-12] (so at most ~7.03 sigma); abstain = pA_lower <= 1/2,
      where the radius is 0.

    Args:
        top_score: [B] float (any float dtype): mean softmax probability of the top class
            over the models. Needed by "hoeffding"; may be None for "clopper-pearson".
        top_count: [B] integer (or integer-valued float): votes of the top class, in
            [0, models]. Needed by "clopper-pearson"; may be None for "hoeffding".
        sigma: [B] float tensor, or one number / 0-d tensor for the whole batch; in
            (0, SIGMA_MAX = 1e300] (so that every radius is finite).
        models: number of models (votes) M >= 1.
        alpha: failure probability in (0, 1).
        num_classes: number of classes C >= 2.
        bound: a key of NATIVE_BOUNDS: "hoeffding" or "clopper-pearson".
    Returns:
        (pa_lower, pb_upper, radius, abstain): float64, float64, float64 and bool tensors
        of shape [B] on the inputs' device. Agrees with the reference to 1e-12 relative.
    Raises:
        CertssbError: on a bad argument or value, with what to do about it.

    Example:
        >>> pa, pb, r, abstain = certify_radius(torch.tensor([0.9, 0.55]), None, 0.25,
        ...                                     models=1000, alpha=0.001, num_classes=10,
        ...                                     bound="hoeffding")
        >>> abstain.tolist()
        [False, True]
    """
    if bound not in NATIVE_BOUNDS:
        raise CertssbError(f"unknown bound {bound!r}; choose one of {', '.join(NATIVE_BOUNDS)} (the bounds "
                           "with a native kernel; certssb.certify.bounds.pa_lower runs any registered bound)")
    models = check_m(models)
    alpha = check_alpha(alpha)
    num_classes = check_num_classes(num_classes)
    soft = NATIVE_BOUNDS[bound] == SOFT  # else the hard count
    if (top_score if soft else top_count) is None:
        raise CertssbError(f"bound {bound!r} needs {STATISTIC_ARGS[NATIVE_BOUNDS[bound]]}")
    main = _check_vector(top_score if soft else top_count,
                         "top_score" if soft else "top_count",
                         "mean softmax of the top class" if soft else "votes of the top class")
    n, device = main.shape[0], main.device
    if top_score is not None:
        top_score = _check_vector(top_score, "top_score", "mean softmax of the top class")
        if top_score.dtype not in _FLOAT_DTYPES:
            raise CertssbError(f"top_score must be a floating-point tensor of mean probabilities, got "
                               f"{top_score.dtype}; pass the mean softmax of the top class")
    else:
        top_score = torch.zeros((), dtype=torch.float64, device=device).expand(n)  # unused
    if top_count is not None:
        top_count = _check_vector(top_count, "top_count", "votes of the top class")
        if top_count.dtype == torch.bool or top_count.is_complex():
            raise CertssbError(f"top_count must hold integer vote counts, got dtype {top_count.dtype}")
    else:
        top_count = torch.zeros((), dtype=torch.int64, device=device).expand(n)  # unused
    for name, t in (("top_score", top_score), ("top_count", top_count)):
        if t.shape[0] != n:
            raise CertssbError(f"top_score and top_count must have the same length, got "
                               f"{top_score.shape[0]} and {top_count.shape[0]}")
        if t.device != device:
            raise CertssbError(f"{name} is on {t.device} but the other scores are on {device}; "
                               "move all inputs to one device")
    sigma = _sigma_vector(sigma, n, device)
    if n:
        # Values, from the extremes of each input: one reduction per input, one host sync.
        if soft:
            main = top_score
            extra: list[Tensor] = []
        else:
            main = top_count
            # integer-valued floats: max |k - round(k)| must be 0
            extra = [(main - main.round()).abs().amax()] if main.is_floating_point() else []
        values = _extremes([main, sigma], extra)
        lo_v, hi_v, s_lo, s_hi = values[:4]
        if soft:
            main_ok = lo_v >= -SCORE_TOL and hi_v <= 1 + SCORE_TOL  # False on NaN
            main_msg = ("top_score must be a mean of scores in [0, 1] (no NaN); pass the mean softmax "
                        "probability of the top class, not a logit or a count")
        else:
            main_ok = lo_v >= 0 and hi_v <= models and all(v == 0 for v in values[4:])
            main_msg = (f"top_count must hold integer vote counts in [0, m={models}]; pass the hard "
                        "vote count of the top class out of m models")
        _raise_if([main_ok, s_lo > 0 and s_hi <= SIGMA_MAX], [main_msg, _SIGMA_MSG])
    if top_count.dtype not in _INT_DTYPES:
        top_count = top_count.to(torch.int64)  # integer-valued floats, checked above
    return torch.ops.certssb.radius_certify(top_score, top_count, sigma, models, alpha, num_classes, bound)


def radius_proxy(mean_probs: Tensor, sigma: Tensor | float,
                 clamp: tuple[float, float] = (0.02, 0.98)) -> Tensor:
    """Differentiable radius proxy r = sigma / 2 * (PhiInv(pA) - PhiInv(pB)), natively.

    pA, pB are the top-2 entries of each row of `mean_probs` (ties to the lowest class
    index), each clamped to [lo, hi] = `clamp` before PhiInv. Differentiable with respect
    to `mean_probs` and `sigma` (registered autograd, backward by the native
    radius_proxy_backward op): dr/dpA = sigma / 2 / phi(PhiInv(pA)) inside [lo, hi] (edges
    included), 0 outside; dr/dpB likewise with a minus sign; dr/dsigma = (PhiInv(pA) -
    PhiInv(pB)) / 2. Reference: `certssb.core.radius.radius_proxy`.

    Args:
        mean_probs: [B, C] (C >= 2) mean softmax probabilities, float16/bfloat16/float32/
            float64 (half types are computed in float32), any strides.
        sigma: [B] float tensor, or one number / 0-d tensor broadcast to the batch; > 0.
        clamp: (lo, hi) with 0 < lo < hi < 1.
    Returns:
        [B] tensor of the promoted dtype of mean_probs and sigma (a number or 0-d sigma does
        not promote), on mean_probs' device; float64 math when that dtype is float64, else
        float32.
    Raises:
        CertssbError: on a bad shape, dtype, device, clamp, NaN probability or a sigma
            outside (0, SIGMA_MAX].

    Example:
        >>> p = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64, requires_grad=True)
        >>> s = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
        >>> r = radius_proxy(p, s)
        >>> r.sum().backward()   # fills p.grad ([1, 3]) and s.grad ([1])
    """
    try:
        lo, hi = (float(c) for c in clamp)
    except (TypeError, ValueError):
        raise CertssbError(f"clamp must be a pair (lo, hi) of numbers, got {clamp!r}") from None
    if not (0.0 < lo < hi < 1.0):
        raise CertssbError(f"clamp must satisfy 0 < lo < hi < 1, got {clamp!r}; the default is (0.02, 0.98)")
    if not isinstance(mean_probs, Tensor) or mean_probs.dim() != 2 or mean_probs.shape[1] < 2:
        shape = tuple(mean_probs.shape) if isinstance(mean_probs, Tensor) else type(mean_probs).__name__
        raise CertssbError(f"mean_probs must be a [B, C] tensor with C >= 2 classes, got {shape}")
    if mean_probs.dtype not in _FLOAT_DTYPES:
        raise CertssbError(f"mean_probs must be a floating-point tensor of probabilities "
                           f"(float16/bfloat16/float32/float64), got {mean_probs.dtype}")
    n = mean_probs.shape[0]
    if isinstance(sigma, Tensor) and sigma.dim() == 0 and sigma.dtype in _FLOAT_DTYPES:
        # As in the reference, a 0-d sigma does not promote the result dtype.
        sigma = sigma.to(torch.result_type(mean_probs, sigma))
    elif isinstance(sigma, numbers.Real) and not isinstance(sigma, bool):
        sigma = torch.tensor(float(sigma), dtype=mean_probs.dtype, device=mean_probs.device)
    sigma = _sigma_vector(sigma, n, mean_probs.device)
    if n:
        p_lo, p_hi, s_lo, s_hi = _extremes([mean_probs.detach(), sigma.detach()])
        _raise_if([not (math.isnan(p_lo) or math.isnan(p_hi)), s_lo > 0 and s_hi <= SIGMA_MAX],
                  ["mean_probs contain NaN; check the model outputs (diverged training?)", _SIGMA_MSG])
    return torch.ops.certssb.radius_proxy(mean_probs, sigma, lo, hi)
