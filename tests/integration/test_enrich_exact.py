"""Enrichment is exact: every stored field equals what the node returns for it.

One anvil chain of 20,000 transactions over 160 blocks is generated per module.
Token (with its ABI) and Silent are tracked, with a ref for every transaction
that reaches them (directly, through the router, or by a log); about one ref in
eight has no block number. The expected rows come from ``oracle.py``, which reads
the node with plain ``urllib`` batches and decodes with ``eth_abi``: it shares
no code with ``gapfill.enrich``.

Covered: SQLite and PostgreSQL; batch mode with each plan shape forced;
sequential mode on a subset; concurrent mode with 2 worker processes on
PostgreSQL; reverted transactions; values above 2**64; a second run that
changes nothing and asks the node for nothing; a hash the chain does not have
(``not_found``, exit code 3, ``--retry-failed``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest
from click.testing import CliRunner
from oracle import NodeView, diff_rows, expected_logs, expected_tx, read_node

from gapfill.cli import cli
from gapfill.store import open_store
from gapfill.testing.anvil import Anvil
from gapfill.testing.chain import ChainSpec, GeneratedChain, generate

SPEC = ChainSpec(layout="dense", total_txs=20_000, seed=23, blocks=160)
MISSING_HASH = "0x" + "ab" * 32
GAPFILL_BIN = Path(sys.executable).with_name("gapfill")
T = TypeVar("T")


@dataclass
class World:
    """The chain, the refs to import per contract, and the rows the node implies."""

    node: Anvil
    chain: GeneratedChain
    refs: dict[str, list[tuple[str, int | None]]]  # contract -> (hash, block or None)
    abis: dict[str, Any]
    view: NodeView
    want_tx: dict[str, dict[str, Any]]
    want_logs: dict[str, list[dict[str, Any]]]
    abi_file: Path

    @property
    def hashes(self) -> set[str]:
        return {h for rs in self.refs.values() for h, _ in rs}


def _no_block(tx_hash: str) -> bool:
    """About one ref in eight is imported without its block number."""
    return int(tx_hash[2:6], 16) % 8 == 0


@pytest.fixture(scope="module")
def world(anvil_bin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with Anvil(binary=anvil_bin) as node:
        chain = generate(node.url, SPEC)
        refs = {
            c: sorted((h, None if _no_block(h) else chain.tx_block[h]) for h in chain.reached(c))
            for c in (chain.token, chain.silent)
        }
        abis: dict[str, Any] = {chain.token: chain.token_abi}  # Silent is tracked without an ABI
        hashes = {h for rs in refs.values() for h, _ in rs}
        view = read_node(node.url, hashes)
        abi_file = tmp_path_factory.mktemp("abi") / "Token.json"
        abi_file.write_text(json.dumps({"abi": chain.token_abi}))
        yield World(
            node, chain, refs, abis, view,
            {h: expected_tx(view, h, abis) for h in hashes},
            {h: expected_logs(view, h, abis) for h in hashes},
            abi_file,
        )  # fmt: skip


# -- helpers -------------------------------------------------------------------------


def gapfill(db_url: str, rpc_url: str | None, *args: str) -> tuple[int, str]:
    """Run the CLI in this process; return (exit code, stdout + stderr)."""
    argv = ["--db", db_url]
    if rpc_url:
        argv += ["--rpc-url", rpc_url]
    result = CliRunner().invoke(cli, [*argv, *args], catch_exceptions=False)
    return result.exit_code, result.output


def setup_db(
    db_url: str, w: World, tmp: Path, keep: Callable[[str], bool] = lambda h: True,
    extra: Sequence[tuple[str, str, int | None]] = (), token_abi: bool = True,
) -> set[str]:  # fmt: skip
    """Track Token (ABI via ``--abi``) and Silent, import their refs by CSV; return the hashes."""
    chain = w.chain
    abi = ("--abi", str(w.abi_file)) if token_abi else ()
    code, out = gapfill(db_url, None, "contract", "add", chain.token, "--chain-id", str(chain.chain_id),
                        "--label", "token", *abi)  # fmt: skip
    assert code == 0, out
    code, out = gapfill(db_url, None, "contract", "add", chain.silent, "--chain-id", str(chain.chain_id),
                        "--label", "silent")  # fmt: skip
    assert code == 0, out
    imported: set[str] = set()
    for contract, refs in w.refs.items():
        rows = [(h, b) for h, b in refs if keep(h)]
        rows += [(h, b) for c, h, b in extra if c == contract]
        csv = tmp / f"refs-{contract}.csv"
        csv.write_text("tx_hash,block_number\n" + "".join(f"{h},{'' if b is None else b}\n" for h, b in rows))
        code, out = gapfill(db_url, None, "import", str(csv), "--contract", contract)
        assert code == 0, out
        imported |= {h for h, _ in rows}
    return imported


def stored(db_url: str, chain_id: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    with open_store(db_url) as s:
        return s.fetch_transactions(chain_id), s.fetch_logs(chain_id)


def assert_exact(
    db_url: str, w: World, hashes: set[str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every row of ``hashes`` (and nothing else) is stored exactly as the node implies."""
    txs, logs = stored(db_url, w.chain.chain_id)
    want_txs = [w.want_tx[h] for h in hashes]
    want_logs = [row for h in hashes for row in w.want_logs[h]]
    problems = diff_rows(txs, want_txs, ["tx_hash"]) + diff_rows(logs, want_logs, ["tx_hash", "log_index"])
    assert not problems, f"{len(problems)}+ differences:\n" + "\n".join(problems)
    assert len(txs) == len(hashes) and len(logs) == len(want_logs)
    return txs, logs


def failures_json(db_url: str) -> list[dict[str, Any]]:
    code, out = gapfill(db_url, None, "failures", "--json")
    assert code == 0, out
    rows: list[dict[str, Any]] = json.loads(out)
    return rows


@contextmanager
def counting_proxy(upstream: str, *flags: str) -> Iterator[tuple[str, Callable[[], dict[str, Any]]]]:
    """The provider emulator in front of ``upstream`` (no faults, unless ``flags`` ask for
    some): its URL and a stats reader."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gapfill.testing.emulator", "--upstream", upstream, "--port", "0", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://"), f"emulator did not start: {url!r}"
        base = url.rstrip("/")

        def stats() -> dict[str, Any]:
            with urllib.request.urlopen(f"{base}/_emulator/stats", timeout=10) as resp:
                data: dict[str, Any] = json.loads(resp.read())
                return data

        yield url, stats
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def last_run(db_url: str) -> dict[str, Any]:
    """The latest run as ``gapfill runs --json`` shows it."""
    code, out = gapfill(db_url, None, "runs", "--json", "--limit", "1")
    assert code == 0, out
    (run,) = json.loads(out)
    assert isinstance(run, dict)
    return run


def assert_rerun_is_a_no_op(db_url: str, w: World, before: tuple[list[Any], list[Any]]) -> None:
    """A second ``enrich`` through a counting proxy: no call at all, no run recorded (it says
    there is nothing to enrich), rows unchanged."""
    first = last_run(db_url)
    with counting_proxy(w.node.url) as (url, stats):
        code, out = gapfill(db_url, url, "enrich", "--mode", "batch", "-q")
        seen = stats()
    assert code == 0 and out.startswith("nothing to enrich: every ref of the 2 tracked contracts "), out
    assert not seen["methods"], seen
    assert last_run(db_url) == first
    assert stored(db_url, w.chain.chain_id) == before


# -- the oracle itself -------------------------------------------------------------------


def test_world_covers_the_hard_cases(world: World) -> None:
    """The refs reach every shape the exactness tests claim to check, and the oracle decodes
    the known shapes as a hand reading of the ABI encoding does."""
    chain, want = world.chain, world.want_tx
    hashes = world.hashes
    assert len(chain.all_txs) >= 20_000 and chain.head - chain.first_block + 1 >= 150
    assert len(hashes) > 15_000
    assert chain.internal[chain.token] and chain.internal[chain.token] <= hashes  # via the router
    assert sum(1 for rs in world.refs.values() for _, b in rs if b is None) > 1_000
    reverted = chain.reverted & hashes
    assert reverted and all(want[h]["status"] == 0 for h in reverted)
    assert all(want[h]["status"] == 1 for h in hashes - chain.reverted)
    big = chain.big_value & hashes
    assert big and all(want[h]["value"] > 2**64 for h in big)
    assert {want[h]["tx_type"] for h in hashes} == {0, 1, 2}
    assert any(want[h]["access_list"] for h in hashes if want[h]["tx_type"] == 2)
    deploy = chain.deploy_txs[chain.token]
    assert want[deploy]["created_contract"] == chain.token and want[deploy]["to_address"] is None

    names = {want[h]["method_name"] for h in hashes}
    assert {"ping", "transfer", "approve", "fail", "mintMany", None} <= names
    t = next(want[h] for h in hashes if want[h]["method_name"] == "transfer")
    assert t["method_args"] == {"to": "0x" + t["input"][34:74], "amount": str(int(t["input"][74:138], 16))}
    events = {row["event_name"]: row for rows in world.want_logs.values() for row in rows}
    assert set(events) == {"Transfer", "Approval", "Pinged"}
    p = events["Pinged"]
    data = bytes.fromhex(p["data"][2:])
    length = int.from_bytes(data[64:96], "big")
    assert p["event_args"] == {
        "sender": "0x" + p["topic1"][26:],
        "value": str(int.from_bytes(data[:32], "big")),
        "data": "0x" + data[96 : 96 + length].hex(),
    }
    tr = events["Transfer"]
    assert tr["event_args"] == {"from": "0x" + tr["topic1"][26:], "to": "0x" + tr["topic2"][26:],
                                "value": str(int(tr["data"], 16))}  # fmt: skip
    silent_calls = [want[h] for h in chain.direct[chain.silent]]
    assert all(r["method_name"] is None and r["method_id"] for r in silent_calls)  # no ABI


# -- batch mode, each plan shape, both backends ---------------------------------------------


@pytest.mark.parametrize("plan", ["per_tx", "per_block", "metered"])
def test_batch_mode_is_exact(db_url: str, world: World, plan: str, tmp_path: Path) -> None:
    """``metered``: the planner's own choice under --rps, whole blocks where refs crowd them
    (it first asks the node whether it has eth_getBlockReceipts)."""
    hashes = setup_db(db_url, world, tmp_path)
    t0 = time.perf_counter()
    metered = plan == "metered"
    how = ("--rps", "1000000", "enrich", "--plan", "auto") if metered else ("enrich", "--plan", plan)
    code, out = gapfill(db_url, world.node.url, *how, "--mode", "batch", "-q")
    secs = time.perf_counter() - t0
    assert code == 0, out
    before = assert_exact(db_url, world, hashes)
    run = last_run(db_url)
    print(f"batch {plan}: {len(hashes)} txs in {secs:.1f}s, {run['rpc_calls']} calls")
    assert run["processed"] == len(hashes)
    if plan == "per_tx":  # a receipt and a transaction per ref
        assert run["rpc_calls"] >= 2 * len(hashes), run
    else:  # two calls per block, per transaction only for the refs without a block number
        assert run["rpc_calls"] < len(hashes) // 2, run
    assert_rerun_is_a_no_op(db_url, world, before)


def test_an_abi_given_after_enrichment_decodes_the_stored_rows(
    db_url: str, world: World, tmp_path: Path
) -> None:
    # Token tracked without its ABI and enriched: its calls and events are stored undecoded
    # (but for the built-in token events). Giving the ABI afterwards decodes them as an
    # enrichment with the ABI would have.
    chain = world.chain
    hashes = setup_db(db_url, world, tmp_path, token_abi=False)
    code, out = gapfill(db_url, world.node.url, "enrich", "--mode", "batch", "-q")
    assert code == 0, out
    txs, _ = stored(db_url, chain.chain_id)
    to_token = [t for t in txs if t["to_address"] == chain.token]
    assert to_token and all(t["method_name"] is None for t in to_token)
    # Tracked on one chain: no --chain-id (or node) is needed to give it an ABI.
    code, out = gapfill(db_url, None, "contract", "add", chain.token, "--abi", str(world.abi_file))
    assert code == 0, out
    decoded = sum(1 for t in to_token if world.want_tx[t["tx_hash"]]["method_name"] is not None)
    assert f"decoded the stored rows with this ABI: {decoded:,} of {len(to_token):,} transactions" in out
    assert "warning" not in out
    # Token's ABI given to Silent by mistake: nothing of Silent's matches it, and it says so.
    code, out = gapfill(db_url, None, "contract", "add", chain.silent, "--abi", str(world.abi_file))
    assert code == 0, out
    assert "warning: none of the stored rows matches this ABI" in out, out
    assert_exact(db_url, world, hashes)


class _Gate:
    """A proxy to ``upstream`` that answers the first ``calls`` JSON-RPC calls, then holds
    every request until :attr:`open` is set."""

    def __init__(self, upstream: str, calls: int) -> None:
        self.upstream, self.calls = upstream, calls
        self.seen = 0
        self.lock = threading.Lock()
        self.holding = threading.Event()
        self.open = threading.Event()


def gated_node(upstream: str, calls: int) -> AbstractContextManager[tuple[str, _Gate]]:
    gate = _Gate(upstream, calls)

    def hold(body: bytes) -> bytes:
        parsed = json.loads(body)
        with gate.lock:
            gate.seen += len(parsed) if isinstance(parsed, list) else 1
            held = gate.seen > gate.calls
        if held and not gate.open.is_set():
            gate.holding.set()
            gate.open.wait(60)
        return body

    return _proxy(upstream, gate, before=hold, after_close=gate.open.set)


@contextmanager
def _proxy(upstream: str, tag: T, before: Callable[[bytes], bytes] = lambda b: b,
           after: Callable[[bytes], bytes] = lambda b: b,
           after_close: Callable[[], None] = lambda: None) -> Iterator[tuple[str, T]]:  # fmt: skip
    """A loopback JSON-RPC proxy to ``upstream``: ``before`` sees (and may hold) each request
    body, ``after`` rewrites each answer; yields its URL and ``tag``."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = before(self.rfile.read(int(self.headers["Content-Length"])))
            req = urllib.request.Request(upstream, data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as resp:
                answer = after(resp.read())
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", tag
    finally:
        after_close()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _a_sixth(world: World) -> Callable[[str], bool]:
    """One ref in six: the refs of the runs an ABI is given during."""
    return set(sorted(world.hashes)[::6]).__contains__


def _enrich_of_a_sixth(db_url: str, url: str, mode: str) -> list[str]:
    """A run of 2 workers, if concurrent, over batches of 100: long enough to change an ABI
    while it runs."""
    return [str(GAPFILL_BIN), "--db", db_url, "--rpc-url", url, "enrich", "--mode", mode,
            "--batch-size", "100", "--workers", "2"]  # fmt: skip


@pytest.mark.parametrize("mode", ["batch", "concurrent"])
def test_an_abi_given_during_enrichment_decodes_every_row(
    db_url: str, world: World, tmp_path: Path, mode: str
) -> None:
    # `contract add --abi` while a run enriches: it decodes the rows stored so far, but the
    # run's processes keep the decoders they started with. The run decodes the rows they
    # committed after the change when it ends.
    chain = world.chain
    hashes = setup_db(db_url, world, tmp_path, keep=_a_sixth(world), token_abi=False)
    with gated_node(world.node.url, calls=500) as (url, gate):
        argv = _enrich_of_a_sixth(db_url, url, mode)
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert gate.holding.wait(60), "the run never got past the first calls"
            code, out = gapfill(db_url, None, "contract", "add", chain.token, "--abi", str(world.abi_file))
            assert code == 0, out
            gate.open.set()
            out, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, out
    said = f"decoded the stored rows of {chain.token} on chain {chain.chain_id} again"
    assert said in out and "during this run" in out, out
    assert_exact(db_url, world, hashes)


class _Relay:
    """A proxy's gate: lets the JSON-RPC calls up to :attr:`limit` through and holds the
    rest until the limit is raised (or the proxy closes)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.seen, self.held, self.closed = limit, 0, 0, False
        self.cond = threading.Condition()

    def before(self, body: bytes) -> bytes:
        parsed = json.loads(body)
        with self.cond:
            self.seen += len(parsed) if isinstance(parsed, list) else 1
            mine = self.seen
            if mine > self.limit and not self.closed:
                self.held += 1
                self.cond.notify_all()
                self.cond.wait_for(lambda: mine <= self.limit or self.closed, 120)
                self.held -= 1
        return body

    def let_through(self, calls: int) -> None:
        with self.cond:
            self.limit = self.seen + calls
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


def stale_rows(db_url: str, world: World) -> int:
    """Stored transactions the token's ABI decodes that are stored undecoded."""
    txs, _ = stored(db_url, world.chain.chain_id)
    return sum(1 for t in txs if t["method_name"] is None and world.want_tx[t["tx_hash"]]["method_name"])


@pytest.mark.parametrize("mode", ["batch", "concurrent"])
def test_a_run_killed_after_an_abi_change_leaves_its_rows_to_the_next_run(
    db_url: str, world: World, tmp_path: Path, mode: str
) -> None:
    # `contract add --abi` while a run enriches, whose processes go on storing rows with
    # the decoders they started with; then the run is killed outright (kill -9 of its
    # process group: no end, where it would have decoded them again). The next run does.
    chain = world.chain
    hashes = setup_db(db_url, world, tmp_path, keep=_a_sixth(world), token_abi=False)
    relay = _Relay(500)
    with _proxy(world.node.url, relay, before=relay.before, after_close=relay.close) as (url, _):
        argv = _enrich_of_a_sixth(db_url, url, mode)
        with (tmp_path / "killed.log").open("w") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            with relay.cond:
                assert relay.cond.wait_for(lambda: relay.held > 0, 60), "the run never got past its start"
            code, out = gapfill(db_url, None, "contract", "add", chain.token, "--abi", str(world.abi_file))
            assert code == 0, out
            relay.let_through(1_000)  # the batches in flight, and a few more, then held again
            deadline = time.monotonic() + 60
            while not stale_rows(db_url, world):
                assert proc.poll() is None, (tmp_path / "killed.log").read_text()
                assert time.monotonic() < deadline, "no row was stored with the old decoder"
                time.sleep(0.1)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert stale_rows(db_url, world)
    code, out = gapfill(db_url, world.node.url, "enrich", "--mode", "batch")
    assert code == 0, out
    assert_exact(db_url, world, hashes)
    said = f"decoded the stored rows of {chain.token} on chain {chain.chain_id} again"
    assert said in out and "cut short" in out, out


def ref_blocks(db_url: str) -> dict[tuple[str, str], int | None]:
    """Every ref's block number, by (contract, hash)."""
    with open_store(db_url) as s, s._read() as cur:
        cur.execute("SELECT contract, tx_hash, block_number FROM refs")
        return {(c, h): None if b is None else int(b) for c, h, b in cur.fetchall()}


@pytest.mark.parametrize("plan", ["per_tx", "per_block"])
def test_a_ref_ends_with_its_transactions_block_number(
    db_url: str, world: World, plan: str, tmp_path: Path
) -> None:
    """Refs imported with a wrong block number (off by one, or past the chain's head) or
    none get their transaction's when it is stored: the per-block plan finds no such
    transaction in the block the ref names and fetches it on its own."""
    chain = world.chain
    subset = set(sorted(world.hashes)[::300])
    wrong = {h: chain.head + 1_000 if i % 2 else chain.tx_block[h] + 1
             for i, h in enumerate(sorted(subset)[:16])}  # fmt: skip
    extra = [(c, h, b) for c, refs in world.refs.items() for h, _ in refs if (b := wrong.get(h))]
    hashes = setup_db(db_url, world, tmp_path, keep=lambda h: h in subset and h not in wrong,
                      extra=extra)  # fmt: skip
    before = ref_blocks(db_url)
    assert None in before.values() and max(filter(None, before.values())) > chain.head
    code, out = gapfill(db_url, world.node.url, "enrich", "--mode", "batch", "--plan", plan, "-q")
    assert code == 0, out
    assert_exact(db_url, world, hashes)
    assert ref_blocks(db_url) == {key: chain.tx_block[key[1]] for key in before}
    code, out = gapfill(db_url, None, "status", "--json")
    assert all(s["max_block"] <= chain.head and s["unknown_block_refs"] == 0 for s in json.loads(out)), out


# -- nodes that do not annotate blockTimestamp ------------------------------------------------


def _strip_timestamps(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_timestamps(v) for k, v in value.items() if k != "blockTimestamp"}
    if isinstance(value, list):
        return [_strip_timestamps(v) for v in value]
    return value


@contextmanager
def no_timestamp_node(upstream: str) -> Iterator[str]:
    """A proxy that removes ``blockTimestamp`` from every answer, as older geth and erigon send them.

    anvil annotates receipts, logs and transactions with the block time, so without
    this the planner's header and full-block fallbacks would never run.
    """
    strip = lambda answer: json.dumps(_strip_timestamps(json.loads(answer))).encode()  # noqa: E731
    with _proxy(upstream, None, after=strip) as (url, _):
        yield url


@pytest.mark.parametrize("metered", [False, True], ids=["headers", "full_blocks"])
def test_per_tx_without_block_timestamps_is_exact(
    sqlite_url: str, world: World, metered: bool, tmp_path: Path
) -> None:
    """Free calls: transaction plus one header per block; metered (--rps): the full block."""
    subset = set(sorted(world.hashes)[::8]) | {world.chain.deploy_txs[world.chain.token]}
    hashes = setup_db(sqlite_url, world, tmp_path, keep=subset.__contains__)
    rps = ("--rps", "1000000") if metered else ()
    with no_timestamp_node(world.node.url) as url:
        code, out = gapfill(sqlite_url, url, *rps, "enrich", "--mode", "batch", "--plan", "per_tx", "-q")
    assert code == 0, out
    run = last_run(sqlite_url)
    if metered:  # a full block per block instead of a transaction per ref: fewer calls
        assert run["rpc_calls"] < 2 * len(hashes), run
    else:  # a receipt and a transaction per ref, plus the headers
        assert run["rpc_calls"] > 2 * len(hashes), run
    assert_exact(sqlite_url, world, hashes)


# -- sequential mode on a subset -----------------------------------------------------------


def test_sequential_mode_is_exact(sqlite_url: str, world: World, tmp_path: Path) -> None:
    chain = world.chain
    pick = sorted(world.hashes)
    subset = set(pick[::60])
    # Make sure the hard cases are in the subset.
    subset |= set(sorted(chain.reverted & world.hashes)[:5]) | set(sorted(chain.big_value & world.hashes)[:5])
    subset |= set(sorted(chain.internal[chain.token])[:5]) | {chain.deploy_txs[chain.token]}
    assert 250 <= len(subset) <= 400
    hashes = setup_db(sqlite_url, world, tmp_path, keep=subset.__contains__)
    code, out = gapfill(sqlite_url, world.node.url, "enrich", "--mode", "sequential", "-q")
    assert code == 0, out
    run = last_run(sqlite_url)
    assert (run["mode"], run["processed"]) == ("sequential", len(hashes)), run
    assert run["rpc_calls"] >= 2 * len(hashes), run  # one call at a time: receipt, then transaction
    before = assert_exact(sqlite_url, world, hashes)
    assert_rerun_is_a_no_op(sqlite_url, world, before)

    # The check can fail: one wrong digit in a value, or one wrong decoded argument, is caught.
    big = sorted(chain.big_value & hashes)[0]
    with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as db:
        db.execute("UPDATE transactions SET value = CAST(value AS TEXT) || '1' WHERE tx_hash = ?", (big,))
    with pytest.raises(AssertionError, match="value"):
        assert_exact(sqlite_url, world, hashes)
    with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as db:
        db.execute("UPDATE transactions SET value = substr(value, 1, length(value) - 1) WHERE tx_hash = ?",
                   (big,))  # fmt: skip
        db.execute("UPDATE logs SET event_args = json_set(event_args, '$.value', '1') "
                   "WHERE event_name = 'Pinged' AND tx_hash = (SELECT min(tx_hash) FROM logs "
                   "WHERE event_name = 'Pinged')")  # fmt: skip
    with pytest.raises(AssertionError, match="event_args"):
        assert_exact(sqlite_url, world, hashes)


# -- failures ------------------------------------------------------------------------------


def test_unknown_hash_is_a_permanent_not_found_failure(db_url: str, world: World, tmp_path: Path) -> None:
    chain = world.chain
    subset = set(sorted(world.hashes)[::400])
    known_block = chain.tx_block[sorted(subset)[0]]
    hashes = setup_db(db_url, world, tmp_path, keep=subset.__contains__,
                      extra=[(chain.token, MISSING_HASH, known_block)])  # fmt: skip
    good = hashes - {MISSING_HASH}

    code, out = gapfill(db_url, world.node.url, "enrich", "--mode", "batch", "-q")
    assert code == 3, out
    assert_exact(db_url, world, good)
    (f,) = failures_json(db_url)
    assert (f["tx_hash"], f["contract"], f["reason"], f["permanent"]) == (
        MISSING_HASH, chain.token, "not_found", True)  # fmt: skip
    code, out = gapfill(db_url, None, "failures")
    # Recorded once (by one run), whatever number of RPC tries its error mentions.
    assert code == 0 and f"{MISSING_HASH} not_found (permanent, recorded once, last " in out, out
    code, out = gapfill(db_url, None, "status", "--json")
    token_status = next(s for s in json.loads(out) if s["contract"] == chain.token)
    assert token_status["failed"] == 1 and token_status["missing"] == 0

    # The failure left the gap: a rerun asks nothing (not even the node's chain), records no
    # run, and keeps the failure.
    runs_before = last_run(db_url)
    with counting_proxy(world.node.url) as (url, stats):
        code, out = gapfill(db_url, url, "enrich", "--mode", "batch", "-q")
        methods = stats()["methods"]
    assert code == 3, out  # the permanent failure is still there, whichever run recorded it
    assert out.startswith("nothing to enrich: ") and "(1 permanent failure on record: " in out, out
    assert not methods, methods
    assert last_run(db_url) == runs_before
    assert [x["tx_hash"] for x in failures_json(db_url)] == [MISSING_HASH]

    # A dry run counts the failed ref as missing only with --retry-failed, and writes nothing.
    for flags, missing in (((), 0), (("--retry-failed",), 1)):
        code, out = gapfill(db_url, None, "enrich", "--dry-run", "--contract", chain.token, *flags)
        assert code == 0 and f"{chain.token}: {missing} missing" in out, out
    assert [x["tx_hash"] for x in failures_json(db_url)] == [MISSING_HASH]

    # --retry-failed with a node that cannot be reached keeps the failure records.
    code, out = gapfill(db_url, "http://127.0.0.1:9/", "enrich", "--mode", "batch", "--retry-failed", "-q")
    assert code == 1 and "put back" not in out and "Traceback" not in out, out
    assert [x["tx_hash"] for x in failures_json(db_url)] == [MISSING_HASH]

    # --retry-failed puts it back into the gap: it is asked for again, and fails again.
    with counting_proxy(world.node.url) as (url, stats):
        code, out = gapfill(db_url, url, "enrich", "--mode", "batch", "--retry-failed", "-q")
        methods = stats()["methods"]
    assert code == 3, out
    assert "1 failed ref put back into the gap" in out
    assert methods.get("eth_getTransactionReceipt", 0) >= 1 or methods.get("eth_getBlockReceipts", 0) >= 1
    (f,) = failures_json(db_url)
    assert (f["tx_hash"], f["reason"], f["attempts"]) == (MISSING_HASH, "not_found", 2)  # its second
    assert_exact(db_url, world, good)


# -- concurrent mode -----------------------------------------------------------------------


def test_concurrent_mode_on_postgres_is_exact(pg_url: str, world: World, tmp_path: Path) -> None:
    hashes = setup_db(pg_url, world, tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GAPFILL_", "ETH_RPC"))}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(GAPFILL_BIN), "--db", pg_url, "--rpc-url", world.node.url, "enrich", "--mode", "concurrent",
         "--workers", "2", "--batch-size", "1000", "-q"],
        capture_output=True, text=True, timeout=240, env=env,
    )  # fmt: skip
    secs = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(f"concurrent x2: {len(hashes)} txs in {secs:.1f}s")
    run = last_run(pg_url)
    assert (run["mode"], run["workers"], run["state"]) == ("concurrent", 2, "done"), run
    # The refs of the start-up sequential sample are this run's rows too. A transaction
    # tracked by both contracts may be fetched by both workers: it is stored, and counted, once.
    assert re.search(r"measured on \d+ refs", proc.stderr + proc.stdout)
    assert run["processed"] == len(hashes), run
    before = assert_exact(pg_url, world, hashes)
    assert_rerun_is_a_no_op(pg_url, world, before)


@pytest.mark.parametrize("mode", ["batch", "concurrent"])
def test_a_run_that_fails_says_why_in_runs_and_leaves_no_plan(db_url: str, world: World, mode: str) -> None:
    # Contracts tracked on chain 1, a node of chain 31337: the run fails, and `runs` keeps why.
    # The plan used to be written before the node was checked, and stayed open: imports and
    # discovery fill nothing under an open plan, and `gapfill worker` would join it.
    from gapfill.model import Contract, Ref

    with open_store(db_url) as store:
        store.add_contract(Contract(1, world.chain.token))
        store.add_refs([Ref(1, world.chain.token, MISSING_HASH, 5, "test")])
    code, out = gapfill(db_url, world.node.url, "enrich", "--chain-id", "1", "--mode", mode,
                        "--workers", "2", "-q")  # fmt: skip
    assert code == 1 and "serves chain 31337, expected 1" in out, out
    with open_store(db_url) as store:
        assert not store.has_open_batches(), "the failed check left an open plan behind"
    code, out = gapfill(db_url, None, "runs")
    assert code == 0 and f"{mode} x" in out and " failed: " in out, out
    assert "serves chain 31337, expected 1" in out, out


@pytest.mark.parametrize(
    ("mode", "sigint"),
    [("batch", signal.SIG_DFL), ("concurrent", signal.SIG_DFL), ("batch", signal.SIG_IGN)],
    ids=["batch", "concurrent", "nohup"],
)
def test_a_reader_that_leaves_stops_the_run_as_sigpipe_would(
    sqlite_url: str, world: World, tmp_path: Path, mode: str, sigint: Any
) -> None:
    # `gapfill enrich 2>&1 | head -3`: the failing progress lines were raised into the
    # engine, which failed every batch over and over at full CPU until its 125 s node-outage
    # check ended the run. Now it stops as on Ctrl+C (exit 141), and a rerun finishes.
    hashes = setup_db(sqlite_url, world, tmp_path, keep=set(sorted(world.hashes)[::4]).__contains__)
    # A slow node (0.2 s a request): the run lasts far longer than the reader stays.
    with counting_proxy(world.node.url, "--latency-s", "0.2") as (url, _):
        argv = [str(GAPFILL_BIN), "--db", sqlite_url, "--rpc-url", url, "enrich", "--mode", mode,
                "--batch-size", "100"]  # fmt: skip
        # nohup: started with SIGINT ignored, as a script's `cmd &` is; it must stop all the same.
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))  # fmt: skip
        try:
            assert proc.stderr is not None
            first = proc.stderr.readline()
            assert first.startswith(b"Run #1: mode "), first
            proc.stderr.close()  # the reader leaves
            assert proc.wait(timeout=60) == 141
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    run = last_run(sqlite_url)
    assert run["state"] == "interrupted", run
    code, out = gapfill(sqlite_url, world.node.url, "enrich", "--mode", "batch", "-q")
    assert code == 0, out
    assert_exact(sqlite_url, world, hashes)
