"""The console script's entry point, kept free of imports.

Importing the command line (click, orjson, the store) takes a tenth of a second; a
Ctrl+C in that window would print a KeyboardInterrupt traceback from deep inside
an import. Here it ends as any other interrupted command does: one line, exit 130.
"""

from __future__ import annotations

import os
import sys

from gapfill.importing import ImportsWithoutGc

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing (and re, contextlib) is imported by the CLI, without collector passes
    from typing import NoReturn


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
