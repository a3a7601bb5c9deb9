"""Helpers for the concurrent engine's fault tests (``test_engine_faults.py``).

* an exactness checker that asks the node itself (plain ``urllib`` JSON-RPC
  batches, no ``gapfill.enrich``/``gapfill.rpc`` code) and compares every stored
  transaction and log with the node's answer;
* ``gapfill`` (and the provider emulator) as subprocesses, and their process trees
  read from ``/proc``;
* a lease-interval check over the ``lease_events`` audit table;
* what every run must leave: the exact rows, a rerun that completes, leases that never overlapped;
* a tiny corrupting JSON-RPC proxy (one transaction's receipt comes back malformed);
* a hung node: it takes requests and never answers.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from glob import glob
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import psycopg
from oracle import _int, _low, rpc_batch  # one reader of the node for both exactness checks

from gapfill.model import Contract, Ref
from gapfill.store import open_store
from gapfill.testing.chain import GeneratedChain

# -- talking to the node ourselves -----------------------------------------------------------


TX_CHECKED = ("tx_hash", "block_number", "block_hash", "tx_index", "block_timestamp", "from_address",
              "to_address", "value", "input", "nonce", "gas", "gas_price", "tx_type", "status",
              "gas_used", "cumulative_gas_used", "effective_gas_price", "log_count")  # fmt: skip
LOG_CHECKED = ("tx_hash", "log_index", "block_number", "address", "topics", "data")


@dataclass
class NodeTruth:
    """What the node says about a set of transactions, reduced to the checked fields."""

    txs: dict[str, dict[str, Any]] = field(default_factory=dict)
    logs: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)


def node_truth(url: str, hashes: Iterable[str]) -> NodeTruth:
    hs = sorted({h.lower() for h in hashes})
    calls: list[tuple[str, list[Any]]] = []
    for h in hs:
        calls += [("eth_getTransactionByHash", [h]), ("eth_getTransactionReceipt", [h])]
    answers = rpc_batch(url, calls)
    pairs = {h: (answers[2 * i], answers[2 * i + 1]) for i, h in enumerate(hs)}
    numbers = sorted({int(rec["blockNumber"], 16) for _, rec in pairs.values()})
    headers = rpc_batch(url, [("eth_getBlockByNumber", [hex(n), False]) for n in numbers])
    stamps = {n: int(b["timestamp"], 16) for n, b in zip(numbers, headers, strict=True)}
    truth = NodeTruth()
    for h, (tx, rec) in pairs.items():
        assert tx is not None and rec is not None, f"the node does not know {h}"
        block = int(rec["blockNumber"], 16)
        truth.txs[h] = {
            "tx_hash": h,
            "block_number": block,
            "block_hash": rec["blockHash"].lower(),
            "tx_index": int(rec["transactionIndex"], 16),
            "block_timestamp": stamps[block],
            "from_address": tx["from"].lower(),
            "to_address": _low(tx.get("to")),
            "value": int(tx["value"], 16),
            "input": tx["input"].lower(),
            "nonce": int(tx["nonce"], 16),
            "gas": int(tx["gas"], 16),
            "gas_price": _int(tx.get("gasPrice")),
            "tx_type": int(tx["type"], 16),
            "status": int(rec["status"], 16),
            "gas_used": int(rec["gasUsed"], 16),
            "cumulative_gas_used": int(rec["cumulativeGasUsed"], 16),
            "effective_gas_price": int(rec["effectiveGasPrice"], 16),
            "log_count": len(rec["logs"]),
        }
        for lg in rec["logs"]:
            index = int(lg["logIndex"], 16)
            truth.logs[(h, index)] = {
                "tx_hash": h,
                "log_index": index,
                "block_number": int(lg["blockNumber"], 16),
                "address": lg["address"].lower(),
                "topics": [t.lower() for t in lg["topics"]],
                "data": lg["data"].lower(),
            }
    return truth


def exactness_problems(db_url: str, chain_id: int, truth: NodeTruth, hashes: Iterable[str],
                       limit: int = 10) -> list[str]:  # fmt: skip
    """Differences between the database and the node for exactly ``hashes`` (empty when exact)."""
    want = {h.lower() for h in hashes}
    with open_store(db_url) as store:
        rows = store.fetch_transactions(chain_id)
        logs = store.fetch_logs(chain_id)
    problems: list[str] = []
    got = {r["tx_hash"]: r for r in rows}
    if len(got) != len(rows):
        problems.append(f"{len(rows) - len(got)} duplicated transaction rows")
    missing, extra = sorted(want - set(got)), sorted(set(got) - want)
    if missing:
        problems.append(f"{len(missing)} transactions missing, e.g. {missing[:3]}")
    if extra:
        problems.append(f"{len(extra)} transactions that are not refs, e.g. {extra[:3]}")
    for h in sorted(want & set(got)):
        row, node = got[h], truth.txs[h]
        for col in TX_CHECKED:
            if row[col] != node[col] or type(row[col]) is not type(node[col]):
                problems.append(f"{h} {col}: stored {row[col]!r}, node says {node[col]!r}")
        if len(problems) >= limit:
            return problems
    want_logs = {k: v for k, v in truth.logs.items() if k[0] in want}
    got_logs: dict[tuple[str, int], dict[str, Any]] = {}
    for lg in logs:
        topics = [t for t in (lg["topic0"], lg["topic1"], lg["topic2"], lg["topic3"]) if t is not None]
        got_logs[(lg["tx_hash"], lg["log_index"])] = {
            "tx_hash": lg["tx_hash"], "log_index": lg["log_index"], "block_number": lg["block_number"],
            "address": lg["address"], "topics": topics, "data": lg["data"],
        }  # fmt: skip
    if len(got_logs) != len(logs):
        problems.append(f"{len(logs) - len(got_logs)} duplicated log rows")
    lmissing, lextra = sorted(set(want_logs) - set(got_logs)), sorted(set(got_logs) - set(want_logs))
    if lmissing:
        problems.append(f"{len(lmissing)} logs missing, e.g. {lmissing[:3]}")
    if lextra:
        problems.append(f"{len(lextra)} unexpected logs, e.g. {lextra[:3]}")
    for k in sorted(set(want_logs) & set(got_logs)):
        if got_logs[k] != want_logs[k]:
            problems.append(f"log {k}: stored {got_logs[k]}, node says {want_logs[k]}")
        if len(problems) >= limit:
            break
    return problems


# -- the database ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seeded:
    """The refs a test database holds: per contract, and the union of hashes."""

    refs: dict[str, frozenset[str]]

    @property
    def hashes(self) -> frozenset[str]:
        return frozenset().union(*self.refs.values())


def chain_refs(chain: GeneratedChain) -> dict[str, frozenset[str]]:
    """Token: every tx that reaches or logs from it; Silent: every tx that reaches it.

    Router calls reach both, so those hashes are refs of two contracts (two batches
    write the same row: idempotency gets exercised too).
    """
    token = chain.direct[chain.token] | chain.emitted[chain.token] | chain.internal[chain.token]
    silent = chain.direct[chain.silent] | chain.internal[chain.silent]
    return {chain.token: frozenset(token), chain.silent: frozenset(silent)}


def seed(db_url: str, chain: GeneratedChain, refs: dict[str, frozenset[str]] | None = None) -> Seeded:
    refs = refs if refs is not None else chain_refs(chain)
    abis = {chain.token: chain.token_abi, chain.silent: chain.silent_abi}
    with open_store(db_url) as store:
        for address, hashes in refs.items():
            store.add_contract(Contract(chain.chain_id, address, None, None, abis.get(address)))
            store.add_refs(Ref(chain.chain_id, address, h, chain.tx_block[h], "test") for h in sorted(hashes))
    return Seeded(refs)


def record_sequential_run(db_url: str) -> None:
    """Record a finished sequential run, so coordinators skip measuring one.

    Without it each coordinator first enriches 20 refs one call at a time for its
    speedup figure, which through a slow emulator costs many seconds per run.
    """
    with open_store(db_url) as store:
        run_id = store.create_run("sequential", 1, note="recorded by the test")
        with store._tx() as cur:  # as if it had written 20 rows
            cur.execute(store._sql("UPDATE runs SET processed = 20 WHERE run_id = ?"), (run_id,))
        store.finish_run(run_id, "done", 40)


def query(db_url: str, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """One query on a short connection that is not named ``gapfill`` (so it is never terminated)."""
    with psycopg.connect(db_url, autocommit=True, application_name="gapfill-test") as conn:
        return list(conn.execute(sql.encode(), params).fetchall())  # type: ignore[arg-type]


def leased_now(db_url: str) -> list[tuple[int, str]]:
    return [(int(b), o) for b, o in query(db_url, "SELECT batch_id, lease_owner FROM batches "
                                                  "WHERE state = 'leased' ORDER BY batch_id")]  # fmt: skip


def committed_count(db_url: str) -> int:
    return int(query(db_url, "SELECT count(*) FROM lease_events WHERE event = 'committed'")[0][0])


def owner_pid(owner: str) -> int:
    """``host:pid/wN`` -> pid."""
    return int(owner.rsplit(":", 1)[1].split("/", 1)[0])


@dataclass(frozen=True)
class Ev:
    event_id: int
    batch_id: int
    owner: str
    attempt: int
    event: str
    at: float


def lease_events(db_url: str) -> list[Ev]:
    rows = query(db_url, "SELECT event_id, batch_id, owner, attempt, event, at FROM lease_events "
                         "ORDER BY event_id")  # fmt: skip
    return [Ev(int(i), int(b), o, int(a), e, float(t)) for i, b, o, a, e, t in rows]


def lease_overlaps(events: Sequence[Ev]) -> list[str]:
    """Check the audit trail: per batch, one holder at a time, in event order and in time.

    A lease runs from ``leased`` to the holder's ``committed``/``abandoned``/``expired``
    (same owner and attempt). Returns the violations found (empty when none).
    """
    problems: list[str] = []
    by_batch: dict[int, list[Ev]] = {}
    for e in events:
        by_batch.setdefault(e.batch_id, []).append(e)
    for batch_id, evs in by_batch.items():
        holder: Ev | None = None
        last_end = float("-inf")
        commits = 0
        for e in evs:
            if e.event == "leased":
                if holder is not None:
                    problems.append(f"batch {batch_id}: {e.owner} (attempt {e.attempt}) leased it while "
                                    f"{holder.owner} (attempt {holder.attempt}) still held it")  # fmt: skip
                if e.at < last_end:
                    problems.append(f"batch {batch_id}: leased at {e.at} before the previous lease ended "
                                    f"at {last_end}")  # fmt: skip
                holder = e
            elif e.event in ("committed", "abandoned", "expired"):
                if holder is None or (holder.owner, holder.attempt) != (e.owner, e.attempt):
                    who = "nobody" if holder is None else f"{holder.owner} (attempt {holder.attempt})"
                    problems.append(f"batch {batch_id}: {e.event} by {e.owner} (attempt {e.attempt}) "
                                    f"while {who} held it")  # fmt: skip
                    continue
                commits += e.event == "committed"
                last_end = e.at
                holder = None
            elif e.event == "renewed" and (
                holder is None or (holder.owner, holder.attempt) != (e.owner, e.attempt)
            ):
                problems.append(f"batch {batch_id}: renewed by {e.owner} who does not hold it")
        if commits != 1:
            problems.append(f"batch {batch_id}: committed {commits} times")
        if holder is not None:
            problems.append(f"batch {batch_id}: still held by {holder.owner} at the end")
    return problems


# -- processes ---------------------------------------------------------------------------------


def gapfill_argv() -> list[str]:
    script = Path(sys.executable).with_name("gapfill")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from gapfill.cli import main; main()"]


def children(pid: int) -> set[int]:
    out: set[int] = set()
    for path in glob(f"/proc/{pid}/task/*/children"):
        with contextlib.suppress(OSError):
            out.update(int(p) for p in Path(path).read_text().split())
    return out


def descendants(pid: int) -> set[int]:
    out: set[int] = set()
    todo = [pid]
    while todo:
        for c in children(todo.pop()):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def state(pid: int) -> str:
    """The process's state letter from ``/proc`` (``R``, ``S``, ``Z`` ...); "" when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return ""
    for line in status.splitlines():
        if line.startswith("State:"):
            return line.split(":", 1)[1].split()[0]
    return "?"


def alive(pid: int) -> bool:
    """Running (a zombie is not: it only waits to be reaped)."""
    return state(pid) not in ("", "Z")


def zombie(pid: int) -> bool:
    """Dead but not reaped yet: its parent has not waited for it (``kill(pid, 0)`` still succeeds)."""
    return state(pid) == "Z"


def process_group(pgid: int) -> set[int]:
    """The live processes of process group ``pgid`` (a ``GapfillProc`` leads its own): the
    coordinator's fork server, workers and resource tracker stay in it after it dies,
    whoever their parent is then."""
    out: set[int] = set()
    for path in glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # Fields after the command name, which may hold spaces: state ppid pgrp ...
            fields = Path(path).read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.add(int(path.split("/")[2]))
    return out


def worker_pids(coordinator: int) -> set[int]:
    """The coordinator's worker processes: the children of its ``multiprocessing`` fork server."""
    servers = [p for p in children(coordinator) if "forkserver" in cmdline(p)]
    return {w for server in servers for w in children(server)}


def wait_for(what: str, cond: Callable[[], Any], timeout_s: float, every_s: float = 0.1,
             proc: GapfillProc | None = None) -> Any:  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while True:
        got = cond()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"gave up waiting for {what}: gapfill exited with {proc.poll()}\n"
                                 f"{proc.output()}")  # fmt: skip
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout_s:.0f}s"
                                 + (f"\n{proc.output()}" if proc else ""))  # fmt: skip
        time.sleep(every_s)


class GapfillProc:
    """``gapfill ARGS`` in the background, output kept in files for failure messages."""

    def __init__(self, args: Sequence[str], log_dir: Path, name: str, *, ignore_sigint: bool = False) -> None:
        self.name = name
        self.out_path = log_dir / f"{name}.out"
        self.err_path = log_dir / f"{name}.err"
        self._out = self.out_path.open("wb")
        self._err = self.err_path.open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "dumb"}
        # ignore_sigint: as a non-interactive shell starts `cmd &`.
        # Otherwise SIGINT as a terminal leaves it, whatever this test run inherited (a CI
        # started in the background ignores it, and so would every child).
        disposition = signal.SIG_IGN if ignore_sigint else signal.SIG_DFL
        preexec = lambda: signal.signal(signal.SIGINT, disposition)  # noqa: E731
        self.proc = subprocess.Popen([*gapfill_argv(), *args], stdin=subprocess.DEVNULL, stdout=self._out,
                                     stderr=self._err, env=env, start_new_session=True,
                                     preexec_fn=preexec)  # fmt: skip
        self.pid = self.proc.pid
        self.seen: set[int] = set()  # every descendant pid seen while polling

    def poll(self) -> int | None:
        if self.proc.poll() is None:
            self.seen |= descendants(self.pid)
        return self.proc.poll()

    def wait(self, timeout_s: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill_tree()
            raise AssertionError(
                f"{self.name} did not finish within {timeout_s:.0f}s\n{self.output()}"
            ) from None
        self._close()
        return rc

    def output(self, tail: int = 4000) -> str:
        with contextlib.suppress(Exception):
            self._out.flush()
            self._err.flush()
        out = self.out_path.read_text(errors="replace")[-tail:]
        err = self.err_path.read_text(errors="replace")[-tail:]
        return f"--- {self.name} stdout ---\n{out}\n--- {self.name} stderr ---\n{err}"

    def kill_tree(self) -> None:
        pids = descendants(self.pid) | self.seen
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=10)
        self._close()

    def close(self) -> None:
        """Kill the process tree if it still runs; close the log files. Idempotent."""
        if self.proc.poll() is None:
            self.kill_tree()
        self._close()

    def _close(self) -> None:
        self._out.close()
        self._err.close()


def gapfill(args: Sequence[str], log_dir: Path, name: str, timeout_s: float = 120) -> tuple[int, str]:
    """Run ``gapfill ARGS`` to the end; returns the exit code and its output."""
    p = GapfillProc(args, log_dir, name)
    rc = p.wait(timeout_s)
    return rc, p.output(20_000)


@contextlib.contextmanager
def emulator(upstream: str, *flags: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``python -m gapfill.testing.emulator`` in front of ``upstream``; yields (url, process)."""
    proc = subprocess.Popen([sys.executable, "-m", "gapfill.testing.emulator", "--upstream", upstream,
                             "--port", "0", *flags], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().decode().strip()
        assert url.startswith("http://"), f"the emulator did not start: {url!r}"
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def emulator_stats(url: str) -> dict[str, Any]:
    base = url.split("/", 3)
    with urllib.request.urlopen(f"{base[0]}//{base[2]}/_emulator/stats", timeout=10) as resp:
        stats: dict[str, Any] = json.loads(resp.read())
        return stats


# -- what a run must leave ---------------------------------------------------------------------


@dataclass(frozen=True)
class NodeChain:
    """The fault tests' node and the chain generated on it."""

    url: str
    chain: GeneratedChain


def assert_exact(db_url: str, node_chain: NodeChain, truth: NodeTruth, seeded: Seeded) -> None:
    """Every ref's transaction and logs are stored as the node says, nothing else is, and
    every batch of the plan is done."""
    problems = exactness_problems(db_url, node_chain.chain.chain_id, truth, seeded.hashes)
    assert not problems, "\n".join(problems)
    assert query(db_url, "SELECT count(*) FROM batches WHERE state <> 'done'")[0][0] == 0


def assert_rerun_is_exact(db_url: str, args: Sequence[str], log_dir: Path, node_chain: NodeChain,
                          truth: NodeTruth, seeded: Seeded) -> str:  # fmt: skip
    """Run ``gapfill ARGS`` again after a run that was cut short (killed, interrupted, its
    node gone): it exits 0 and leaves the database exact. Returns its output."""
    rc, out = gapfill(args, log_dir, "rerun")
    assert rc == 0, out
    assert_exact(db_url, node_chain, truth, seeded)
    return out


def assert_leases_never_overlapped(db_url: str) -> list[Ev]:
    """The lease audit trail, checked by :func:`lease_overlaps` (one holder at a time, each
    batch committed once); returned for the test's own checks."""
    events = lease_events(db_url)
    problems = lease_overlaps(events)
    assert not problems, "\n".join(problems)
    return events


# -- loopback servers ------------------------------------------------------------------------------


class _Loopback:
    """A threaded HTTP server on 127.0.0.1, serving while in a ``with`` block."""

    server: ThreadingHTTPServer
    url: str

    def _serve(self, handler: type[BaseHTTPRequestHandler], path: str = "") -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{path}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _forward(upstream: str, body: bytes) -> Any:
    """The decoded answer of ``upstream`` to the JSON-RPC request ``body``."""
    req = urllib.request.Request(upstream, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def _answer(handler: BaseHTTPRequestHandler, reply: Any) -> None:
    out = json.dumps(reply).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(out)))
    handler.end_headers()
    handler.wfile.write(out)


# -- a provider that answers one transaction's receipt with garbage --------------------------------


class CorruptingProxy(_Loopback):
    """A loopback JSON-RPC proxy: every receipt of ``bad_hash`` comes back with its ``field``
    malformed (``value``; by default a ``blockNumber`` that is not a number), as a broken
    provider might; everything else is upstream's."""

    def __init__(self, upstream: str, bad_hash: str, field: str = "blockNumber",
                 value: str = "0xnot-a-number") -> None:  # fmt: skip
        self.upstream = upstream
        self.bad_hash = bad_hash.lower()
        self.field, self.value = field, value
        self.corrupted = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                _answer(self, proxy._mangle(_forward(proxy.upstream, body)))

            def log_message(self, format: str, *args: object) -> None:
                return

        self._serve(Handler)

    def _mangle(self, reply: Any) -> Any:
        items = reply if isinstance(reply, list) else [reply]
        for item in items:
            result = item.get("result") if isinstance(item, dict) else None
            receipts = result if isinstance(result, list) else [result]
            for rec in receipts:
                if isinstance(rec, dict) and str(rec.get("transactionHash", "")).lower() == self.bad_hash \
                        and "cumulativeGasUsed" in rec:  # fmt: skip
                    rec[self.field] = self.value
                    self.corrupted += 1
        return reply


# -- a node that takes requests and never answers --------------------------------------------------


class HungNode(_Loopback):
    """A loopback URL that accepts connections and requests but never answers (a hung
    node), and counts the requests it got. Its URL ends in ``path`` (a fake API key).
    With ``upstream``, the requests :meth:`_stalls` lets through are upstream's to answer."""

    def __init__(self, path: str = "/", upstream: str | None = None) -> None:
        self.requests = 0
        self._lock = threading.Lock()
        self._release = threading.Event()
        node = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if upstream is not None and not node._stalls(body):
                    _answer(self, _forward(upstream, body))
                    return
                with node._lock:
                    node.requests += 1
                node._release.wait()  # no answer: the connection is closed when the test ends
                self.close_connection = True

            def log_message(self, format: str, *args: object) -> None:
                return

        self._serve(Handler, path)

    def _stalls(self, body: bytes) -> bool:
        return True

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        super().__exit__(*exc)


class StallingProxy(HungNode):
    """A loopback JSON-RPC proxy that never answers the ``nth`` request (counted from 1)
    holding one call of ``method`` with ``params``; everything else is upstream's."""

    def __init__(self, upstream: str, method: str, params: list[Any], nth: int) -> None:
        self.call = (method, params)
        self.nth = nth
        self.seen = 0
        super().__init__("/", upstream)

    def _stalls(self, body: bytes) -> bool:
        call = json.loads(body)
        if not isinstance(call, dict) or (call.get("method"), call.get("params")) != self.call:
            return False
        with self._lock:
            self.seen += 1
            return self.seen == self.nth


def _emulator_control(url: str, what: str) -> None:
    """``POST /_emulator/<what>`` to the emulator at ``url``."""
    base = url.split("/", 3)
    request = urllib.request.Request(f"{base[0]}//{base[2]}/_emulator/{what}", method="POST")
    with urllib.request.urlopen(request, timeout=10):
        pass


def rpc_release(url: str) -> None:
    """Let the requests the emulator at ``url`` holds (``rpc_held``, or its ``--hold-at``
    cue) through, and the ones after them."""
    _emulator_control(url, "release")


def rpc_hold(url: str) -> None:
    """Hold every RPC request to the emulator at ``url`` from now on (none is answered)
    until :func:`rpc_release`."""
    _emulator_control(url, "hold")


@contextlib.contextmanager
def rpc_held(url: str) -> Iterator[None]:
    """Hold every RPC request to the emulator at ``url`` (none is answered) for the block:
    a run cannot finish meanwhile, and its workers wait on calls, holding their leases."""
    rpc_hold(url)
    try:
        yield
    finally:
        rpc_release(url)


def rpc_held_on_cue(url: str, proc: GapfillProc) -> None:
    """Return once the emulator at ``url``, started with ``--hold-at``, holds a request of
    ``proc``'s run: the run is frozen just past the call of the cue."""
    wait_for("the emulator's cue", lambda: emulator_stats(url)["held"] > 0, 60, proc=proc)
