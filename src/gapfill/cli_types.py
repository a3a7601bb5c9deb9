"""Option types shared by the CLI modules: ranges a database column can hold, finite floats."""

from __future__ import annotations

import math
from typing import Any

import click

from gapfill.model import BIGINT_MAX


class _StorableInt(click.IntRange):
    """An integer bounded below, and above by what the database can store; the help shows
    the lower bound alone (``x>=1``, not ``1<=x<=9223372036854775807``)."""

    def _describe_range(self) -> str:
        return f"x>={self.min}"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = click.INT.convert(value, param, ctx)
        if rv > BIGINT_MAX:
            self.fail(f"{rv} is larger than the database can store ({BIGINT_MAX}).", param, ctx)
        return super().convert(rv, param, ctx)


def int_range(min: int, max: int = BIGINT_MAX) -> click.IntRange:
    """An integer option bounded below, and above by what the database can store
    (or by ``max``)."""
    if max == BIGINT_MAX:
        return _StorableInt(min=min, max=max)
    return click.IntRange(min=min, max=max)


class FiniteFloatRange(click.FloatRange):
    """A float range that refuses ``nan`` and ``inf`` (``nan`` passes every comparison)."""

    name = "float range"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return v
