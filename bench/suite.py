"""gapfill's benchmark suite (run it through bench/run, which sets up the peers' venvs).

For each layout (dense, sparse) it starts ONE anvil, generates the chain, and on
that same chain measures ethereum-etl 2.4.2, cryo 0.3.2, a bare asyncio client
(the fetch-only bound) and gapfill in sequential / batch / concurrent mode on
PostgreSQL and SQLite with the Token and Silent ABIs registered (decoding on).
On the dense chain it also checks gapfill's rows field by field against
ethereum-etl's CSVs and measures end-to-end scaling; without a chain it measures
the store at 1M refs (plan, iter_gap, lease). Every process is measured from the
kernel: wall time, CPU (``wait4`` rusage, so worker processes count), peak RSS per
process (/proc's VmHWM, sampled while it runs; ``wait4``'s ``ru_maxrss`` only where
/proc gave nothing) and the node's own CPU over the same interval.

Outputs: docs/bench/results.json, docs/bench/table.md, docs/bench/throughput.png,
docs/bench/scaling.png (charts drawn by bench/plot.py in .bench/plot); ``--out DIR``
writes them elsewhere (a trial run that must not replace the committed results).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg

from gapfill.testing.anvil import Anvil, find_anvil
from gapfill.testing.chain import ChainSpec, GeneratedChain, generate

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / ".bench"
GAPFILL = str(ROOT / ".venv/bin/gapfill")
PY = str(ROOT / ".venv/bin/python")
ETL = str(BENCH / "etl/bin/ethereumetl")
CRYO_PY = str(BENCH / "cryo/bin/python")
PLOT_PY = str(BENCH / "plot/bin/python")
CLK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
RSS_LIMIT_MB = 300.0

csv.field_size_limit(1 << 30)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- measuring a process tree ---------------------------------------------------------------


def _proc_children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out += [int(x) for x in f.read().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def _proc_tree(pid: int) -> list[int]:
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _proc_children(p)
    return seen


def _proc_cpu_s(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / CLK
    except (OSError, IndexError, ValueError):
        return None


def _proc_hwm_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _proc_role(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"
    if "resource_tracker" in cmd:
        return "mp-resource-tracker"
    if "multiprocessing" in cmd or "spawn_main" in cmd:
        return "worker"
    return "main"


@dataclass
class Measured:
    cmd: list[str]
    wall_s: float
    cpu_s: float  # user + system of the whole process tree (reaped descendants included)
    maxrss_mb: float  # max VmHWM over the tree's processes (/proc); wait4's ru_maxrss if none seen
    rc: int
    stdout: str
    stderr: str
    node_cpu_s: float | None = None
    procs: list[dict[str, Any]] = field(default_factory=list)  # per-process peaks from /proc
    wait4_maxrss_mb: float = 0.0  # an upper bound only: Linux keeps the parent's RSS across fork+exec
    db_cpu_s: float | None = None  # PostgreSQL backends serving the database named in db_tag

    def brief(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("stdout")
        d["stderr"] = self.stderr[-2000:]
        d["cmd"] = " ".join(self.cmd)
        return d


def _pg_backends(db_tag: str) -> dict[int, float]:
    """CPU seconds of the PostgreSQL backends connected to the database ``db_tag``."""
    out: dict[int, float] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if cmd.startswith(b"postgres:") and db_tag.encode() in cmd:
            cpu = _proc_cpu_s(int(d))
            if cpu is not None:
                out[int(d)] = cpu
    return out


def measure(
    cmd: Sequence[str],
    *,
    cwd: Path | None = None,
    node_pid: int | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
    sample_s: float = 0.1,
    db_tag: str | None = None,
) -> Measured:
    """Run ``cmd``: wall and tree CPU from wait4; peak RSS per process from /proc (VmHWM).

    wait4's ru_maxrss is no use for peak RSS here: Linux carries the forking parent's
    high-water mark across exec, so every child would report at least this script's RSS.
    """
    out_f = open(BENCH / "work" / f".out.{os.getpid()}", "w+")  # noqa: SIM115
    err_f = open(BENCH / "work" / f".err.{os.getpid()}", "w+")  # noqa: SIM115
    node0 = _proc_cpu_s(node_pid) if node_pid else None
    t0 = time.perf_counter()
    proc = subprocess.Popen(list(cmd), cwd=cwd, stdout=out_f, stderr=err_f, env=env)
    peaks: dict[int, dict[str, Any]] = {}
    backends: dict[int, list[float]] = {}  # pid -> [first seen, last seen] CPU seconds
    done = threading.Event()

    def sample() -> None:
        n = 0
        while not done.is_set():
            if db_tag:
                for p, cpu in _pg_backends(db_tag).items():
                    backends.setdefault(p, [0.0, cpu])[1] = cpu
            n += 1
            for p in _proc_tree(proc.pid):
                hwm = _proc_hwm_kb(p)
                if hwm is None:
                    continue
                rec = peaks.setdefault(p, {"pid": p, "role": _proc_role(p), "peak_rss_mb": 0.0, "cpu_s": 0.0})
                rec["peak_rss_mb"] = max(rec["peak_rss_mb"], hwm / 1024)
                cpu = _proc_cpu_s(p)
                if cpu is not None:
                    rec["cpu_s"] = cpu
            done.wait(sample_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    node1 = _proc_cpu_s(node_pid) if node_pid else None
    out_f.seek(0)
    err_f.seek(0)
    procs = sorted(peaks.values(), key=lambda r: r["pid"])
    peak = max((r["peak_rss_mb"] for r in procs), default=ru.ru_maxrss / 1024)
    m = Measured(
        list(cmd),
        wall,
        ru.ru_utime + ru.ru_stime,
        peak,
        proc.returncode,
        out_f.read(),
        err_f.read(),
        None if node0 is None or node1 is None else node1 - node0,
        procs,
        ru.ru_maxrss / 1024,
        sum(b[1] - b[0] for b in backends.values()) if db_tag else None,
    )
    out_f.close()
    err_f.close()
    if check and m.rc != 0:
        raise RuntimeError(f"command failed ({m.rc}): {' '.join(cmd)}\n{m.stderr[-3000:]}")
    return m


# -- databases ---------------------------------------------------------------------------


class Databases:
    """Fresh PostgreSQL databases per case (dropped at the end) and SQLite files."""

    def __init__(self, pg_admin: str, workdir: Path, keep: bool) -> None:
        self.pg_admin = pg_admin
        self.workdir = workdir
        self.keep = keep
        self.created: list[str] = []
        self.files: list[Path] = []

    def new(self, backend: str, name: str) -> str:
        tag = f"{name}_{uuid.uuid4().hex[:6]}"
        if backend == "sqlite":
            path = self.workdir / f"{tag}.db"
            for suffix in ("", "-wal", "-shm"):
                Path(str(path) + suffix).unlink(missing_ok=True)
            self.files.append(path)
            return f"sqlite:///{path}"
        db = f"gapfill_bench_{tag}"
        with psycopg.connect(self.pg_admin, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{db}"')
        self.created.append(db)
        return self.pg_admin.rsplit("/", 1)[0] + "/" + db

    def drop_all(self) -> None:
        if self.keep:
            return
        for path in self.files:
            for suffix in ("", "-wal", "-shm"):
                Path(str(path) + suffix).unlink(missing_ok=True)
        self.files.clear()
        with psycopg.connect(self.pg_admin, autocommit=True) as admin:
            for db in self.created:
                admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        self.created.clear()


# -- the chain and what is tracked ----------------------------------------------------------


@dataclass
class Tracked:
    by_contract: dict[str, list[str]]  # contract -> hashes, key order (block, hash)
    block: dict[str, int]

    @property
    def hashes(self) -> list[str]:
        return sorted((h for hs in self.by_contract.values() for h in hs), key=lambda h: (self.block[h], h))

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_contract.values())


def tracked_of(chain: GeneratedChain) -> Tracked:
    """The txs sent straight to Token or to Silent (disjoint sets): ~80% dense, 1-2/block sparse."""

    def order(hs: frozenset[str]) -> list[str]:
        return sorted(hs, key=lambda h: (chain.tx_block[h], h))

    return Tracked(
        {chain.token: order(chain.direct[chain.token]), chain.silent: order(chain.direct[chain.silent])},
        chain.tx_block,
    )


def write_refs(path: Path, hashes: Sequence[str], block: dict[str, int]) -> None:
    with path.open("w") as f:
        f.write("hash,block_number\n")
        for h in hashes:
            f.write(f"{h},{block[h]}\n")


# -- peers ----------------------------------------------------------------------------------


def run_etl(url: str, head: int, hashes_file: Path, out: Path, node_pid: int) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    a = measure(
        [
            ETL,
            "export_receipts_and_logs",
            "--transaction-hashes",
            str(hashes_file),
            "--provider-uri",
            url,
            "--receipts-output",
            str(out / "receipts.csv"),
            "--logs-output",
            str(out / "logs.csv"),
            "--batch-size",
            "100",
            "--max-workers",
            "5",
        ],
        cwd=out,
        node_pid=node_pid,
    )
    b = measure(
        [
            ETL,
            "export_blocks_and_transactions",
            "--start-block",
            "0",
            "--end-block",
            str(head),
            "--provider-uri",
            url,
            "--blocks-output",
            str(out / "blocks.csv"),
            "--transactions-output",
            str(out / "transactions.csv"),
            "--batch-size",
            "100",
            "--max-workers",
            "5",
        ],
        cwd=out,
        node_pid=node_pid,
    )
    return {
        "wall_s": a.wall_s + b.wall_s,
        "cpu_s": a.cpu_s + b.cpu_s,
        "maxrss_mb": max(a.maxrss_mb, b.maxrss_mb),
        "node_cpu_s": (a.node_cpu_s or 0) + (b.node_cpu_s or 0),
        "steps": {"receipts_and_logs": a.brief(), "blocks_and_transactions": b.brief()},
    }


CRYO_SCRIPT = r"""
import os, sys, time, json
t0 = time.perf_counter()
import cryo
t1 = time.perf_counter()
rpc, head = sys.argv[1], int(sys.argv[2])
tx = cryo.collect("transactions", blocks=[f"0:{head + 1}"], rpc=rpc)
logs = cryo.collect("logs", blocks=[f"0:{head + 1}"], rpc=rpc)
t2 = time.perf_counter()
print(json.dumps({"transactions": len(tx), "logs": len(logs), "import_s": t1 - t0, "collect_s": t2 - t1}),
      flush=True)
os._exit(0)
"""


def run_cryo(url: str, head: int, node_pid: int) -> dict[str, Any]:
    m = measure([CRYO_PY, "-c", CRYO_SCRIPT, url, str(head)], node_pid=node_pid)
    info = json.loads(m.stdout.strip().splitlines()[-1])
    return {
        "wall_s": m.wall_s,
        "cpu_s": m.cpu_s,
        "maxrss_mb": m.maxrss_mb,
        "node_cpu_s": m.node_cpu_s,
        "rows": info,
        "steps": {"collect": m.brief()},
    }


def run_bare(url: str, hashes_file: Path, node_pid: int) -> dict[str, Any]:
    m = measure(
        [
            PY,
            str(ROOT / "bench/bare_client.py"),
            "--rpc-url",
            url,
            "--hashes",
            str(hashes_file),
            "--batch",
            "100",
            "--in-flight",
            "8",
        ],
        node_pid=node_pid,
    )
    info = json.loads(m.stdout.strip().splitlines()[-1])
    return {
        "wall_s": m.wall_s,
        "cpu_s": m.cpu_s,
        "maxrss_mb": m.maxrss_mb,
        "node_cpu_s": m.node_cpu_s,
        "inner": info,
        "steps": {"fetch": m.brief()},
    }


# -- gapfill -------------------------------------------------------------------------------


def parse_summary(text: str) -> dict[str, Any]:
    s: dict[str, Any] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("processed:"):
            s["processed"] = int(line.split()[1].replace(",", ""))
        elif line.startswith("failed:"):
            s["failed"] = int(line.split()[1].replace(",", ""))
        elif line.startswith("rate:"):
            s["rate_tx_s"] = float(line.split()[1].replace(",", ""))
        elif line.startswith("calls:"):
            parts = line.split()
            s["calls"] = int(parts[1].replace(",", ""))
            if len(parts) > 4:  # said only when the run stored a transaction
                s["calls_per_tx"] = float(parts[4])
        elif line.startswith("duration:"):
            s["duration"] = line.split(None, 1)[1]
        elif line.startswith("Run #"):
            s["header"] = line
    return s


def setup_gapfill_db(
    db: str, chain: GeneratedChain, refs: dict[str, list[str]], workdir: Path, tag: str
) -> None:
    abis = {chain.token: chain.token_abi, chain.silent: chain.silent_abi}
    for contract, hashes in refs.items():
        if not hashes:
            continue
        abi = workdir / f"{contract}.abi.json"
        abi.write_text(json.dumps(abis[contract]))
        subprocess.run(
            [
                GAPFILL,
                "--db",
                db,
                "contract",
                "add",
                contract,
                "--abi",
                str(abi),
                "--chain-id",
                str(chain.chain_id),
            ],
            check=True,
            capture_output=True,
        )
        f = workdir / f"refs_{tag}_{contract}.csv"
        write_refs(f, hashes, chain.tx_block)
        subprocess.run(
            [GAPFILL, "--db", db, "import", str(f), "--contract", contract], check=True, capture_output=True
        )


def count_rows(db: str) -> dict[str, int]:
    from gapfill.store import open_store

    with open_store(db) as store, store._read() as cur:
        out = {}
        for table in ("transactions", "logs", "failures"):
            cur.execute(f"SELECT count(*) FROM {table}")
            out[table] = int(cur.fetchone()[0])
        return out


def run_gapfill(db: str, url: str, mode: str, node_pid: int, extra: Sequence[str] = ()) -> dict[str, Any]:
    cmd = [GAPFILL, "--db", db, "--rpc-url", url, "enrich", "--mode", mode, "-q", *extra]
    db_tag = db.rsplit("/", 1)[1] if db.startswith("postgres") else None
    m = measure(cmd, node_pid=node_pid, db_tag=db_tag)
    s = parse_summary(m.stderr + "\n" + m.stdout)
    per_proc = {}
    for p in m.procs:
        per_proc.setdefault(p["role"], []).append(round(p["peak_rss_mb"], 1))
    return {
        "wall_s": m.wall_s,
        "cpu_s": m.cpu_s,
        "maxrss_mb": m.maxrss_mb,
        "node_cpu_s": m.node_cpu_s,
        "db_cpu_s": m.db_cpu_s,
        "summary": s,
        "rss_by_role_mb": per_proc,
        "rows": count_rows(db),
        "steps": {"enrich": m.brief()},
    }


# -- field equality against ethereum-etl ----------------------------------------------------


TX_FIELDS = {  # etl transactions.csv column -> gapfill transactions column
    "hash": "tx_hash",
    "nonce": "nonce",
    "block_hash": "block_hash",
    "block_number": "block_number",
    "transaction_index": "tx_index",
    "from_address": "from_address",
    "to_address": "to_address",
    "value": "value",
    "gas": "gas",
    "gas_price": "gas_price",
    "input": "input",
    "block_timestamp": "block_timestamp",
    "max_fee_per_gas": "max_fee_per_gas",
    "max_priority_fee_per_gas": "max_priority_fee_per_gas",
    "transaction_type": "tx_type",
}
RECEIPT_FIELDS = {  # etl receipts.csv column -> gapfill transactions column
    "block_number": "block_number",
    "transaction_index": "tx_index",
    "block_hash": "block_hash",
    "cumulative_gas_used": "cumulative_gas_used",
    "gas_used": "gas_used",
    "contract_address": "created_contract",
    "status": "status",
    "root": "root",
    "effective_gas_price": "effective_gas_price",
}
RECEIPT_EXTRA = {"blob_gas_price": "blob_gas_price", "blob_gas_used": "blob_gas_used"}  # informational
LOG_FIELDS = {"block_number": "block_number", "address": "address", "data": "data"}


def _norm(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int | Decimal):
        return int(v)
    s = str(v).strip()
    if s == "":
        return None
    if s.lstrip("-").isdigit():
        return int(s)
    return s.lower()


def field_equality(db: str, etl_dir: Path, tracked: Sequence[str], max_examples: int = 8) -> dict[str, Any]:
    from gapfill.store import open_store

    want = set(tracked)
    etl_tx = {
        r["hash"]: r for r in csv.DictReader((etl_dir / "transactions.csv").open()) if r["hash"] in want
    }
    etl_rc = {r["transaction_hash"]: r for r in csv.DictReader((etl_dir / "receipts.csv").open())}
    etl_logs: dict[tuple[str, int], dict[str, str]] = {}
    for r in csv.DictReader((etl_dir / "logs.csv").open()):
        etl_logs[(r["transaction_hash"], int(r["log_index"]))] = r
    cols = sorted(set(TX_FIELDS.values()) | set(RECEIPT_FIELDS.values()) | set(RECEIPT_EXTRA.values()))
    ours: dict[str, dict[str, Any]] = {}
    our_logs: dict[tuple[str, int], dict[str, Any]] = {}
    with open_store(db) as store, store._read() as cur:
        cur.execute(f"SELECT {', '.join(cols)} FROM transactions")
        for row in cur.fetchall():
            d = dict(zip(cols, row, strict=True))
            if d["tx_hash"] in want:
                ours[d["tx_hash"]] = d
        lcols = [
            "tx_hash",
            "log_index",
            "block_number",
            "address",
            "topic0",
            "topic1",
            "topic2",
            "topic3",
            "data",
        ]
        cur.execute(f"SELECT {', '.join(lcols)} FROM logs")
        for row in cur.fetchall():
            d = dict(zip(lcols, row, strict=True))
            if d["tx_hash"] in want:
                our_logs[(d["tx_hash"], int(d["log_index"]))] = d

    mism: dict[str, int] = {}
    info_mism: dict[str, int] = {}
    examples: list[dict[str, Any]] = []
    compared = 0

    def bad(kind: str, key: Any, fld: str, theirs: Any, mine: Any, informational: bool = False) -> None:
        target = info_mism if informational else mism
        target[fld] = target.get(fld, 0) + 1
        if len(examples) < max_examples and not informational:
            examples.append({"kind": kind, "key": key, "field": fld, "etl": theirs, "gapfill": mine})

    missing_etl = [h for h in tracked if h not in etl_tx or h not in etl_rc]
    missing_ours = [h for h in tracked if h not in ours]
    for h in tracked:
        if h not in ours or h not in etl_tx or h not in etl_rc:
            continue
        mine = ours[h]
        for ecol, ocol in TX_FIELDS.items():
            compared += 1
            if _norm(etl_tx[h][ecol]) != _norm(mine[ocol]):
                bad("tx", h, f"tx.{ecol}", etl_tx[h][ecol], str(mine[ocol]))
        for ecol, ocol in RECEIPT_FIELDS.items():
            compared += 1
            if _norm(etl_rc[h][ecol]) != _norm(mine[ocol]):
                bad("receipt", h, f"receipt.{ecol}", etl_rc[h][ecol], str(mine[ocol]))
        for ecol, ocol in RECEIPT_EXTRA.items():
            if _norm(etl_rc[h][ecol]) != _norm(mine[ocol]):
                bad("receipt", h, f"receipt.{ecol}", etl_rc[h][ecol], str(mine[ocol]), informational=True)
    etl_keys = {k for k in etl_logs if k[0] in want}
    log_keys_only_etl = sorted(etl_keys - set(our_logs))
    log_keys_only_ours = sorted(set(our_logs) - etl_keys)
    for k in sorted(etl_keys & set(our_logs)):
        e, o = etl_logs[k], our_logs[k]
        for ecol, ocol in LOG_FIELDS.items():
            compared += 1
            if _norm(e[ecol]) != _norm(o[ocol]):
                bad("log", list(k), f"log.{ecol}", e[ecol], str(o[ocol]))
        compared += 1
        theirs = [t for t in e["topics"].split(",") if t]
        mine_t = [o[f"topic{i}"] for i in range(4) if o[f"topic{i}"] is not None]
        if [t.lower() for t in theirs] != [t.lower() for t in mine_t]:
            bad("log", list(k), "log.topics", theirs, mine_t)
    total = (
        sum(mism.values())
        + len(missing_ours)
        + len(missing_etl)
        + len(log_keys_only_etl)
        + len(log_keys_only_ours)
    )
    return {
        "db": db.split("://")[0],
        "tracked": len(tracked),
        "txs_compared": len(tracked) - len(missing_ours),
        "logs_compared": len(etl_keys & set(our_logs)),
        "fields_compared": compared,
        "mismatches": total,
        "by_field": mism,
        "informational_by_field": info_mism,
        "missing_in_gapfill": len(missing_ours),
        "missing_in_etl": len(missing_etl),
        "logs_only_in_etl": len(log_keys_only_etl),
        "logs_only_in_gapfill": len(log_keys_only_ours),
        "examples": examples
        + [{"kind": "missing_tx", "key": h} for h in missing_ours[:3]]
        + [{"kind": "log_only_in_etl", "key": list(k)} for k in log_keys_only_etl[:3]]
        + [{"kind": "log_only_in_gapfill", "key": list(k)} for k in log_keys_only_ours[:3]],
    }


# -- one layout ----------------------------------------------------------------------------


def rates(r: dict[str, Any], n: int) -> dict[str, Any]:
    """tx/s and CPU s per 1,000 tx over ``n`` transactions (wall clock of the process)."""
    r["txs"] = n
    r["tx_s"] = n / r["wall_s"] if r["wall_s"] > 0 else 0.0
    r["cpu_s_per_1k"] = r["cpu_s"] / n * 1000 if n else None
    r["node_cpu_s_per_1k"] = (r["node_cpu_s"] / n * 1000) if (n and r.get("node_cpu_s") is not None) else None
    r["db_cpu_s_per_1k"] = (r["db_cpu_s"] / n * 1000) if (n and r.get("db_cpu_s") is not None) else None
    return r


def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    best = min(runs, key=lambda r: r["wall_s"])
    if len(runs) > 1:
        best["repeats_wall_s"] = [round(r["wall_s"], 3) for r in runs]
    return best


def bench_layout(layout: str, args: argparse.Namespace, dbs: Databases, work: Path) -> dict[str, Any]:
    res: dict[str, Any] = {"layout": layout, "runs": {}}
    lw = work / layout
    shutil.rmtree(lw, ignore_errors=True)
    lw.mkdir(parents=True)
    with Anvil() as node:
        res["anvil_url"] = node.url
        spec = ChainSpec(layout, args.txs)  # type: ignore[arg-type]
        log(f"{layout}: generating {args.txs:,} txs on anvil {node.url} (pid {node.pid})")
        t0 = time.perf_counter()
        chain = generate(node.url, spec)
        res["generate_s"] = time.perf_counter() - t0
        tracked = tracked_of(chain)
        hashes = tracked.hashes
        n = len(hashes)
        blocks = chain.head + 1
        res["chain"] = {
            "txs": len(chain.all_txs),
            "blocks": blocks,
            "head": chain.head,
            "tracked": n,
            "tracked_by_contract": {k: len(v) for k, v in tracked.by_contract.items()},
            "token": chain.token,
            "silent": chain.silent,
            "reverted_tracked": len(set(hashes) & chain.reverted),
        }
        log(
            f"{layout}: {len(chain.all_txs):,} txs in {blocks:,} blocks, {n:,} tracked "
            f"({res['generate_s']:.1f} s)"
        )
        hashes_file = lw / "hashes.txt"
        hashes_file.write_text("\n".join(hashes) + "\n")
        pid = node.pid
        runs = res["runs"]

        # Every tool runs once per round, round after round (not all of one tool's repeats
        # in a row): a shared machine's speed drifts over minutes, and round-robin gives
        # each tool the same share of fast and slow minutes. The fastest try is kept.
        jobs: list[tuple[str, Callable[[int], dict[str, Any]]]] = []
        if not args.skip_peers:
            jobs += [
                ("ethereum-etl",
                 lambda i: rates(run_etl(node.url, chain.head, hashes_file, lw / f"etl{i}", pid), n)),
                ("cryo", lambda i: rates(run_cryo(node.url, chain.head, pid), n)),
                ("bare-client", lambda i: rates(run_bare(node.url, hashes_file, pid), n)),
            ]
        workers = ["--workers", str(args.workers)] if args.workers else []

        def gapfill_job(backend: str, mode: str) -> Callable[[int], dict[str, Any]]:
            subset = mode == "sequential"

            def run(i: int) -> dict[str, Any]:
                db = dbs.new(backend, f"{layout}_{mode}")
                if subset:
                    keep = set(hashes[: args.seq_refs])
                    refs = {c: [h for h in hs if h in keep] for c, hs in tracked.by_contract.items()}
                else:
                    refs = tracked.by_contract
                setup_gapfill_db(db, chain, refs, lw, f"{mode}_{backend}")
                m = n if not subset else min(n, args.seq_refs)
                extra = workers if mode == "concurrent" else []
                r = rates(run_gapfill(db, node.url, mode, pid, extra), m)
                r["db"] = db
                return r

            return run

        for backend in args.backends:
            for mode in args.modes:
                name = f"gapfill-{mode}-{'pg' if backend == 'postgres' else 'sqlite'}"
                jobs.append((name, gapfill_job(backend, mode)))

        tries: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in jobs}
        for i in range(args.repeat):
            for name, job in jobs:
                if i > 0 and name.startswith("gapfill-sequential"):
                    continue  # measured on a subset and extrapolated: once is enough
                log(f"{layout}: {name} (round {i + 1} of {args.repeat})")
                r = job(i)
                tries[name].append(r)
                log(
                    f"{layout}: {name} {r['wall_s']:.2f} s wall, {r['tx_s']:,.0f} tx/s"
                    + (f", {r['summary'].get('calls_per_tx')} calls/tx, rss {r['maxrss_mb']:.0f} MB, "
                       f"rows {r['rows']}" if "summary" in r else "")
                )  # fmt: skip

        if not args.skip_peers:
            runs["ethereum-etl"] = best_of(tries["ethereum-etl"])
            runs["ethereum-etl"]["calls_per_tx"] = (n + blocks) / n  # 1 receipt/tx + 1 full block/block
            runs["ethereum-etl"]["calls_note"] = (
                "derived: one receipt per tracked tx + one full block per block"
            )
            runs["cryo"] = best_of(tries["cryo"])
            runs["cryo"]["calls_per_tx"] = 2 * blocks / n
            runs["cryo"]["calls_note"] = (
                "derived: eth_getBlockByNumber(full) + eth_getBlockReceipts per block"
            )
            runs["bare-client"] = best_of(tries["bare-client"])
            runs["bare-client"]["calls_per_tx"] = 2.0

        keep_db: dict[str, str] = {}
        for name, _ in jobs:
            if not name.startswith("gapfill-"):
                continue
            r = best_of(tries[name])
            keep_db[name] = r["db"]
            if name.startswith("gapfill-sequential") and r["txs"] < n:
                r["extrapolated"] = True
                r["note"] = f"measured on the first {r['txs']:,} refs (key order), rate extrapolated"
            ok = r["rows"]["transactions"] >= r["txs"]
            r["complete"] = ok
            runs[name] = r
            if not ok:
                log(f"{layout}: {name} INCOMPLETE: rows {r['rows']}")

        if layout == "dense":
            for plan in [x for x in args.plan_variants.split(",") if x]:
                name = f"gapfill-batch-pg --plan {plan}"
                db = dbs.new("postgres", f"{layout}_plan_{plan}")
                setup_gapfill_db(db, chain, tracked.by_contract, lw, f"plan_{plan}")
                log(f"{layout}: {name}")
                r = rates(run_gapfill(db, node.url, "batch", pid, ["--plan", plan]), n)
                r["variant"] = True
                r["note"] = "forced call plan, for comparison with the default (auto); not in the verdicts"
                runs[name] = r
                log(
                    f"{layout}: {name} {r['wall_s']:.2f} s wall, {r['tx_s']:,.0f} tx/s, "
                    f"{r['summary'].get('calls_per_tx')} calls/tx, node cpu {r['node_cpu_s']:.1f} s"
                )

        if layout == "dense" and not args.skip_peers:
            res["field_equality"] = {}
            for name in ("gapfill-concurrent-pg", "gapfill-batch-sqlite"):
                if name in keep_db:
                    log(f"{layout}: field equality vs ethereum-etl ({name})")
                    etl_dir = lw / "etl0"
                    res["field_equality"][name] = field_equality(keep_db[name], etl_dir, hashes)
                    fe = res["field_equality"][name]
                    log(
                        f"{layout}: {name}: {fe['mismatches']} mismatches over {fe['fields_compared']:,} "
                        f"fields ({fe['by_field']})"
                    )

        if layout == "dense" and not args.skip_scaling:
            res["scaling_e2e"] = scaling_e2e(chain, args, dbs, lw, pid, node.url)
        dbs.drop_all()
    return res


def scaling_e2e(
    chain: GeneratedChain, args: argparse.Namespace, dbs: Databases, lw: Path, pid: int, url: str
) -> list[dict[str, Any]]:
    """All the chain's txs as refs of Token (a ref's contract is a label): 10% and 100%."""
    everything = sorted(
        (h for h in chain.all_txs if chain.tx_block[h] >= chain.first_block),
        key=lambda h: (chain.tx_block[h], h),
    )
    out = []
    workers = ["--workers", str(args.workers)] if args.workers else []
    for size in sorted({max(1, len(everything) // 10), len(everything)}):
        for backend in args.backends:
            db = dbs.new(backend, f"scale_{size}")
            setup_gapfill_db(db, chain, {chain.token: everything[:size]}, lw, f"scale{size}_{backend}")
            log(f"scaling: {size:,} refs, concurrent, {backend}")
            r = rates(run_gapfill(db, url, "concurrent", pid, workers), size)
            out.append(
                {
                    "refs": size,
                    "backend": backend,
                    "mode": "concurrent",
                    "wall_s": r["wall_s"],
                    "tx_s": r["tx_s"],
                    "cpu_s_per_1k": r["cpu_s_per_1k"],
                    "maxrss_mb": r["maxrss_mb"],
                    "rss_by_role_mb": r["rss_by_role_mb"],
                    "calls_per_tx": r["summary"].get("calls_per_tx"),
                    "rows": r["rows"],
                }
            )
            log(f"scaling: {size:,} refs {backend}: {r['wall_s']:.1f} s, {r['maxrss_mb']:.0f} MB")
    return out


def scaling_store(args: argparse.Namespace, dbs: Databases, work: Path) -> list[dict[str, Any]]:
    out = []
    script = str(ROOT / "bench/store_scale.py")
    for backend in args.backends:
        db = dbs.new(backend, f"store{args.scale_refs}")
        log(f"store scaling: {args.scale_refs:,} refs into {backend}")
        pop = measure([PY, script, "populate", db, "--n", str(args.scale_refs), "--dir", str(work / "scale")])
        row: dict[str, Any] = {
            "backend": backend,
            "refs": args.scale_refs,
            "import": {**json.loads(pop.stdout.strip().splitlines()[-1]), "maxrss_mb": pop.maxrss_mb},
        }
        for step in ("plan", "iter", "lease"):
            m = measure([PY, script, step, db])
            inner = json.loads(m.stdout.strip().splitlines()[-1])
            row[step] = {**inner, "wall_s": m.wall_s, "cpu_s": m.cpu_s, "maxrss_mb": m.maxrss_mb}
            log(f"store scaling {backend} {step}: {inner['seconds']:.2f} s, {m.maxrss_mb:.0f} MB ({inner})")
        out.append(row)
        dbs.drop_all()
    return out


# -- report ---------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    anvil = find_anvil()
    ver = (
        subprocess.run([anvil, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
        if anvil
        else "?"
    )
    with psycopg.connect(ARGS_PG, autocommit=True) as c:
        pgv = c.execute("SHOW server_version").fetchone()[0]
    load = os.getloadavg()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "anvil_version": ver,
        "postgres_version": pgv,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "loadavg_at_start": [round(x, 2) for x in load],
    }


def git_state() -> dict[str, Any]:
    def git(*a: str) -> str:
        # Only the line ends: a porcelain line starts with its status, " M" included.
        out = subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True).stdout
        return out.rstrip("\n")

    return {
        "head": git("rev-parse", "HEAD"),
        "dirty_src": [x[3:] for x in git("status", "--porcelain", "src").splitlines()],
    }


def verdicts(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    lay = results["layouts"]

    def best_gapfill(layout: str, backend: str | None = None) -> tuple[str, float] | None:
        runs = lay.get(layout, {}).get("runs", {})
        cands = [
            (k, v["tx_s"])
            for k, v in runs.items()
            if k.startswith("gapfill-")
            and not v.get("extrapolated")
            and not v.get("variant")
            and (backend is None or k.endswith(backend))
        ]
        return max(cands, key=lambda kv: kv[1]) if cands else None

    def tx_s(layout: str, name: str) -> float | None:
        r = lay.get(layout, {}).get("runs", {}).get(name)
        return r["tx_s"] if r else None

    def add(target: str, value: float | None, need: float, detail: str) -> None:
        out.append(
            {
                "target": target,
                "ratio": None if value is None else round(value, 2),
                "need": need,
                "pass": None if value is None else value >= need,
                "detail": detail,
            }
        )

    for backend in ("pg", "sqlite"):
        g = best_gapfill("dense", backend)
        etl, bare = tx_s("dense", "ethereum-etl"), tx_s("dense", "bare-client")
        if g and etl:
            add(
                f"dense gapfill ({backend}) >= 2x ethereum-etl",
                g[1] / etl,
                2.0,
                f"{g[0]} {g[1]:,.0f} tx/s vs etl {etl:,.0f} tx/s",
            )
        if g and bare:
            add(
                f"dense gapfill ({backend}) >= 85% of bare client",
                g[1] / bare,
                0.85,
                f"{g[0]} {g[1]:,.0f} tx/s vs bare {bare:,.0f} tx/s",
            )
        gs = best_gapfill("sparse", backend)
        etl_s = tx_s("sparse", "ethereum-etl")
        if gs and etl_s:
            add(
                f"sparse gapfill ({backend}) >= 20x ethereum-etl",
                gs[1] / etl_s,
                20.0,
                f"{gs[0]} {gs[1]:,.0f} tx/s vs etl {etl_s:,.0f} tx/s",
            )
        c, b = tx_s("dense", f"gapfill-concurrent-{backend}"), tx_s("dense", f"gapfill-batch-{backend}")
        if c and b:
            add(f"dense concurrent beats batch ({backend})", c / b, 1.0, f"{c:,.0f} vs {b:,.0f} tx/s")
    peak = []
    for layout, lr in lay.items():
        for name, r in lr.get("runs", {}).items():
            if name.startswith("gapfill-"):
                per = [x for v in r.get("rss_by_role_mb", {}).values() for x in v] or [r["maxrss_mb"]]
                peak.append((max(per), f"{layout}/{name}"))
        for s in lr.get("scaling_e2e", []):
            per = [x for v in s.get("rss_by_role_mb", {}).values() for x in v] or [s["maxrss_mb"]]
            peak.append((max(per), f"{layout}/scaling {s['refs']} {s['backend']}"))
    for s in results.get("scaling_store", []):
        for step in ("plan", "iter", "lease"):
            peak.append((s[step]["maxrss_mb"], f"store {s['backend']} {step} {s['refs']:,}"))
    if peak:
        worst = max(peak)
        out.append(
            {
                "target": f"peak RSS < {RSS_LIMIT_MB:.0f} MB per gapfill process",
                "ratio": round(worst[0], 1),
                "need": RSS_LIMIT_MB,
                "pass": worst[0] < RSS_LIMIT_MB,
                "detail": f"worst: {worst[1]} {worst[0]:.0f} MB",
            }
        )
    return out


def _f3(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def table(results: dict[str, Any]) -> str:
    lines = [
        f"Measured {results['date']} on {results['machine']['nproc']} cores "
        f"({results['machine']['cpu_model']}), {results['machine']['anvil_version']}; "
        f"chains of {results['args']['txs']:,} txs. Shared, noisy machine: compare ratios "
        "within one run only.",
        "",
    ]
    lines += [
        "| layout | tool / mode | tracked tx | wall s | tx/s | CPU s / 1k tx | node CPU s / 1k tx "
        "| PostgreSQL CPU s / 1k tx | RPC calls / tx | peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for layout, lr in results["layouts"].items():
        for name, r in lr["runs"].items():
            calls = r.get("summary", {}).get("calls_per_tx", r.get("calls_per_tx"))
            per = r.get("rss_by_role_mb")
            rss = f"{r['maxrss_mb']:.0f}"
            if per and len([x for v in per.values() for x in v]) > 1:
                rss = (
                    f"{r['maxrss_mb']:.0f} ("
                    + ", ".join(
                        f"{k} {max(v):.0f}" for k, v in sorted(per.items()) if k != "mp-resource-tracker"
                    )
                    + ")"
                )
            label = name + (" ¹" if r.get("extrapolated") else "") + (" ²" if "calls_note" in r else "")
            node_cpu = r.get("node_cpu_s_per_1k")
            lines.append(
                f"| {layout} | {label} | {r['txs']:,} | {r['wall_s']:.2f} | {r['tx_s']:,.0f} | "
                f"{r['cpu_s_per_1k']:.3f} | {_f3(node_cpu)} | "
                f"{_f3(r.get('db_cpu_s_per_1k'))} | "
                f"{'-' if calls is None else f'{calls:.3f}'} | {rss} |"
            )
    lines += [
        "",
        "¹ on a subset, rate extrapolated.  ² calls derived from the tool's call pattern. "
        "tx/s = tracked transactions / wall-clock seconds of the whole command (startup included). "
        "CPU = user + system of the tool's process tree (PostgreSQL's server processes not included).",
        "",
    ]
    fe = results["layouts"].get("dense", {}).get("field_equality", {})
    if fe:
        lines += [
            "| field equality vs ethereum-etl (dense) | txs | logs | fields | mismatches |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, f in fe.items():
            lines.append(
                f"| {name} | {f['txs_compared']:,} | {f['logs_compared']:,} | "
                f"{f['fields_compared']:,} | {f['mismatches']} |"
            )
        info = {k: v for f in fe.values() for k, v in f.get("informational_by_field", {}).items()}
        if info:
            lines.append("")
            lines.append(
                "Compared for information only (not in the count): "
                + ", ".join(f"{k} differs on {v:,} txs" for k, v in sorted(info.items()))
                + " (ethereum-etl exports anvil's `blobGasPrice` from every receipt; gapfill documents its "
                "blob columns as type-3 only and there are no type-3 transactions here)."
            )
        lines.append("")
    sc = results["layouts"].get("dense", {}).get("scaling_e2e", [])
    if sc:
        lines += [
            "| end-to-end (concurrent) | refs | seconds | tx/s | peak RSS MB |",
            "|---|---:|---:|---:|---:|",
        ]
        for s in sc:
            lines.append(
                f"| {s['backend']} | {s['refs']:,} | {s['wall_s']:.1f} | {s['tx_s']:,.0f} | "
                f"{s['maxrss_mb']:.0f} |"
            )
        lines.append("")
    st = results.get("scaling_store", [])
    if st:
        lines += [
            "| store at scale | refs | import s | plan s (MB) | iter_gap s (MB) | lease all s (MB) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for s in st:
            lines.append(
                f"| {s['backend']} | {s['refs']:,} | {s['import']['seconds']:.1f} | "
                f"{s['plan']['seconds']:.1f} ({s['plan']['maxrss_mb']:.0f}) | "
                f"{s['iter']['seconds']:.1f} ({s['iter']['maxrss_mb']:.0f}) | "
                f"{s['lease']['seconds']:.1f} ({s['lease']['maxrss_mb']:.0f}); "
                f"{s['lease']['batches']:,} batches |"
            )
        lines.append("")
    v = results.get("verdicts", [])
    if v:
        lines += ["| target | measured | need | verdict |", "|---|---:|---:|---|"]
        for x in v:
            verdict = "n/a" if x["pass"] is None else ("pass" if x["pass"] else "**FAIL**")
            lines.append(f"| {x['target']} | {x['ratio']} | {x['need']} | {verdict} ({x['detail']}) |")
    return "\n".join(lines) + "\n"


ARGS_PG = "postgresql://postgres@127.0.0.1:5432/postgres"


def main() -> int:
    global ARGS_PG
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--txs", type=int, default=100_000, help="transactions per chain [100,000]")
    ap.add_argument("--layouts", default="dense,sparse")
    ap.add_argument("--backends", default="postgres,sqlite")
    ap.add_argument("--modes", default="sequential,batch,concurrent")
    ap.add_argument("--seq-refs", type=int, default=1000, help="refs for sequential mode (extrapolated)")
    ap.add_argument("--workers", type=int, default=None, help="concurrent workers [gapfill's default]")
    ap.add_argument("--repeat", type=int, default=2,
                    help="rounds: every tool/mode runs once per round, the fastest try is kept")
    ap.add_argument("--scale-refs", type=int, default=1_000_000)
    ap.add_argument(
        "--plan-variants",
        default="per_tx,per_block",
        help="dense only: extra batch-mode runs on PostgreSQL with --plan forced",
    )
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--skip-scaling", action="store_true")
    ap.add_argument("--pg", default=ARGS_PG)
    ap.add_argument("--out", type=Path, default=ROOT / "docs/bench")
    ap.add_argument("--keep-dbs", action="store_true")
    ap.add_argument("--report", type=Path, help="only re-render table.md and charts from this results.json")
    args = ap.parse_args()
    ARGS_PG = args.pg
    if args.report:
        results = json.loads(args.report.read_text())
        results["verdicts"] = verdicts(results)
        md = table(results)
        (args.out / "table.md").write_text(md)
        print(md)
        if Path(PLOT_PY).exists():
            subprocess.run([PLOT_PY, str(ROOT / "bench/plot.py"), str(args.report), str(args.out)])
        return 0
    args.backends = [b for b in args.backends.split(",") if b]
    args.modes = [m for m in args.modes.split(",") if m]
    work = BENCH / "work"
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    dbs = Databases(args.pg, work, args.keep_dbs)
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "git": git_state(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "noise": "shared machine: other engineers run tests at the same time; the node, PostgreSQL and "
        "every tool share the same cores. Compare ratios within one run, not absolute figures.",
        "layouts": {},
    }
    try:
        for layout in [x for x in args.layouts.split(",") if x]:
            results["layouts"][layout] = bench_layout(layout, args, dbs, work)
        if not args.skip_scaling:
            results["scaling_store"] = scaling_store(args, dbs, work)
    finally:
        dbs.drop_all()
    results["verdicts"] = verdicts(results)
    results["total_s"] = time.perf_counter() - t0
    results["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    md = table(results)
    (args.out / "table.md").write_text(md)
    print(md)
    if Path(PLOT_PY).exists():
        subprocess.run(
            [PLOT_PY, str(ROOT / "bench/plot.py"), str(args.out / "results.json"), str(args.out)], check=False
        )
    log(f"done in {results['total_s']:.0f} s: {args.out}/results.json, table.md, throughput.png, scaling.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
