"""Imports without the cyclic garbage collector (stdlib only: the console script's entry,
the command line and the store use it)."""

from __future__ import annotations

import gc
import sys


class ImportsWithoutGc:
    """A ``with`` block of imports that the cyclic garbage collector does not interrupt.

    Imports allocate hundreds of thousands of objects (modules, classes, functions) and
    free almost none, so each pass of the collector over them finds nothing: ~3.5% of the
    instructions `gapfill enrich` runs before its first RPC call. As a block that imported
    something ends, what exists then is frozen (``gc.freeze``: moved where no pass looks),
    and the collector is enabled again (if it was), whatever ends the block: enabled with
    the objects the block made still young, its next pass walked them all, and the first
    full pass of a run every object of the imports again. What freezing keeps that a pass
    would have freed is the few cycles the imports left behind, once (~1,600 objects, ~0.35
    MB at an `enrich`'s start), not a run's garbage: a block that imported nothing (its
    modules loaded already: a second store opened) freezes nothing.
    """

    def __enter__(self) -> None:
        self._was = gc.isenabled()
        self._modules = len(sys.modules)
        gc.disable()

    def __exit__(self, *exc: object) -> None:
        if self._was:
            if len(sys.modules) != self._modules:
                gc.freeze()
            gc.enable()
