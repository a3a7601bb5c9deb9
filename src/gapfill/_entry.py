"""The console script's entry point, kept free of imports.

Importing the command line (click, orjson, the store) takes a tenth of a second; a
Ctrl+C in that window would print a KeyboardInterrupt traceback from deep inside
an import. Here it ends as any other interrupted command does: one line, exit 130.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import NoReturn


class ImportsWithoutGc:
    """A ``with`` block of imports that the cyclic garbage collector does not interrupt.

    Imports allocate hundreds of thousands of objects (modules, classes, functions) and
    free almost none, so each pass of the collector over them finds nothing: ~3.5% of the
    instructions `gapfill enrich` runs before its first RPC call. The collector is enabled
    again (if it was) as the block ends, whatever ends it.
    """

    def __enter__(self) -> None:
        self._was = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc: object) -> None:
        if self._was:
            gc.enable()


def main() -> NoReturn:
    try:
        with ImportsWithoutGc():
            from gapfill.cli import main as run
    except KeyboardInterrupt:
        # As other commands stopped by Ctrl+C say what they kept: here, nothing had begun.
        sys.stderr.write("interrupted before the command started: nothing was done; run it again\n")
        sys.stderr.flush()
        os._exit(130)
    run()
