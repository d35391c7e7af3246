"""One registry type for the four extension points (datasets, triggers, architectures, bounds).

A `Registry` maps names to specs in registration order, refuses a second spec under a
taken name unless asked to replace it, and answers an unknown name with the list of
the registered ones. Each extension point validates its own spec type before `add`
(docs/ARCHITECTURE.md section 3 says where each one lives).
"""
from __future__ import annotations

from typing import Generic, Optional, TypeVar

from ..errors import CertssbError

Spec = TypeVar("Spec")


class Registry(Generic[Spec]):
    """Named specs of one kind ("dataset", "trigger", ...), in registration order."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._specs: dict[str, Spec] = {}

    def add(self, name: str, spec: Spec, *, replace: bool = False) -> Spec:
        """Register `spec` as `name` (a non-empty string) and return it."""
        if not isinstance(name, str) or not name:
            raise CertssbError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if name in self._specs and not replace:
            raise CertssbError(f"{self.kind} {name!r} is already registered; pick another name "
                               "(or pass replace=True to redefine it)")
        self._specs[name] = spec
        return spec

    def remove(self, name: str) -> Optional[Spec]:
        """Unregister `name` (for tests and plugins that registered one); None if it was absent."""
        return self._specs.pop(name, None)

    def names(self) -> tuple[str, ...]:
        return tuple(self._specs)

    def items(self) -> tuple[tuple[str, Spec], ...]:
        """(name, spec) pairs in registration order."""
        return tuple(self._specs.items())

    def get(self, name: str) -> Spec:
        """The spec of `name`; an unknown name raises CertssbError listing the registered ones."""
        spec = self._specs.get(name) if isinstance(name, str) else None
        if spec is None:
            raise CertssbError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self._specs)}")
        return spec

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._specs

    def __len__(self) -> int:
        return len(self._specs)
