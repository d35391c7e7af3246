"""Confidence bounds on pA: the registry and the shipped bounds, one file each.

- "hoeffding" (hoeffding.py): Hoeffding on the mean soft vote (RAB, the paper);
- "clopper-pearson" (clopper_pearson.py): the exact binomial bound on the hard vote
  count, at level alpha / num_classes (Bonferroni over the classes).

Adding a bound: a file here that defines its pA_lower and calls
`register_bound(BoundSpec(name, SOFT or HARD, lower, kernel=None))`, plus its import
line below. Without a native kernel id it certifies on the reference path under either
backend; --bound, RunConfig and the experiment files accept it once it is imported.
The arithmetic after pA_lower (radius, poison budget, ...) is `certssb.core.radius`,
re-exported here.
"""
from __future__ import annotations

from ...core.radius import (HARD, PA_MAX, SIGMA_MAX, SOFT, certified_radius, conservative_radius, phi_inv,
                      poison_budget, radius_proxy, top2)
from .registry import BOUNDS, BoundSpec, bound_names, get_bound, pa_lower, register_bound, unregister_bound

# the shipped bounds, in the order --bound lists them
from .hoeffding import hoeffding_lower  # noqa: E402
from .clopper_pearson import clopper_pearson_lower  # noqa: E402

__all__ = [
    "BOUNDS", "BoundSpec", "SOFT", "HARD", "register_bound", "unregister_bound", "get_bound", "bound_names",
    "pa_lower", "hoeffding_lower", "clopper_pearson_lower",
    "PA_MAX", "SIGMA_MAX", "phi_inv", "certified_radius", "conservative_radius", "poison_budget",
    "radius_proxy", "top2",
]
