"""Hoeffding's bound on the mean soft vote (RAB, the paper)."""
from __future__ import annotations

import math

from torch import Tensor

from ...core.radius import SOFT, check_alpha, check_m, check_scores
from .registry import BoundSpec, register_bound

__all__ = ["hoeffding_lower"]


def hoeffding_lower(p_hat: Tensor, m: int, alpha: float) -> Tensor:
    """One-sided Hoeffding lower confidence bound on the mean of m iid variables in [0, 1].

    With probability at least 1 - alpha over the draws, the true mean p satisfies
    p >= p_hat - sqrt(ln(1/alpha) / (2 m)). The result is clamped to [0, 1].

    Args:
        p_hat: empirical means, any shape, values in [0, 1] (1e-6 rounding tolerated).
        m: number of averaged variables (models), >= 1.
        alpha: failure probability in (0, 1).
    Returns:
        float64 tensor of p_hat's shape and device.
    """
    m = check_m(m)
    alpha = check_alpha(alpha)
    p_hat = check_scores(p_hat, "p_hat")
    width = math.sqrt(math.log(1.0 / alpha) / (2.0 * m))
    return (p_hat - width).clamp(0.0, 1.0)


def _pa_lower(top_score: Tensor, m: int, alpha: float, num_classes: int) -> Tensor:
    return hoeffding_lower(top_score, m, alpha)


register_bound(BoundSpec("hoeffding", SOFT, _pa_lower, kernel="hoeffding"))
