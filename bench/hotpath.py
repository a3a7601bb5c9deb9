"""CPU per enriched transaction, stage by stage, without a node: a repeatable micro-benchmark.

The first run records real answers once: it starts anvil (`gapfill.testing.anvil`),
generates a dense chain (`ChainSpec("dense", --txs)`), and enriches every tracked
transaction (sent straight to Token or Silent) with gapfill's own client through a
recording transport. The exchanges (request and reply bytes) and the chain go to
``.bench/hotpath/`` (gitignored); later runs only replay them.

Stages, each timed with ``time.process_time()`` (CPU, not wall: robust on a busy
machine) over ``--repeats`` runs; the minimum is reported, in µs per transaction:

* ``parse``: ``orjson.loads`` of every recorded reply body;
* ``normalise``: ``normalise_tx`` with ABI decoding (Token and Silent ABIs, as a real
  run registers them) for every transaction;
* ``sqlite``: ``Store.write`` of the rows in 500-transaction batches into a fresh
  SQLite file;
* ``postgres``: the same into a fresh PostgreSQL database (``--pg``; gapfill's
  process; ``postgres_server`` is the server backend's CPU over the same writes, from /proc);
* ``enrich``: ``Enricher.enrich`` over 500-ref batches through a ``RpcClient``
  whose transport replays the recorded bytes, so RPC batching, id matching and
  parsing count (the replaying transport's own CPU is measured and subtracted);
* ``total_sqlite`` / ``total_postgres``: ``enrich`` + the store stage.

    .venv/bin/python bench/hotpath.py [--repeats 5] [--pg postgresql://postgres@127.0.0.1:5432/postgres]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson

from gapfill.enrich.fetch import Enricher, decoder_for
from gapfill.enrich.normalise import normalise_tx, timestamp_from_receipt
from gapfill.model import Enriched, LogRow, Ref, TxRow
from gapfill.rpc import RpcClient
from gapfill.rpc.config import EndpointConfig, RpcSettings
from gapfill.rpc.transport import AiohttpTransport, HttpReply
from gapfill.store import open_store
from gapfill.store.base import LOG_COLUMNS, TX_COLUMNS
from gapfill.testing import chain as chain_mod

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".bench" / "hotpath"
CLK = os.sysconf("SC_CLK_TCK")
BATCH = 500  # refs per enrich batch and transactions per store write (the engine's default)
RPC_BATCH = 50  # calls per JSON-RPC batch (the engine's default)
FAKE_URL = "http://replay.invalid/"


# -- recording ---------------------------------------------------------------------------


class _Recorder:
    """A transport that posts for real and keeps every exchange."""

    def __init__(self) -> None:
        self.inner = AiohttpTransport(RpcSettings())
        self.exchanges: list[tuple[str, str]] = []

    async def post(self, url: str, body: bytes) -> HttpReply:
        reply = await self.inner.post(url, body)
        self.exchanges.append((body.decode(), reply.body.decode()))
        return reply

    async def aclose(self) -> None:
        await self.inner.aclose()


def _refs(chain: chain_mod.GeneratedChain) -> list[Ref]:
    out = []
    for contract in (chain.token, chain.silent):
        for h in sorted(chain.direct[contract], key=lambda h: (chain.tx_block[h], h)):
            out.append(Ref(chain.chain_id, contract, h, chain.tx_block[h], "bench"))
    return out


def _batches(refs: list[Ref]) -> list[list[Ref]]:
    return [refs[i : i + BATCH] for i in range(0, len(refs), BATCH)]


def record(txs: int) -> None:
    from gapfill.testing.anvil import Anvil

    DATA.mkdir(parents=True, exist_ok=True)
    print(f"recording: dense chain of {txs} txs on anvil ...", file=sys.stderr)
    with Anvil() as node:
        chain = chain_mod.generate(node.url, chain_mod.ChainSpec("dense", txs))
        recorder = _Recorder()

        async def go() -> None:
            client = RpcClient([EndpointConfig(node.url, None, RPC_BATCH)], transport=recorder)
            async with client:
                enricher = Enricher(client, chain.chain_id, _decoder(chain))
                for batch in _batches(_refs(chain)):
                    got = await enricher.enrich(batch)
                    if got.failures:
                        raise SystemExit(f"recording failed: {got.failures[0]}")

        asyncio.run(go())
    chain_mod.save(chain, DATA / "chain.json")
    (DATA / "exchanges.json").write_bytes(orjson.dumps(recorder.exchanges))
    print(f"recorded {len(recorder.exchanges)} exchanges", file=sys.stderr)


def _decoder(chain: chain_mod.GeneratedChain) -> Any:
    return decoder_for({chain.token: chain.token_abi, chain.silent: chain.silent_abi})


# -- replaying -------------------------------------------------------------------------------


def _key(method: str, params: Any) -> bytes:
    return method.encode() + orjson.dumps(params)


def _answers(exchanges: list[tuple[str, str]]) -> dict[bytes, bytes]:
    """(method, params) -> the result's JSON bytes, from the recorded exchanges."""
    out: dict[bytes, bytes] = {}
    for request, reply in exchanges:
        req = orjson.loads(request)
        rep = orjson.loads(reply)
        reqs = req if isinstance(req, list) else [req]
        reps = {r["id"]: r for r in (rep if isinstance(rep, list) else [rep])}
        for r in reqs:
            out[_key(r["method"], r["params"])] = orjson.dumps(reps[r["id"]]["result"])
    return out


class _Replay:
    """A transport answering from recorded results; its own CPU time is kept apart."""

    def __init__(self, answers: Mapping[bytes, bytes]) -> None:
        self.answers = answers
        self.cpu = 0.0

    async def post(self, url: str, body: bytes) -> HttpReply:
        t0 = time.process_time()
        req = orjson.loads(body)
        single = isinstance(req, dict)
        parts = [
            b'{"jsonrpc":"2.0","id":%d,"result":%s}' % (r["id"], self.answers[_key(r["method"], r["params"])])
            for r in ([req] if single else req)
        ]
        out = parts[0] if single else b"[" + b",".join(parts) + b"]"
        reply = HttpReply(200, {"Content-Type": "application/json"}, out)
        self.cpu += time.process_time() - t0
        return reply

    async def aclose(self) -> None:
        return None


# -- stages ------------------------------------------------------------------------------------
#
# Every stage streams batch by batch and only the timed part of each batch is counted: the
# heap stays the size of a worker's (imports, one batch, the recording as bytes), so the
# garbage collector costs what it costs in a real run, no more.


class _Data:
    """The recording, held as bytes (invisible to the collector), and what is derived from it."""

    def __init__(self) -> None:
        self.chain = chain_mod.load(DATA / "chain.json")
        exchanges = orjson.loads((DATA / "exchanges.json").read_bytes())
        self.bodies = [reply.encode() for _, reply in exchanges]
        self.answers = _answers(exchanges)
        del exchanges
        self.headers: dict[int, int] = {}
        for key, value in self.answers.items():
            if key.startswith(b"eth_getBlockByNumber"):
                block = orjson.loads(value)
                self.headers[int(block["number"], 16)] = int(block["timestamp"], 16)
        self.ref_keys = [(r.contract, r.tx_hash, r.block_number) for r in _refs(self.chain)]
        self.decoder = _decoder(self.chain)
        self.n = len(self.ref_keys)

    def ref_batches(self) -> list[list[Ref]]:
        cid = self.chain.chain_id
        refs = [Ref(cid, c, h, b, "bench") for c, h, b in self.ref_keys]
        return _batches(refs)

    def pairs(self, refs: list[Ref]) -> list[tuple[Any, Any, Any]]:
        """(tx, receipt, timestamp) per ref, as the per-transaction plan hands them to normalise_tx."""
        out = []
        for ref in refs:
            rec = orjson.loads(self.answers[_key("eth_getTransactionReceipt", [ref.tx_hash])])
            tx = orjson.loads(self.answers[_key("eth_getTransactionByHash", [ref.tx_hash])])
            ts = timestamp_from_receipt(rec)
            if ts is None:
                ts = self.headers[int(rec["blockNumber"], 16)]
            out.append((tx, rec, ts))
        return out

    def rows(self, refs: list[Ref]) -> Enriched:
        txs, logs = _normalise_all(self.chain.chain_id, self.pairs(refs), self.decoder)
        return Enriched(txs, logs, [])


def _normalise_all(chain_id: int, pairs: list[tuple[Any, Any, Any]], decoder: Any) -> Any:
    txs: list[TxRow] = []
    logs: list[LogRow] = []
    for tx, rec, ts in pairs:
        row, rows = normalise_tx(chain_id, tx, rec, ts, decoder)
        txs.append(row)
        logs.extend(rows)
    return txs, logs


def _parse_once(d: _Data) -> float:
    gc.collect()
    spent = 0.0
    for b in d.bodies:
        t0 = time.process_time()
        orjson.loads(b)
        spent += time.process_time() - t0
    return spent


def _normalise_once(d: _Data) -> float:
    gc.collect()
    spent = 0.0
    cid = d.chain.chain_id
    for refs in d.ref_batches():
        pairs = d.pairs(refs)
        t0 = time.process_time()
        _normalise_all(cid, pairs, d.decoder)
        spent += time.process_time() - t0
    return spent


def _server_cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) of a local PostgreSQL backend, from /proc; 0 without one."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


SERVER: dict[str, list[float]] = {}
"""CPU seconds of the PostgreSQL backend per ``postgres`` sample (the server's share)."""


def _write_all(url: str, d: _Data) -> float:
    store = open_store(url)
    try:
        backend_pid = None
        if url.startswith("postgres"):
            with store._read() as cur:
                cur.execute("SELECT pg_backend_pid()")
                backend_pid = int(cur.fetchone()[0])
        gc.collect()
        spent = 0.0
        server0 = _server_cpu_s(backend_pid)
        for refs in d.ref_batches():
            enriched = d.rows(refs)
            t0 = time.process_time()
            store.write(enriched)
            spent += time.process_time() - t0
        if backend_pid is not None:
            SERVER.setdefault("postgres_server", []).append(_server_cpu_s(backend_pid) - server0)
        return spent
    finally:
        store.close()


def _sqlite_once(d: _Data, digest: dict[str, str] | None = None) -> float:
    with tempfile.TemporaryDirectory(dir=DATA) as tmp:
        spent = _write_all(f"sqlite:///{tmp}/hot.db", d)
        if digest is not None:
            import sqlite3

            conn = sqlite3.connect(f"{tmp}/hot.db")
            for table, cols, order in (("transactions", TX_COLUMNS, "tx_hash"),
                                       ("logs", LOG_COLUMNS, "tx_hash, log_index")):  # fmt: skip
                quoted = ", ".join(f"quote({c})" for c in cols)  # quote() shows the storage type too
                rows = conn.execute(f"SELECT {quoted} FROM {table} ORDER BY {order}").fetchall()
                digest[f"sqlite_{table}"] = hashlib.sha256(repr(rows).encode()).hexdigest()[:16]
            conn.close()
        return spent


def _pg_once(admin_url: str, d: _Data, digest: dict[str, str] | None = None) -> float:
    import psycopg

    name = f"gapfill_hotpath_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    try:
        spent = _write_all(url, d)
        if digest is not None:
            with psycopg.connect(url) as conn:
                for table, cols, order in (("transactions", TX_COLUMNS, "tx_hash"),
                                           ("logs", LOG_COLUMNS, "tx_hash, log_index")):  # fmt: skip
                    text = ", ".join(f"{c}::text" for c in cols)
                    rows = conn.execute(f"SELECT {text} FROM {table} ORDER BY {order}").fetchall()
                    digest[f"pg_{table}"] = hashlib.sha256(repr(rows).encode()).hexdigest()[:16]
        return spent
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _enrich_once(d: _Data, digest: dict[str, str] | None = None) -> tuple[float, int]:
    replay = _Replay(d.answers)
    batches = d.ref_batches()

    async def go() -> tuple[float, int]:
        client = RpcClient([EndpointConfig(FAKE_URL, None, RPC_BATCH)], transport=replay)
        async with client:
            enricher = Enricher(client, d.chain.chain_id, d.decoder)
            n = 0
            h = hashlib.sha256()
            gc.collect()
            t0 = time.process_time()
            for batch in batches:
                got = await enricher.enrich(batch)
                n += len(got.txs)
                if got.failures:
                    raise SystemExit(f"replay failed: {got.failures[0]}")
                if digest is not None:
                    t1 = time.process_time()
                    h.update(repr(got).encode())
                    t0 += time.process_time() - t1
            if digest is not None:
                digest["enrich"] = h.hexdigest()[:16]
            return time.process_time() - t0 - replay.cpu, n

    return asyncio.run(go())


def _measure(
    args: argparse.Namespace,
    d: _Data,
    digest: dict[str, str],
    samples: dict[str, list[float]],
    want: Callable[[str], bool],
) -> None:
    n = d.n
    for r in range(args.repeats):
        first = digest if r == 0 else None
        if want("parse"):
            samples.setdefault("parse", []).append(_parse_once(d))
        if want("normalise"):
            samples.setdefault("normalise", []).append(_normalise_once(d))
        if want("sqlite"):
            samples.setdefault("sqlite", []).append(_sqlite_once(d, first))
        if want("postgres") and args.pg:
            samples.setdefault("postgres", []).append(_pg_once(args.pg, d, first))
        if want("enrich"):
            spent, got = _enrich_once(d, first)
            if got != n:
                raise SystemExit(f"replay enriched {got} of {n} transactions")
            samples.setdefault("enrich", []).append(spent)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--txs", type=int, default=20_000, help="chain size when recording")
    ap.add_argument("--record", action="store_true", help="record again even if a recording exists")
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres",
                    help="PostgreSQL admin URL ('' to skip the postgres stage)")  # fmt: skip
    ap.add_argument("--only", default="", help="comma-separated stages to run (default: all)")
    ap.add_argument(
        "--gc",
        choices=("worker", "default"),
        default="worker",
        help="collector thresholds: a worker's (gapfill.engine.worker.gc_tuned) or Python's",
    )
    args = ap.parse_args(argv)

    if args.record or not (DATA / "exchanges.json").exists():
        record(args.txs)
    d = _Data()
    n = d.n
    only = {s for s in args.only.split(",") if s}

    def want(stage: str) -> bool:
        return not only or stage in only

    rows = hashlib.sha256()
    n_logs = 0
    for refs in d.ref_batches():
        e = d.rows(refs)
        n_logs += len(e.logs)
        rows.update(repr((e.txs, e.logs)).encode())
    digest = {"rows": rows.hexdigest()[:16]}
    samples: dict[str, list[float]] = {}
    with contextlib.ExitStack() as stack:
        if args.gc == "worker":  # what a worker runs under (an older gapfill has no gc_tuned)
            with contextlib.suppress(ImportError):
                from gapfill.engine.worker import gc_tuned

                stack.enter_context(gc_tuned())
        _measure(args, d, digest, samples, want)

    samples.update(SERVER)
    best = {k: round(min(v) / n * 1e6, 2) for k, v in samples.items()}
    median = {k: round(statistics.median(v) / n * 1e6, 2) for k, v in samples.items()}
    for store in ("sqlite", "postgres"):
        if store in best and "enrich" in best:
            best[f"total_{store}"] = round(best["enrich"] + best[store], 2)
    print(json.dumps({
        "txs": n, "logs": n_logs, "repeats": args.repeats, "unit": "cpu_us_per_tx",
        "gc": args.gc, "min": best, "median": median, "digest": digest,
    }, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
