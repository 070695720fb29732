"""One registry type for every plug-in family: models, attacks, training objectives,
distillation methods, purifier methods, runner backends and export precisions.

A :class:`Registry` maps a name to an entry (a class or a factory) and a one-line description.
The description is given at registration or taken from the first line of the entry's docstring.
The CLI builds its choices and help text from the registries, so adding a plug-in is one module
that registers itself, plus its tests::

    ATTACKS = Registry[type[Attack]]("attack")

    @ATTACKS.register("pgd")
    class PGD(Attack):
        \"\"\"Projected gradient descent (Madry et al., 2018).\"\"\"

A registry is a read-only :class:`~collections.abc.Mapping` in registration order, so
``name in REG``, ``REG[name]`` and ``list(REG)`` work as they do on a dict. :meth:`Registry.get`
is the lookup for user input: an unknown name raises a one-line
:class:`~advedge.errors.UsageError` with a close-match suggestion.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar, overload

from advedge.errors import UsageError, did_you_mean

__all__ = ["Registry", "first_doc_line"]

T = TypeVar("T")


def first_doc_line(obj: object) -> str:
    """The first line of ``obj``'s docstring, or ``""``."""
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0].strip() if doc.strip() else ""


class Registry(Mapping[str, T], Generic[T]):
    """Names to entries of one plug-in family, each with a one-line description.

    Args:
        family: What an entry is, for error messages (``"attack"`` gives "unknown attack 'x'").
    """

    def __init__(self, family: str) -> None:
        self.family = family
        self._entries: dict[str, T] = {}
        self._descriptions: dict[str, str] = {}

    @overload
    def register(self, name: str, entry: T, *, description: str | None = None) -> T: ...

    @overload
    def register(
        self, name: str, entry: None = None, *, description: str | None = None
    ) -> Callable[[T], T]: ...

    def register(
        self, name: str, entry: T | None = None, *, description: str | None = None
    ) -> T | Callable[[T], T]:
        """Register ``entry`` under ``name``; without ``entry``, a decorator that does so.

        Raises:
            ValueError: ``name`` is already registered (two plug-ins must not share a name).
        """

        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.family} {name!r} is already registered")
            self._entries[name] = obj
            self._descriptions[name] = (
                description if description is not None else first_doc_line(obj)
            )
            return obj

        return add if entry is None else add(entry)

    def get(self, name: str) -> T:  # type: ignore[override]
        """The entry named ``name``.

        Raises:
            UsageError: no such entry; the message suggests the closest name.
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name from a hostile file
            raise UsageError(
                f"unknown {self.family} {name!r}", did_you_mean(str(name), self._entries)
            ) from None

    def description(self, name: str) -> str:
        """The one-line description of ``name``."""
        self.get(name)
        return self._descriptions[name]

    def names(self) -> list[str]:
        """Every name, in registration order."""
        return list(self._entries)

    def choices(self, sep: str = "|") -> str:
        """The names joined for a CLI metavar or help line: ``"a|b|c"``."""
        return sep.join(self._entries)

    def copy(self) -> Registry[T]:
        """A new registry with the same entries (tests register into a copy)."""
        new: Registry[T] = Registry(self.family)
        new._entries = dict(self._entries)
        new._descriptions = dict(self._descriptions)
        return new

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.family!r}, {list(self._entries)})"
