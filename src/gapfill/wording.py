"""Counts in the sentences a user reads: ``1 RPC call``, ``2,000 RPC calls``."""

from __future__ import annotations


def counted(n: int, noun: str, plural: str = "") -> str:
    """``n`` (with thousands separators) and ``noun``, plural unless ``n`` is 1; ``plural``
    for a noun that does not just take an ``s`` (``counted(1, "batch", "batches")``)."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"
