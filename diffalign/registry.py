"""A tiny name -> object registry filled by explicit imports.

Each kind (objectives, rewards, samplers) owns one ``Registry``; the kind's package ``__init__``
imports every implementation module, so the ``__init__`` *is* the menu. Unknown names fail with
close-match suggestions before anything heavy is loaded.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class UnknownNameError(ConfigError, KeyError):
    """Raised for a name that is not registered; the message names the valid choices."""

    def __str__(self) -> str:  # KeyError would repr() the message, adding quotes
        return str(self.args[0])


def suggest(name: str, choices: list[str]) -> str:
    """One-line hint: close matches first, then every valid choice."""
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"{hint} Valid choices: {', '.join(sorted(choices))}."


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            obj.registered_name = name
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            raise UnknownNameError(f"unknown {self.kind} {name!r}.{suggest(name, self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())
