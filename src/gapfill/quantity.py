"""JSON-RPC quantities (``"0x1a"``) read strictly, for every layer that reads a node's answers.

``int(v, 16)`` alone reads a decimal ``"10"`` as 16, and takes a sign, underscores, spaces
or non-ASCII digits, so a provider's malformed quantity became a wrong number (a block
number, a head, a timestamp) instead of an error. :func:`hex_int` refuses them;
:func:`quantity` also names the field in its error, so that the sentence a user reads says
which value of which answer was bad.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["QuantityError", "hex_int", "quantity"]


class QuantityError(ValueError):
    """A field that should be a JSON-RPC quantity is missing or is not ``0x`` hex; ``str()``
    names the field and the value ("eth_blockNumber's answer is '10', not a 0x hex
    quantity")."""


def hex_int(v: str | None) -> int | None:
    """A JSON-RPC quantity (``"0x1a"``) as an ``int``; ``None`` stays ``None``.

    ``"0x"`` reads as 0, and an ``int`` passes through (a few nodes send
    numbers). Raises ``ValueError`` on any other string and ``TypeError`` on any
    other type: ``int(v, 16)`` alone would read a decimal ``"10"`` as 16, and take
    a sign, underscores, spaces or non-ASCII digits, so a provider's malformed
    quantity would be stored as a wrong value instead of refused.
    """
    if v is None:
        return None
    try:
        n = int(v, 16)
    except TypeError:
        if isinstance(v, int) and not isinstance(v, bool):  # the annotation says str; a few nodes disagree
            return v
        raise TypeError(f"{v!r} is not a quantity (0x hex)") from None
    except ValueError:
        if v == "0x":
            return 0
        raise ValueError(f"{v!r} is not a 0x hex quantity") from None
    # What int(v, 16) reads besides 0x hex (all of it, so a lowercase x is the prefix).
    if v.isalnum() and v.isascii() and "x" in v:
        return n
    raise ValueError(f"{v!r} is not a 0x hex quantity")


def quantity(v: Any, what: str | Callable[[], str], error: type[QuantityError] = QuantityError) -> int:
    """``v`` read by :func:`hex_int`, where ``None`` is no quantity either; else an
    ``error`` whose sentence names ``what`` ("the timestamp of block 5"), or what it returns
    (a hot path's: the name is made only for the error)."""
    try:
        n = hex_int(v)
    except (TypeError, ValueError):
        n = None
    if n is None:
        said = "missing" if v is None else f"{str(v)[:60]!r}, not a 0x hex quantity"
        raise error(f"{what if isinstance(what, str) else what()} is {said}")
    return n
