"""The read-only commands at scale, with fresh statistics: `status`, `runs`, `failures`,
`enrich --dry-run` and the planning step, on ~1M synthetic refs over several contracts.

    .venv/bin/python bench/read_scale.py populate DB_URL --dir DIR  # refs by `gapfill import`, rows
                                                                    # by SQL, then ANALYZE
    .venv/bin/python bench/read_scale.py time DB_URL    # each command, best of --tries
    .venv/bin/python bench/read_scale.py plan DB_URL    # store.plan of every contract (writes batches)

DB_URL: an empty PostgreSQL database, or a SQLite file not there yet (sqlite:///PATH).
Contracts (refs, share of them stored): 400,000 at 90%, 300,000 at 50%, 200,000 at 100%,
100,000 at 70%, and one with no refs; 3,000 permanent failure records and 500 transient
ones among the refs not stored; 50 runs of 2,000 done batches each. Hashes are random
(``store_scale._hash``), as real ones are. Each step prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from gapfill.store import open_store

sys.path.insert(0, str(Path(__file__).parent))
from store_scale import CHAIN_ID, REFS_PER_BLOCK, _hash

#: (address, refs, per mille of them stored)
CONTRACTS = [
    ("0x" + "a1" * 20, 400_000, 900),
    ("0x" + "a2" * 20, 300_000, 500),
    ("0x" + "a3" * 20, 200_000, 1000),
    ("0x" + "a4" * 20, 100_000, 700),
    ("0x" + "a5" * 20, 0, 0),
]
FAILED_PERMANENT = 3_000
FAILED_TRANSIENT = 500
RUNS = 50
BATCHES_PER_RUN = 2_000
GAPFILL = str(Path(sys.executable).with_name("gapfill"))


def _gapfill(url: str, *args: str) -> str:
    out = subprocess.run([GAPFILL, "--db", url, *args], check=True, capture_output=True, text=True)
    return (out.stdout + out.stderr).strip()


def _execute(url: str, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
    if url.startswith("sqlite:"):
        conn = sqlite3.connect(url.split("///", 1)[1])
        with conn:
            for sql, params in statements:
                conn.execute(sql, params)
        conn.close()
        return
    with psycopg.connect(url) as pg:
        for sql, params in statements:
            pg.execute(sql.replace("?", "%s"), params)


def populate(url: str, workdir: Path) -> dict[str, object]:
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    first = 0
    stored: list[tuple[str, tuple[Any, ...]]] = []
    for address, n, per_mille in CONTRACTS:
        _gapfill(url, "contract", "add", address, "--chain-id", str(CHAIN_ID))
        if not n:
            continue
        path = workdir / f"refs_{address[:6]}.csv"
        with path.open("w") as f:
            f.write("hash,block_number\n")
            for i in range(first, first + n):
                # One ref in 1,000 of unknown block, as an import of bare hashes leaves them.
                block = "" if i % 1000 == 7 else str(1_000_000 + i // REFS_PER_BLOCK)
                f.write(f"0x{_hash(i)},{block}\n")
        _gapfill(url, "import", str(path), "--contract", address)
        path.unlink()
        # The stored share: the refs whose hash ends below the cut (not its start: walks in
        # hash order would find every stored ref first).
        stored.append((
            "INSERT INTO transactions (chain_id, tx_hash, block_number, block_hash, tx_index, "
            "from_address, to_address, value, input, nonce, gas, tx_type, gas_used, cumulative_gas_used) "
            "SELECT chain_id, tx_hash, COALESCE(block_number, 0), '0x00', 0, '0x00', contract, 0, '0x', 0, "
            "21000, 2, 21000, 21000 FROM refs WHERE chain_id = ? AND contract = ? "
            "AND substr(tx_hash, 64, 3) < ?",
            (CHAIN_ID, address, format(per_mille * 4096 // 1000, "03x") if per_mille < 1000 else "g"),
        ))
        first += n
    # Failures among the refs not stored: the first hashes after the stored share's cut.
    failures = (
        "INSERT INTO failures (chain_id, tx_hash, contract, reason, attempts, last_error) "
        "SELECT r.chain_id, r.tx_hash, r.contract, ?, 1, 'synthetic' FROM refs r "
        "WHERE r.chain_id = ? AND r.contract = ? AND NOT EXISTS (SELECT 1 FROM transactions t "
        "WHERE t.chain_id = r.chain_id AND t.tx_hash = r.tx_hash) "
        "AND NOT EXISTS (SELECT 1 FROM failures f WHERE f.chain_id = r.chain_id AND f.tx_hash = r.tx_hash) "
        "ORDER BY r.tx_hash LIMIT ?"
    )
    stored.append((failures, ("not_found", CHAIN_ID, CONTRACTS[0][0], FAILED_PERMANENT // 2)))
    stored.append((failures, ("not_found", CHAIN_ID, CONTRACTS[1][0], FAILED_PERMANENT // 2)))
    stored.append((failures, ("retrying", CHAIN_ID, CONTRACTS[1][0], FAILED_TRANSIENT)))
    for run in range(1, RUNS + 1):
        stored.append((
            "INSERT INTO runs (started_at, finished_at, host, mode, workers, state, processed, "
            "failed, rpc_calls) VALUES (?, ?, 'bench', 'batch', 1, 'done', 1000, 0, 2000)",  # ids 1-50
            (1.7e9 + run * 100, 1.7e9 + run * 100 + 50),
        ))
    _execute(url, stored)
    batches = [(
        "INSERT INTO batches (run_id, chain_id, contract, lo_block, lo_tx, hi_block, hi_tx, size, state, "
        "attempts, succeeded) VALUES (?, ?, ?, ?, '0x00', ?, '0xff', 500, 'done', 1, 500)",
        (run, CHAIN_ID, CONTRACTS[run % 4][0], b, b + 1),
    ) for run in range(1, RUNS + 1) for b in range(BATCHES_PER_RUN)]
    _execute(url, batches)
    if url.startswith("sqlite:"):
        _execute(url, [("ANALYZE", ())])
    else:
        with psycopg.connect(url, autocommit=True) as pg:
            pg.execute("VACUUM ANALYZE")
    return {"step": "populate", "seconds": time.perf_counter() - t0}


COMMANDS = {
    "status": ["status"],
    "status --json": ["status", "--json"],
    "status --contract (90%)": ["status", "--contract", CONTRACTS[0][0]],
    "runs": ["runs"],
    "failures": ["failures"],
    "failures --contract (50%)": ["failures", "--contract", CONTRACTS[1][0]],
    "enrich --dry-run": ["enrich", "--dry-run"],
    "enrich --dry-run --retry-failed": ["enrich", "--dry-run", "--retry-failed"],
}


def time_commands(url: str, tries: int) -> dict[str, object]:
    out: dict[str, object] = {"step": "time"}
    for name, args in COMMANDS.items():
        best = float("inf")
        for _ in range(tries):
            t0 = time.perf_counter()
            subprocess.run([GAPFILL, "--db", url, *args], check=False, capture_output=True)
            best = min(best, time.perf_counter() - t0)
        out[name] = round(best, 3)
    return out


def plan(url: str) -> dict[str, object]:
    with open_store(url) as store:
        run_id = store.create_run("batch", 1, "bench/read_scale.py")
        t0 = time.perf_counter()
        info = store.plan(run_id, [(CHAIN_ID, c[0]) for c in CONTRACTS], 500)
        secs = time.perf_counter() - t0
    return {"step": "plan", "seconds": secs, "batches": info.batches, "refs": info.refs}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("step", choices=["populate", "time", "plan"])
    ap.add_argument("db_url")
    ap.add_argument("--dir", type=Path, default=Path(".bench/work/read_scale"))
    ap.add_argument("--tries", type=int, default=3)
    args = ap.parse_args()
    if args.step == "populate":
        out = populate(args.db_url, args.dir)
    elif args.step == "time":
        out = time_commands(args.db_url, args.tries)
    else:
        out = plan(args.db_url)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
