"""Registries by name: the one way metrics, recovery methods and model families are made known.

A registry refuses a second entry under a name it already holds, so a plug-in
cannot silently replace a built-in method, and it words an unknown name as the
same one-line error everywhere (the CLI, `prune`, the ablation). The CLI's
choices, the ablation's and the README's lists are read from here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

from .errors import InvalidRequest

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Named entries in the order they were registered; read-only except through `add`."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name``; a name already taken is refused (a programming error, not a user's)."""
        if name in self._entries:
            raise ValueError(f"a {self.kind} named {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def get_or_refuse(self, name: str) -> T:
        """The entry, or one line that names the choices."""
        if name not in self._entries:
            raise InvalidRequest(f"unknown {self.kind} {name!r}; choose from {', '.join(self._entries)}")
        return self._entries[name]

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"


# The registries themselves live here, below everything that registers into them or reads them,
# so that a request (`config`) can check a name without importing the modules that implement it.
METRICS: Registry = Registry("metric")  # metrics.Metric instances, by name
RECOVERY_METHODS: Registry = Registry("recovery method")  # recovery.base.RecoveryMethod instances, by name
