"""Filling ``refs`` and ``coverage``: imports from files, and discovery from the chain."""
