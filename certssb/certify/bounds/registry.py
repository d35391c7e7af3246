"""The bound registry: which confidence bounds on pA exist, and `pa_lower` that dispatches on them.

A bound is a `BoundSpec`: its name, the vote statistic it reads (the soft mean
or the hard count of the top class; the statistic also ranks the classes), its
pure-PyTorch lower bound pA_lower(statistic, m, alpha, num_classes), and the id
the native radius op knows it by (None: no native kernel, so it always runs on
the reference path, whatever the backend). pB_upper = 1 - pA_lower for every
bound. One file per bound (certssb/certify/bounds/<name>.py) calls
`register_bound`; the package's __init__ imports it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Iterator

from torch import Tensor

from ...core.registry import Registry
from ...errors import CertssbError
from ...core.radius import SOFT, STATISTICS, STATISTIC_ARGS, check_alpha, check_num_classes

__all__ = ["BoundSpec", "register_bound", "unregister_bound", "get_bound", "bound_names", "BOUNDS",
           "pa_lower"]


@dataclass(frozen=True)
class BoundSpec:
    """One confidence bound on pA, the probability of the top class.

    name: what --bound, RunConfig.bound and the run directory call it.
    statistic: SOFT ("soft": the mean softmax of the top class over the m models, in [0, 1];
        classes ranked by soft votes) or HARD ("hard": the vote count of the top class, in
        [0, m]; classes ranked by hard votes).
    lower: pA_lower(statistic, m, alpha, num_classes) -> float64 tensor of the statistic's shape
        in [0, 1], a (1 - alpha) lower confidence bound on pA. It checks its own statistic
        (alpha and num_classes arrive checked).
    kernel: the bound argument of the native radius op (certssb.kernels.radius.NATIVE_BOUNDS)
        that computes the same pA_lower, or None when there is none.
    """

    name: str
    statistic: str
    lower: Callable[[Tensor, int, float, int], Tensor]
    kernel: str | None = None


_REGISTRY: Registry[BoundSpec] = Registry("bound")


def register_bound(spec: BoundSpec, *, replace: bool = False) -> BoundSpec:
    """Add `spec` to the registry (after the bounds already there); returns it."""
    if not isinstance(spec, BoundSpec):
        raise CertssbError(f"register_bound takes a BoundSpec, got {type(spec).__name__}")
    if not isinstance(spec.name, str) or not spec.name:
        raise CertssbError(f"a bound's name must be a non-empty string, got {spec.name!r}")
    if spec.statistic not in STATISTICS:
        raise CertssbError(f"bound {spec.name!r}: statistic must be one of {', '.join(STATISTICS)}, "
                           f"got {spec.statistic!r}")
    if not callable(spec.lower):
        raise CertssbError(f"bound {spec.name!r}: lower must be a function (statistic, m, alpha, num_classes)")
    return _REGISTRY.add(spec.name, spec, replace=replace)


def unregister_bound(name: str) -> BoundSpec:
    """Remove a registered bound (e.g. one a test or a notebook added); returns its spec."""
    spec = get_bound(name)
    _REGISTRY.remove(name)
    return spec


bound_names = _REGISTRY.names
get_bound = _REGISTRY.get


class _BoundNames(Sequence):
    """A live, read-only view of the registered names that compares equal to the tuple of them."""

    def __getitem__(self, i):
        return bound_names()[i]

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __iter__(self) -> Iterator[str]:
        return iter(bound_names())

    def __contains__(self, name: object) -> bool:
        return name in _REGISTRY

    def __eq__(self, other: object) -> bool:
        return bound_names() == (tuple(other) if isinstance(other, (tuple, list, _BoundNames)) else other)

    def __hash__(self) -> int:
        return hash(bound_names())

    def __repr__(self) -> str:
        return repr(bound_names())


BOUNDS = _BoundNames()


def pa_lower(bound: str, *, top_score: Tensor | None = None, top_count: Tensor | None = None,
             m: int, alpha: float, num_classes: int) -> Tensor:
    """Lower confidence bound on pA, the probability of the (selected) top class, by bound `bound`.

    top_score: the soft mean of the top class (bounds on the SOFT statistic, e.g. "hoeffding");
    top_count: its hard vote count (HARD bounds, e.g. "clopper-pearson"); the other may be None.
    Returns a float64 tensor of the statistic's shape and device.
    """
    spec = get_bound(bound)
    num_classes = check_num_classes(num_classes)
    alpha = check_alpha(alpha)
    stat = top_score if spec.statistic == SOFT else top_count
    if stat is None:
        raise CertssbError(f"bound {spec.name!r} needs {STATISTIC_ARGS[spec.statistic]}")
    return spec.lower(stat, m, alpha, num_classes)

