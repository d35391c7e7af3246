"""The trigger registry: each trigger declares its name, kind and parameters in one place.

A trigger is a `Trigger` subclass (see `certssb.attacks.base`) registered with
`register_trigger`. Adding one takes a new file in this package plus one import line
in ``certssb/attacks/__init__.py``; the CLI's ``--trigger`` choices, `TRIGGERS`,
`RunConfig` validation and ``--trigger-option KEY=VALUE`` then know it.

``additive`` triggers add a perturbation whose strength is the nominal L2 norm
``delta`` (the certificates' poison budget uses it); the others (patches, blends)
ignore ``delta`` and the run measures their L2 norm instead.

Parameters (`TriggerParam`) are the trigger's own settings, settable as
``options`` (``make_trigger(..., options={...})``, ``RunConfig.trigger_options``,
``--trigger-option``). Each has a type (int or float), a default (a value, or a
function of the image shape ``(C, H, W)``) and a check that raises `CertssbError`
and returns the value to use.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..core.registry import Registry
from ..errors import CertssbError


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class TriggerParam:
    """One parameter of a trigger.

    name: the option key; type: ``int`` or ``float`` (a float parameter also
    takes integers); default: a value or ``f(image_shape) -> value``; check:
    ``f(value, image_shape) -> value`` raising CertssbError for a bad value (and
    normalizing it, e.g. to float); help: one line for the CLI and docs.
    """

    name: str
    type: type
    default: Any
    check: Callable[[Any, tuple[int, int, int]], Any]
    help: str = ""

    def default_for(self, image_shape: tuple[int, int, int]) -> Any:
        return self.default(image_shape) if callable(self.default) else self.default


@dataclass(frozen=True)
class TriggerSpec:
    """A registered trigger: its name, class, whether it is additive (nominal L2 norm delta), parameters."""

    name: str
    cls: type
    additive: bool
    params: tuple[TriggerParam, ...] = field(default=())

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)


_TRIGGERS: Registry[TriggerSpec] = Registry("trigger")


def register_trigger(name: str, *, additive: bool, params: tuple[TriggerParam, ...] = ()) -> Callable[[type], type]:
    """Class decorator: register a `Trigger` subclass under ``name``.

    Example (a new file ``certssb/attacks/mytrigger.py``, then ``from . import mytrigger``
    in ``certssb/attacks/__init__.py``)::

        @register_trigger("mytrigger", additive=False,
                          params=(TriggerParam("size", int, 2, _check_size, "patch side"),))
        class MyTrigger(Trigger):
            def _apply(self, out): ...          # out: a clone of the input, [N, C, H, W]
            def _parameters(self): return {"size": self.size}
    """
    def decorate(cls: type) -> type:
        names = [p.name for p in params]
        if len(set(names)) != len(names):
            raise CertssbError(f"trigger {name!r} declares a parameter twice: {names}")
        spec = TriggerSpec(name=name, cls=cls, additive=bool(additive), params=tuple(params))
        _TRIGGERS.add(name, spec)
        cls.spec = spec  # type: ignore[attr-defined]
        return cls
    return decorate


unregister_trigger = _TRIGGERS.remove
get_trigger = _TRIGGERS.get
trigger_names = _TRIGGERS.names


def additive_trigger_names() -> tuple[str, ...]:
    """Names of the registered triggers whose strength is the nominal L2 norm ``delta``."""
    return tuple(n for n, s in _TRIGGERS.items() if s.additive)


def check_trigger_options(name: Optional[str], options: object) -> dict:
    """Validate option keys and value types against the trigger's declared parameters.

    Range checks that need the image shape happen when the trigger is built. ``name``
    None (trigger not chosen yet) checks only that ``options`` is a dict with string keys.
    Returns a copy of ``options``.
    """
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise CertssbError(f"trigger options must be a dict of option name -> value, got {options!r}")
    if name is None:
        return dict(options)
    spec = get_trigger(name)
    for key, value in options.items():
        param = next((p for p in spec.params if p.name == key), None)
        if param is None:
            valid = ", ".join(spec.param_names) or f"none (the {name} trigger takes no options)"
            raise CertssbError(f"unknown option {key!r} for trigger {name!r}; valid options: {valid}")
        ok = is_int(value) if param.type is int else is_real(value) if param.type is float else \
            isinstance(value, param.type)
        if not ok:
            what = {int: "an integer", float: "a number"}.get(param.type, param.type.__name__)
            raise CertssbError(f"trigger option {key} of {name!r} must be {what}, got {value!r}")
    return dict(options)


def describe_options() -> str:
    """One line naming each registered trigger's options, e.g. for the CLI help."""
    parts = [f"{s.name}: " + ", ".join(f"{p.name} ({p.help})" if p.help else p.name for p in s.params)
             for _, s in _TRIGGERS.items() if s.params]
    return "; ".join(parts) or "no registered trigger takes options"


__all__ = ["TriggerParam", "TriggerSpec", "register_trigger", "unregister_trigger", "get_trigger",
           "trigger_names", "additive_trigger_names", "check_trigger_options", "describe_options"]
