"""Option types shared by the CLI modules: ranges a database column can hold, finite floats."""

from __future__ import annotations

import math
from typing import Any

import click

from gapfill.model import BIGINT_MAX


class _WholeRange(click.IntRange):
    """An integer range whose refusal of what is not a whole number says so in words (click's
    said "'abc' is not a valid integer range"), as a config file's value is refused."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, int):
            try:
                value = int(value)
            except (TypeError, ValueError):
                self.fail(f"{value!r} is not a whole number.", param, ctx)
        return super().convert(value, param, ctx)


class _StorableInt(_WholeRange):
    """An integer bounded below, and above by what the database can store; the help shows
    the lower bound alone (``x>=1``, not ``1<=x<=9223372036854775807``)."""

    def _describe_range(self) -> str:
        return f"x>={self.min}"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = _WholeRange(min=self.min).convert(value, param, ctx)
        if rv > BIGINT_MAX:
            self.fail(f"{rv} is larger than the database can store ({BIGINT_MAX}).", param, ctx)
        return super().convert(rv, param, ctx)


def int_range(min: int, max: int = BIGINT_MAX) -> click.IntRange:
    """An integer option bounded below, and above by what the database can store
    (or by ``max``)."""
    if max == BIGINT_MAX:
        return _StorableInt(min=min, max=max)
    return _WholeRange(min=min, max=max)


class FiniteFloatRange(click.FloatRange):
    """A float range that refuses ``nan`` and ``inf`` (``nan`` passes every comparison)."""

    name = "float range"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, int | float):
            try:
                float(value)
            except (TypeError, ValueError):  # click's said "'abc' is not a valid float range"
                self.fail(f"{value!r} is not a number.", param, ctx)
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return v


#: The longest :class:`Age` taken, in days (a century): a longer one is a mistyped number
#: (``1`` and 300 zeros was taken, and said "older than 1e+300 days").
AGE_MAX_DAYS = 36_500


class Age(click.ParamType[float]):
    """An age in seconds, given as days (``30``, ``1.5``) or with a unit: ``12h``, ``7d``;
    at most :data:`AGE_MAX_DAYS`."""

    name = "age"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, float):
            return value
        text = str(value).strip().lower()
        number, unit = (text[:-1], text[-1]) if text[-1:] in ("d", "h") else (text, "")
        try:
            n = float(number)
        except ValueError:
            n = math.nan
        if not math.isfinite(n) or n < 0 or not number.replace(".", "", 1).isdigit():
            self.fail(f"{value!r} is not an age: give days (30), or hours or days with h or d (12h, 7d)",
                      param, ctx)  # fmt: skip
        seconds = n * (3_600 if unit == "h" else 86_400)
        if seconds > AGE_MAX_DAYS * 86_400:
            self.fail(f"{value!r} is more than a century: give at most {AGE_MAX_DAYS} days "
                      f"({AGE_MAX_DAYS * 24}h)", param, ctx)  # fmt: skip
        return seconds


def said_age(seconds: float) -> str:
    """An :class:`Age` as a sentence says it: whole days (``30 days``), else whole hours
    (``12 hours``; 1.5 days is ``36 hours``), else days with a fraction (``0.0625 days``)."""
    if seconds % 86_400 == 0:
        return f"{seconds / 86_400:,.0f} day" + ("" if seconds == 86_400 else "s")
    if seconds % 3_600 == 0:
        return f"{seconds / 3_600:,.0f} hour" + ("" if seconds == 3_600 else "s")
    return f"{seconds / 86_400:,.4g} days"
