"""The exact (Clopper-Pearson) binomial bound on the hard vote count, Bonferroni over the classes."""
from __future__ import annotations

import math

import numpy as np
import scipy.special
import torch
from torch import Tensor

from ...core.radius import HARD, check_alpha, check_counts, check_m
from .registry import BoundSpec, register_bound

__all__ = ["clopper_pearson_lower"]


def clopper_pearson_lower(k: Tensor, m: int, alpha: float) -> Tensor:
    """Exact one-sided (Clopper-Pearson) binomial lower confidence bound.

    For k successes out of m Bernoulli(p) trials, the lower bound is the alpha quantile of
    Beta(k, m - k + 1), and 0 when k == 0; P(bound > p) <= alpha for every p. For k == m it
    equals alpha ** (1 / m). Computed in float64 with `scipy.special.betaincinv` on the CPU.

    Args:
        k: integer-valued counts in [0, m] (any int or float dtype), any shape.
        m: number of trials, >= 1.
        alpha: failure probability in (0, 1).
    Returns:
        float64 tensor of k's shape, on k's device.
    """
    m = check_m(m)
    alpha = check_alpha(alpha)
    return _clopper_pearson_level(check_counts(k, m, "k"), m, alpha)


def _clopper_pearson_level(k: Tensor, m: int, level: float) -> Tensor:
    """`clopper_pearson_lower` at a checked level in [0, 1) (0: alpha / C underflowed; bound 0)."""
    kn = k.detach().to(device="cpu", dtype=torch.float64).numpy()
    out = np.zeros_like(kn)
    pos = kn > 0
    if pos.any() and level > 0:
        # I_x(a, b) = level solved for x: the level quantile of Beta(a, b).
        a, b = kn[pos], m - kn[pos] + 1.0
        q = scipy.special.betaincinv(a, b, level)
        bad = ~((q >= 0) & (q <= 1))  # SciPy gives NaN for tiny levels (Beta(3, 3) at 1e-108)
        if bad.any():
            q[bad] = _beta_quantile_bisect(a[bad], b[bad], level)
        out[pos] = q
    return torch.from_numpy(out).to(k.device)


def _beta_quantile_bisect(a: np.ndarray, b: np.ndarray, level: float) -> np.ndarray:
    """The level quantile of Beta(a, b) by bisection on ln x with SciPy's betainc (accurate down
    to subnormal results), for the levels where betaincinv fails. Returns the lower end of the
    final bracket (never above the quantile, so the bound stays valid); ~1e-20 relative."""
    lo = np.full(a.shape, math.log(5e-324))
    hi = np.zeros(a.shape)
    for _ in range(90):  # a bracket of width 745 in ln x, halved to ~6e-25
        mid = 0.5 * (lo + hi)
        below = scipy.special.betainc(a, b, np.exp(mid)) < level
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
    return np.exp(lo)


def _pa_lower(top_count: Tensor, m: int, alpha: float, num_classes: int) -> Tensor:
    """Level alpha / num_classes: Bonferroni over the classes, because the top class is chosen
    by argmax of the same votes."""
    m = check_m(m)
    # alpha / C may underflow to 0 for a subnormal alpha: the quantile at level 0 is 0, as the kernel
    # gives (clopper_pearson_lower itself would refuse alpha = 0 with a confusing message).
    return _clopper_pearson_level(check_counts(top_count, m, "top_count"), m, alpha / num_classes)


register_bound(BoundSpec("clopper-pearson", HARD, _pa_lower, kernel="clopper-pearson"))
