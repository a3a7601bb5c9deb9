"""``@record``: a frozen dataclass with slots, built with fewer generated methods.

On Python 3.11 ``@dataclass`` compiles each method it writes from source (an ``exec``
each): a frozen one with slots writes six, ~5 M instructions per class, and a run's
start-up made ~57 of them. ``@record`` has ``@dataclass`` write ``__init__`` and the frozen
``__setattr__`` / ``__delattr__`` only; ``__eq__``, ``__hash__`` and ``__repr__`` are shared
functions that do what the generated ones do: compare and hash the tuple of the fields
that take part (``field(compare=False)`` honoured), and show ``Name(field=value, ...)``,
``...`` for a record met again while it is shown. Methods the class defines are kept.
stdlib only: every layer uses it.
"""

from __future__ import annotations

import _thread
from collections.abc import Callable
from dataclasses import dataclass, fields
from operator import attrgetter
from typing import Any, TypeVar, dataclass_transform

T = TypeVar("T")


def _values(names: tuple[str, ...]) -> staticmethod[[Any], tuple[Any, ...]]:
    """The tuple of ``names``' values of a record, as the generated methods build it (a
    static method: a plain function in the class would be bound to the record)."""
    return staticmethod(_getter(names))


def _getter(names: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    if len(names) == 1:
        name = names[0]
        return lambda obj: (getattr(obj, name),)
    if not names:
        return lambda obj: ()
    return attrgetter(*names)


def _eq(self: Any, other: object) -> Any:
    compared = self.__record_compared__
    if other.__class__ is self.__class__:
        return compared(self) == compared(other)
    return NotImplemented


def _hash(self: Any) -> int:
    return hash(self.__record_hashed__(self))


_shown_now: set[tuple[int, int]] = set()


def _repr(self: Any) -> str:
    key = (id(self), _thread.get_ident())
    if key in _shown_now:
        return "..."
    _shown_now.add(key)
    try:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__record_shown__)
    finally:
        _shown_now.discard(key)
    return f"{self.__class__.__qualname__}({shown})"


@dataclass_transform(frozen_default=True)
def record(cls: type[T]) -> type[T]:
    """``@dataclass(frozen=True, slots=True)``, its ``__eq__``, ``__hash__`` and ``__repr__``
    shared instead of compiled per class (see the module's docstring)."""
    made = dataclass(frozen=True, slots=True, eq=False, repr=False)(cls)
    fs = fields(made)  # type: ignore[arg-type]
    setattr(made, "__record_compared__", _values(tuple(f.name for f in fs if f.compare)))  # noqa: B010
    hashed = tuple(f.name for f in fs if (f.compare if f.hash is None else f.hash))
    setattr(made, "__record_hashed__", _values(hashed))  # noqa: B010
    setattr(made, "__record_shown__", tuple(f.name for f in fs if f.repr))  # noqa: B010
    own = cls.__dict__  # the class as written (slots made ``made`` anew)
    if "__eq__" not in own:
        setattr(made, "__eq__", _eq)  # noqa: B010
    # As @dataclass(eq=True, frozen=True): a __hash__ unless the class wrote its own.
    if "__hash__" not in own or (own["__hash__"] is None and "__eq__" in own):
        setattr(made, "__hash__", _hash)  # noqa: B010
    if "__repr__" not in own:
        setattr(made, "__repr__", _repr)  # noqa: B010
    return made
