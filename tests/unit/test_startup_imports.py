"""What a command's start-up does not import or read (each one a fixed cost of every run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gapfill.store.base import latest_migration, migrations


def _python(code: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60,
                         check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_latest_schema_version_is_that_of_the_last_migration() -> None:
    for backend in ("sqlite", "postgres"):
        assert latest_migration(backend) == migrations(backend)[-1][0]


def test_opening_a_database_at_the_latest_version_reads_no_migration(tmp_path: Path) -> None:
    # importlib.resources (with zipfile and its readers) is what reading the migrations
    # needs; a database already at the latest version needs neither.
    url = f"sqlite:///{tmp_path / 'g.db'}"
    _python("import sys\nfrom gapfill.store import open_store\nopen_store(sys.argv[1]).close()", url)
    code = (
        "import sys\n"
        "from gapfill.store import open_store\n"
        "with open_store(sys.argv[1]) as s:\n"
        "    print(s.schema_version(), 'importlib.resources' in sys.modules)\n"
    )
    assert _python(code, url) == f"{migrations('sqlite')[-1][0]} False"


def test_the_entry_point_imports_nothing_before_it_pauses_the_collector() -> None:
    # typing (with re and contextlib) met four collector passes before the pause began.
    assert _python("import sys, gapfill._entry\nprint('typing' in sys.modules)") == "False"


_BACKEND_IMPORT = """
import gc, sys
from gapfill.store import open_store
during = []
def seen(phase, info):
    backend = sys.modules.get("gapfill.store.sqlite")
    if phase == "start" and backend is not None and not hasattr(backend, "SqliteStore"):
        during.append(info["generation"])
gc.callbacks.append(seen)
gc.set_threshold(50)  # a pass every 50 allocations, so that any import would meet one
frozen = gc.get_freeze_count()
open_store(sys.argv[1]).close()
print(len(during), gc.get_freeze_count() > frozen, gc.isenabled())
"""


def test_a_backend_is_imported_without_collector_passes_and_its_objects_frozen(tmp_path: Path) -> None:
    """psycopg's ~90 modules met ~50 passes in a PostgreSQL run's start-up. What the import
    made is frozen (``gc.freeze``): no later pass walks it again."""
    assert _python(_BACKEND_IMPORT, f"sqlite:///{tmp_path / 'g.db'}") == "0 True True"


@pytest.mark.parametrize("module", ["gapfill.redact", "gapfill.store.postgres", "gapfill.rpc.classify"])
def test_importing_compiles_none_of_the_modules_patterns(module: str) -> None:
    # redact: a command uses one to three of its 17; the PostgreSQL errors' 16 and the RPC
    # errors' 7 are read only when something failed. Each is compiled on its first use.
    code = (
        "import re, sys, importlib\n"
        "mod = sys.argv[1]\n"
        "parent = mod.rpartition('.')[0]\n"
        "importlib.import_module(parent)\n"  # what the module imports, but for itself
        "import urllib.parse, gapfill.redact, gapfill.records, gapfill.model, gapfill.errors\n"
        "if mod == 'gapfill.store.postgres':\n"
        "    import psycopg, gapfill.store.base, gapfill.store.pg_wait\n"
        "if mod == 'gapfill.rpc.classify':\n"
        "    import gapfill.rpc.tls; gapfill.rpc.tls.aiohttp.ClientError\n"
        "    sys.modules.pop('gapfill.rpc.classify', None)\n"
        "if mod == 'gapfill.redact':\n"
        "    sys.modules.pop('gapfill.redact', None)\n"
        "compiled = []\n"
        "real = re.compile\n"
        "re.compile = lambda *a: compiled.append(a) or real(*a)\n"
        "importlib.import_module(mod)\n"
        "print(len(compiled))\n"
    )
    assert _python(code, module) == "0"


_NOTHING_IMPORTED = """
import gc
from gapfill.importing import ImportsWithoutGc
with ImportsWithoutGc():
    import gapfill.wording
frozen = gc.get_freeze_count()
made = [[i] for i in range(1000)]
with ImportsWithoutGc():
    import gapfill.wording
print(frozen > 0, gc.get_freeze_count() == frozen, gc.isenabled())
"""


def test_an_import_block_that_imports_nothing_freezes_nothing() -> None:
    # A second store opened in one process (its backend loaded already) froze all it had
    # made since: garbage cycles among it would never have been collected.
    assert _python(_NOTHING_IMPORTED) == "True True True"
