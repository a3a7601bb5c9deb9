"""Option types shared by the CLI modules: ranges a database column can hold, finite floats."""

from __future__ import annotations

import math
from typing import Any

import click

from gapfill.model import BIGINT_MAX


def int_range(min: int, max: int = BIGINT_MAX) -> click.IntRange:
    """An integer option bounded below, and above by what the database can store."""
    return click.IntRange(min=min, max=max)


class FiniteFloatRange(click.FloatRange):
    """A float range that refuses ``nan`` and ``inf`` (``nan`` passes every comparison)."""

    name = "float range"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return v
