"""The console script's entry point: a Ctrl+C while the CLI is still importing."""

from __future__ import annotations

import subprocess
import sys

_INTERRUPT_IMPORT = """
import builtins
real_import = builtins.__import__
def interrupted(name, *args, **kwargs):
    if name == "gapfill.cli":
        raise KeyboardInterrupt
    return real_import(name, *args, **kwargs)
builtins.__import__ = interrupted
from gapfill._entry import main
main()
"""


def test_ctrl_c_while_importing_ends_in_one_line_and_130() -> None:
    r = subprocess.run([sys.executable, "-c", _INTERRUPT_IMPORT], capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 130
    # A bare "interrupted" left open whether anything had been written.
    assert r.stderr == "interrupted before the command started: nothing was done; run it again\n"


def test_entry_point_runs_the_cli() -> None:
    r = subprocess.run([sys.executable, "-c", "from gapfill._entry import main; main()", "--version"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0 and "gapfill, version" in r.stdout


def test_reading_commands_do_not_load_the_rpc_stack() -> None:
    """status, runs and failures only read the database: aiohttp (~0.15 s) and pycryptodome
    (~13 ms) stay unloaded until a command talks to a node or hashes."""
    code = ("import sys; from gapfill.cli import cli; "
            "print(sorted(m for m in ('aiohttp', 'Crypto', 'gapfill.rpc.client') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_a_run_in_one_process_does_not_load_multiprocessing() -> None:
    """The engine imports multiprocessing only where a concurrent run starts its workers:
    batch and sequential runs never do, and it was a fixed cost of every small run's start."""
    code = ("import sys; import gapfill.engine.run; "
            "print('multiprocessing' in sys.modules)")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


_COLLECTIONS_IN_IMPORTS = """
import gc, sys
during, started = [], []
def seen(phase, info):
    cli = sys.modules.get("gapfill.cli")
    if phase == "start" and started and (cli is None or not hasattr(cli, "main")):
        during.append(info["generation"])
gc.callbacks.append(seen)
gc.set_threshold(50)  # a pass every 50 allocations, so that any import would meet one
import atexit
atexit.register(lambda: print("collections while importing:", len(during), "enabled:", gc.isenabled(),
                              "frozen:", gc.get_freeze_count() > 0))
from gapfill._entry import main
started.append(True)
main()
"""


def test_the_cli_is_imported_without_collector_passes_and_the_collector_runs_after() -> None:
    r = subprocess.run([sys.executable, "-c", _COLLECTIONS_IN_IMPORTS, "--version"], capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    # What the imports made is frozen: the collector's next passes do not walk it again.
    assert "collections while importing: 0 enabled: True frozen: True" in r.stdout
