"""Certificate arithmetic shared by every bound: PhiInv, the certified radius, the poison budget.

A bound (certssb.certify.bounds) turns a vote statistic into pA_lower, a
(1 - alpha) lower confidence bound on pA, the probability of the top class
under the smoothing noise; everything after that is the same for every bound
and lives here (docs/THEORY.md), in pure PyTorch, together with the argument
checks the bounds share. Everything a certificate reports is float64; the
differentiable `radius_proxy` keeps the dtype of its inputs so that the sigma
optimization can run in float32.

Notation: pB_upper = 1 - pA_lower, PhiInv the standard normal quantile. The radius is
R = sigma / 2 * (PhiInv(pA_lower) - PhiInv(pB_upper)) (= sigma * PhiInv(pA_lower)),
and the certificate abstains when pA_lower <= 1/2.
"""
from __future__ import annotations

from typing import Optional

import math
import numbers

import torch
from torch import Tensor

from ..errors import CertssbError

__all__ = [
    "SOFT",
    "HARD",
    "STATISTICS",
    "PA_MAX",
    "SIGMA_MAX",
    "phi_inv",
    "certified_radius",
    "conservative_radius",
    "poison_budget",
    "radius_proxy",
    "top2",
]

# The vote statistics a bound can read (certssb.certify.bounds.BoundSpec.statistic): the mean soft
# vote of the top class (classes ranked by soft votes), or its hard vote count (ranked by counts).
SOFT = "soft"
HARD = "hard"
STATISTICS = (SOFT, HARD)
# the argument of pa_lower / certify_radius that carries each statistic, for error messages
STATISTIC_ARGS = {SOFT: "top_score (the mean softmax of the top class)",
                  HARD: "top_count (the vote count of the top class)"}

# pA_lower is clamped to at most this before PhiInv so that pA_lower == 1 (all M models agree,
# Clopper-Pearson cannot return 1 but a caller might) gives a finite radius:
# PhiInv(1 - 1e-12) ~= 7.034, i.e. the radius is capped at about 7.03 * sigma.
PA_MAX = 1.0 - 1e-12

# Largest accepted noise level. A radius is at most ~7.03 * sigma (PA_MAX above), so this keeps
# every radius finite in float64 (sigma = 1.7e308 gave radius = inf). sigma is in [0, 1] pixel
# units: anything near this bound is a unit mistake, not a noise level.
SIGMA_MAX = 1e300

# Soft scores are means of float32 softmax outputs: allow this much rounding above 1 / below 0.
SCORE_TOL = 1e-6


# ----------------------------------------------------------------------------- validation
def check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not (0.0 < float(alpha) < 1.0):
        raise CertssbError(f"alpha must be a number in (0, 1), got {alpha!r}; "
                           "pass the failure probability of the certificate, e.g. alpha=0.001")
    return float(alpha)


def check_m(m: int) -> int:
    if isinstance(m, bool) or not isinstance(m, numbers.Integral) or int(m) < 1:
        raise CertssbError(f"m (the number of models / votes) must be an integer >= 1, got {m!r}; "
                           "pass the real ensemble size")
    return int(m)


def _as_tensor(x: Tensor | float, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError):
        raise CertssbError(f"{name} must be a tensor or a number, got {type(x).__name__}") from None


def _check_sigma(sigma: Tensor | float, name: str = "sigma") -> Tensor:
    sigma = _as_tensor(sigma, name)
    # in float64: SIGMA_MAX as a float32 scalar would be inf
    if sigma.numel() and not bool(((sigma > 0) & (sigma.to(torch.float64) <= SIGMA_MAX)).all()):  # NaN fails
        raise CertssbError(f"{name} must be finite and > 0 everywhere, at most {SIGMA_MAX:g} (noise levels "
                           f"in [0, 1] pixel units), got min {sigma.min().item()!r}, max "
                           f"{sigma.max().item()!r}; check the sigma file / settings")
    return sigma


def _check_pa_lower(pa: Tensor) -> Tensor:
    pa = _as_tensor(pa, "pa_lower")
    if pa.numel() and not bool(((pa >= 0) & (pa <= 1)).all()):
        raise CertssbError("pa_lower must lie in [0, 1] (no NaN); compute it with pa_lower() "
                           "or hoeffding_lower()/clopper_pearson_lower()")
    return pa


def check_counts(k: Tensor, m: int, name: str) -> Tensor:
    k = _as_tensor(k, name)
    if k.is_complex() or k.dtype == torch.bool:
        raise CertssbError(f"{name} must hold integer vote counts, got dtype {k.dtype}")
    if k.numel():
        kd = k.to(torch.float64)
        if not bool(((kd >= 0) & (kd <= m) & (kd == torch.round(kd))).all()):
            raise CertssbError(f"{name} must hold integer vote counts in [0, m={m}]; "
                               "pass the hard vote count of the top class out of m models")
    return k


def check_scores(p: Tensor, name: str) -> Tensor:
    """Soft vote statistics: means of scores in [0, 1] (float32 rounding tolerated), as float64."""
    p = _as_tensor(p, name).to(torch.float64)
    if p.numel() and not bool(((p >= -SCORE_TOL) & (p <= 1 + SCORE_TOL)).all()):
        raise CertssbError(f"{name} must be a mean of scores in [0, 1] (no NaN); pass the mean "
                           "softmax probability of the top class, not a logit or a count")
    return p


def check_num_classes(num_classes: object) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise CertssbError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return int(num_classes)


# ----------------------------------------------------------------------------- quantile
def phi_inv(p: Tensor) -> Tensor:
    """Standard normal quantile PhiInv(p) = sqrt(2) * erfinv(2p - 1), elementwise.

    Thin wrapper of `torch.special.ndtri`: differentiable (dPhiInv/dp = 1 / phi(PhiInv(p))),
    any float dtype and device, same shape. PhiInv(0) = -inf, PhiInv(1) = +inf: callers clamp.
    """
    return torch.special.ndtri(p)


# ----------------------------------------------------------------------------- radii
def certified_radius(pa_lower: Tensor, sigma: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
    """Certified L2 radius from a lower bound on pA.

    pb_upper = 1 - pa_lower (sound for any number of classes: pB <= 1 - pA), and
    radius = sigma / 2 * (PhiInv(pa_lower) - PhiInv(pb_upper)) = sigma * PhiInv(pa_lower).
    abstain = pa_lower <= 1/2, with radius = 0 there. Before PhiInv, pa_lower is clamped to
    [1/2, PA_MAX] (PA_MAX = 1 - 1e-12), so pa_lower == 1 gives the finite radius
    ~7.03 * sigma and no NaN/inf ever appears. pb_upper is returned unclamped.

    Args:
        pa_lower: values in [0, 1], any shape.
        sigma: noise level(s) in (0, SIGMA_MAX], broadcastable to pa_lower.
    Returns:
        (radius, pb_upper, abstain): float64, float64, bool, of the broadcast shape.
    """
    pa = _check_pa_lower(pa_lower).to(torch.float64)
    sigma = _check_sigma(sigma).to(device=pa.device, dtype=torch.float64)
    pa, sigma = torch.broadcast_tensors(pa, sigma)
    pb_upper = 1.0 - pa
    abstain = pa <= 0.5
    pa_c = pa.clamp(0.5, PA_MAX)
    # sigma * rho with rho = (PhiInv(pa) - PhiInv(1 - pa)) / 2, in this order (as the kernels):
    # sigma / 2 would lose the last bits of a subnormal sigma.
    radius = sigma * ((phi_inv(pa_c) - phi_inv(1.0 - pa_c)) / 2.0)
    radius = torch.where(abstain, torch.zeros_like(radius), radius)
    return radius, pb_upper, abstain


def conservative_radius(pa_lower: Tensor, sigma_x: Tensor | float, sigma_train_min: float) -> Tensor:
    """Isotropic radius implied by the anisotropic joint Gaussian (docs/THEORY.md).

    rho = (PhiInv(pa_lower) - PhiInv(1 - pa_lower)) / 2 certifies every joint perturbation with
    sum_i ||d_i||^2 / sigma_i^2 + ||d||^2 / sigma_x^2 < rho^2, hence every one of L2 norm
    < rho * min(sigma_x, min_i sigma_i). 0 where pa_lower <= 1/2; same clamp as
    `certified_radius`. Returns float64 of the broadcast shape.
    """
    if (isinstance(sigma_train_min, bool) or not isinstance(sigma_train_min, numbers.Real)
            or not math.isfinite(float(sigma_train_min)) or float(sigma_train_min) <= 0):
        raise CertssbError(f"sigma_train_min must be a finite number > 0, got {sigma_train_min!r}; "
                           "pass the smallest training-sample sigma")
    sigma_x = _check_sigma(sigma_x, "sigma_x")
    pa = _check_pa_lower(pa_lower).to(torch.float64)
    sig = sigma_x.to(device=pa.device, dtype=torch.float64).clamp(max=float(sigma_train_min))
    # certified_radius(pa, s) = rho * s, so reuse it with the effective sigma.
    return certified_radius(pa, sig)[0]


def poison_budget(radius: Tensor, delta: float, test_norm: Optional[Tensor] = None) -> Tensor:
    """Number of poisoned training samples a certificate covers for a trigger of L2 norm delta.

    The joint perturbation of r poisoned training inputs (each trigger of norm at most delta)
    plus the test input's trigger (norm t) has norm sqrt(r delta^2 + t^2); it is covered when
    that is < radius (strict). Returns the largest integer r >= 0 with that property, and -1
    where even r = 0 fails (radius <= t). Without `test_norm`, t = delta (an additive trigger,
    whose nominal norm bounds every image's). Evaluated exactly in float64 (the closed form
    is corrected by direct checks of the defining inequality, so equality is never counted).

    Args:
        radius: finite radii >= 0, any shape.
        delta: the largest trigger norm of a poisoned training input, > 0.
        test_norm: the norm of each test input's own trigger (radius's shape), finite, >= 0;
            a patch or a blend changes each image by a different amount (docs/THEORY.md section 9).
    Returns:
        int64 tensor of radius's shape and device.
    """
    if (isinstance(delta, bool) or not isinstance(delta, numbers.Real)
            or not math.isfinite(float(delta)) or float(delta) < 0):
        raise CertssbError(f"delta (the trigger's L2 norm) must be a finite number >= 0, got {delta!r}")
    if float(delta) == 0.0:
        raise CertssbError("delta = 0 makes the poison budget unbounded; pass the trigger's "
                           "actual (positive) L2 norm")
    delta = float(delta)
    r64 = _as_tensor(radius, "radius").to(torch.float64)
    if r64.numel() and not bool((torch.isfinite(r64) & (r64 >= 0)).all()):
        raise CertssbError("radius must be finite and >= 0; compute it with certified_radius()")
    if test_norm is not None:
        return _budget_with_test_norm(r64, delta, test_norm)
    q = (r64 / delta).square().clamp(max=2.0**52)
    # First guess: the largest integer r with r + 1 < q is ceil(q) - 2.
    r = torch.ceil(q) - 2.0
    r = r.clamp(min=-1.0)
    # Fix rounding at the boundary using the defining inequality itself.
    for _ in range(2):
        bad = (r >= 0) & ~(delta * torch.sqrt(r + 1.0) < r64)
        r = torch.where(bad, r - 1.0, r)
        more = delta * torch.sqrt(r + 2.0) < r64
        r = torch.where(more, r + 1.0, r)
    return r.to(torch.int64)



def _budget_with_test_norm(r64: Tensor, delta: float, test_norm: Tensor) -> Tensor:
    """poison_budget with each row's own test-trigger norm t: largest r with r delta^2 + t^2 < R^2."""
    t = _as_tensor(test_norm, "test_norm").to(device=r64.device, dtype=torch.float64)
    if t.shape != r64.shape:
        raise CertssbError(f"test_norm must have the radius's shape {list(r64.shape)}, got {list(t.shape)}")
    if t.numel() and not bool((torch.isfinite(t) & (t >= 0)).all()):
        raise CertssbError("test_norm (each test input's trigger norm) must be finite and >= 0")
    d2 = delta * delta

    def covered(r: Tensor) -> Tensor:
        return torch.sqrt(r * d2 + t * t) < r64

    q = ((r64.square() - t.square()) / d2).clamp(min=-1.0, max=2.0**52)
    r = (torch.ceil(q) - 1.0).clamp(min=-1.0)  # first guess: the largest integer below q
    for _ in range(2):
        bad = (r >= 0) & ~covered(r.clamp(min=0.0))
        r = torch.where(bad, r - 1.0, r)
        more = covered(r + 1.0)
        r = torch.where(more, r + 1.0, r)
    return r.to(torch.int64)

def radius_proxy(mean_probs: Tensor, sigma: Tensor | float,
                 clamp: tuple[float, float] = (0.02, 0.98)) -> Tensor:
    """Differentiable radius proxy r(x, sigma) = sigma / 2 * (PhiInv(pA) - PhiInv(pB)).

    pA, pB are the top-2 entries of `mean_probs` (ties broken by the lowest class index),
    each clamped to `clamp` (default [0.02, 0.98], as the original code) before PhiInv.
    Differentiable with respect to both `mean_probs` and `sigma` (the gradient of a clamped
    entry is 0 outside the clamp range); used by the sigma optimization's gradient ascent.

    Args:
        mean_probs: [B, C] (C >= 2) mean softmax probabilities, float dtype.
        sigma: [B] or scalar noise levels > 0.
        clamp: (lo, hi) with 0 < lo < hi < 1.
    Returns:
        [B] tensor in the promoted dtype of the inputs.
    """
    lo, hi = (float(c) for c in clamp)
    if not (0.0 < lo < hi < 1.0):
        raise CertssbError(f"clamp must satisfy 0 < lo < hi < 1, got {clamp!r}; the default is (0.02, 0.98)")
    sigma = _check_sigma(sigma)
    _, pa, _, pb = top2(mean_probs)
    pa = pa.clamp(lo, hi)
    pb = pb.clamp(lo, hi)
    return sigma / 2 * (phi_inv(pa) - phi_inv(pb))


def top2(scores: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top class and runner-up of each row, ties broken by the LOWEST class index.

    Args:
        scores: [B, C] real tensor, C >= 2, no NaN.
    Returns:
        (top class int64 [B], top value [B], runner-up class int64 [B], runner-up value [B]);
        values are gathered from `scores`, so they carry its dtype and gradient. When the two
        largest values are equal, the top class is the lower index and the runner-up the next
        lowest index holding that value.
    """
    if not isinstance(scores, Tensor) or scores.dim() != 2 or scores.shape[1] < 2:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise CertssbError(f"scores must be a [B, C] tensor with C >= 2 classes, got {shape}")
    if scores.dtype == torch.bool or scores.is_complex():
        raise CertssbError(f"scores must be real numbers (probabilities, logits or counts), got {scores.dtype}")
    if scores.is_floating_point() and bool(torch.isnan(scores).any()):
        raise CertssbError("scores contain NaN; check the model outputs (diverged training?)")
    s = scores.detach()
    # torch.topk does not promise any tie order: build explicit "is maximal" masks and take
    # their first True position instead.
    ar = torch.arange(s.shape[1], device=s.device)
    big = torch.iinfo(torch.int64).max

    def first_true(mask: Tensor) -> Tensor:
        return torch.where(mask, ar, torch.full_like(ar, big)).min(dim=1).values

    top = first_true(s == s.max(dim=1, keepdim=True).values)
    not_top = ar[None, :] != top[:, None]
    # Runner-up: maximal among the other classes (works with +-inf entries too).
    lowest = -math.inf if s.is_floating_point() else torch.iinfo(s.dtype).min
    masked = torch.where(not_top, s, torch.full_like(s, lowest))
    second_val = masked.max(dim=1, keepdim=True).values
    second = first_true((masked == second_val) & not_top)
    v1 = scores.gather(1, top[:, None]).squeeze(1)
    v2 = scores.gather(1, second[:, None]).squeeze(1)
    return top, v1, second, v2
