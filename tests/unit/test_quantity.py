"""JSON-RPC quantities read strictly, by every layer that reads a node's answers."""

from __future__ import annotations

from typing import Any

import pytest

from gapfill.quantity import QuantityError, quantity


@pytest.mark.parametrize(("given", "read"), [("0x10", 16), ("0X10", None), ("10", None), ("0x", 0),
                                             (16, 16), (True, None), (None, None), ("0x1_0", None),
                                             (" 0x10", None), ("-0x1", None), ("0xzz", None)])  # fmt: skip
def test_a_quantity_is_0x_hex_or_an_error_naming_the_field(given: Any, read: int | None) -> None:
    if read is not None:
        assert quantity(given, "the head") == read
        return
    with pytest.raises(QuantityError) as info:
        quantity(given, lambda: "the head")
    said = "missing" if given is None else f"{str(given)!r}, not a 0x hex quantity"
    assert str(info.value) == f"the head is {said}"
