"""Explicit registries with uniform names (techniques, model families, metrics)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from sdtune.errors import UserError

T = TypeVar("T")


class RegistryError(UserError, KeyError):
    """An unknown or duplicate registry name; the message lists the valid choices."""

    def __str__(self) -> str:  # KeyError quotes its message; we want a plain line
        return str(self.args[0])


class Registry(Generic[T]):
    """A name → object map that rejects duplicates and lists the choices in its errors."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@TECHNIQUES.register("lora")``."""

        def add(item: T) -> T:
            if name in self._items:
                raise RegistryError(f"{self.what} {name!r} is registered twice")
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        if name not in self._items:
            raise RegistryError(f"unknown {self.what} {name!r}; choose one of: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
