"""What keeps imports cheap: blocks of them without the cyclic garbage collector, and
regular expressions compiled on their first use (stdlib only: the console script's entry
and every layer use it)."""

from __future__ import annotations

import gc
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # the console script's entry imports this before its pause: nothing more here
    import re
    from typing import Any


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


class _LazyPattern:
    """A regular expression compiled on its first use (see :func:`lazy_pattern`); its
    methods are the compiled pattern's from then on."""

    def __init__(self, pattern: str, flags: int = 0) -> None:
        self._args = (pattern, flags)

    def __getattr__(self, name: str) -> Any:
        import re

        compiled = re.compile(*self._args)
        for method in ("match", "fullmatch", "search", "sub", "subn", "split", "findall", "finditer"):
            setattr(self, method, getattr(compiled, method))
        return getattr(compiled, name)


def lazy_pattern(pattern: str, flags: int = 0) -> re.Pattern[str]:
    """``re.compile(pattern, flags)``, compiled on its first use. For a module's patterns
    that a plain run may never use: redact's 17 (a command uses one to three), the
    PostgreSQL errors' and the RPC errors' (read only when something failed). Compiled at
    import they were ~4% of the instructions `gapfill enrich` runs before its first RPC
    call. Its methods only: it is not a ``re.Pattern`` to ``re.match`` and the like."""
    return _LazyPattern(pattern, flags)  # type: ignore[return-value]
