"""A smaller `gapfill demo`, end to end: node, chain, discovery, status, enrichment, decoded rows."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(240)
def test_small_demo_runs_end_to_end(tmp_path: Path, anvil_bin: str) -> None:
    gapfill = Path(sys.executable).parent / "gapfill"
    env = {**os.environ, "GAPFILL_ANVIL": anvil_bin}
    r = subprocess.run([str(gapfill), "demo", "--txs", "2000", "--workers", "2"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=220)  # fmt: skip
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    for step in ("1. Starting anvil", "4. Registering", "5. The gap", "6. Enriching", "7. After",
                 "A few decoded transactions", "8. Stopping the node"):  # fmt: skip
        assert step in out, out
    assert "Traceback" not in out
    db = sqlite3.connect(tmp_path / "gapfill-demo.db")
    missing = db.execute(
        "SELECT count(*) FROM refs r WHERE NOT EXISTS "
        "(SELECT 1 FROM transactions t WHERE t.chain_id = r.chain_id AND t.tx_hash = r.tx_hash)"
    ).fetchone()[0]
    refs = db.execute("SELECT count(*) FROM refs").fetchone()[0]
    decoded = db.execute("SELECT count(*) FROM transactions WHERE method_name IS NOT NULL").fetchone()[0]
    db.close()
    assert refs > 1000 and missing == 0 and decoded > 0
