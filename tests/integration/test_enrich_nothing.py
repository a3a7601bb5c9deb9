"""`gapfill enrich` with nothing to do: one sentence, no run recorded, no node asked.

A rerun with every ref stored used to record a run of 0 calls ("Run #2 ... done") each
time, and with an unreachable --rpc-url said the same: it never needed the node.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import replace
from typing import Any

import orjson
import pytest
from click.testing import CliRunner, Result

from gapfill.cli import cli
from gapfill.model import Enriched, Failure
from gapfill.store import open_store

#: Nothing listens there; the key must never be printed.
UNREACHABLE = "http://127.0.0.1:1/?apikey=SECRETKEY"
A = "0x" + "aa" * 20
B = "0x" + "bb" * 20


def h(i: int) -> str:
    return "0x" + f"{i:064x}"


def run(db: str, *args: str, input: str | None = None) -> Result:
    r = CliRunner().invoke(cli, ["--db", db, *args], input=input, catch_exceptions=False)
    assert "Traceback" not in r.output + r.stderr and "SECRETKEY" not in r.output + r.stderr
    return r


def track(db: str, chain: Any, address: str, n: int) -> None:
    """Track ``address`` and import the first ``n`` of the transactions sent to it."""
    assert run(db, "contract", "add", address, "--chain-id", str(chain.chain_id)).exit_code == 0
    mine = sorted(chain.direct[address])[:n]
    assert run(db, "import", "-", "--contract", address, input="\n".join(mine)).exit_code == 0


def run_ids(db: str) -> list[int]:
    return [r["run_id"] for r in orjson.loads(run(db, "runs", "--json").output)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["auto", "sequential", "batch", "concurrent"])
def test_a_rerun_with_every_ref_stored_says_so_and_records_no_run(
    small_chain: Any, sqlite_url: str, mode: str
) -> None:
    db, chain = sqlite_url, small_chain.chain
    silent = chain.silent
    assert run(db, "contract", "add", silent, "--chain-id", str(chain.chain_id)).exit_code == 0
    mine = sorted(chain.direct[silent])[:6]
    assert run(db, "import", "-", "--contract", silent, input="\n".join(mine)).exit_code == 0
    enrich = ["enrich", "--mode", mode, *(["--workers", "2"] if mode == "concurrent" else [])]
    r = run(db, "--rpc-url", small_chain.url, *enrich)
    assert r.exit_code == 0, r.output + r.stderr
    [first] = run_ids(db)

    said = f"nothing to enrich: every ref of {silent} on chain {chain.chain_id} is stored\n"
    r = run(db, "--rpc-url", small_chain.url, *enrich)
    assert (r.exit_code, r.stderr, r.stdout) == (0, said, ""), r.output + r.stderr
    # The node is not needed to know that: not asked (nothing listens here).
    r = run(db, "--rpc-url", UNREACHABLE, *enrich, "-q")
    assert (r.exit_code, r.stderr) == (0, said), r.output + r.stderr
    assert run_ids(db) == [first]  # no run recorded for either
    # The dry run says what the run would.
    r = run(db, "--rpc-url", UNREACHABLE, "enrich", "--dry-run")
    assert r.exit_code == 0 and r.stdout.endswith(said), r.output


def test_permanent_failures_are_named_with_the_way_to_retry_them_and_exit_3(db_url: str) -> None:
    # Every ref failed for good: nothing to fetch, but not everything is stored (exit 3, as
    # a run that found them on record ends); --retry-failed is work, and needs the node.
    db = db_url
    assert run(db, "contract", "add", A, "--chain-id", "1").exit_code == 0
    hashes = [h(i) for i in range(1, 4)]
    assert run(db, "import", "-", "--contract", A, input="\n".join(hashes)).exit_code == 0
    with open_store(db) as store:
        store.write(Enriched(failures=[Failure(1, x, A, "not_found", "null") for x in hashes]))
    said = (f"nothing to enrich: every ref of {A} on chain 1 is stored or failed for good (3 permanent "
            "failures on record: `gapfill failures` says why, `gapfill enrich --retry-failed` tries "
            "them again)\n")  # fmt: skip
    for mode in ("auto", "batch"):
        r = run(db, "--rpc-url", UNREACHABLE, "enrich", "--mode", mode)
        assert (r.exit_code, r.stderr) == (3, said), r.output + r.stderr
    r = run(db, "--rpc-url", UNREACHABLE, "enrich", "--retry-failed")
    assert r.exit_code == 1 and "put back" not in r.stderr, r.stderr  # the node checked first
    assert run(db, "runs").output.strip() == "no runs yet"
    with open_store(db) as store:
        assert store.count_permanent_failures(1, A) == 3


def test_a_null_for_a_transaction_another_contract_stored_is_no_failure_on_record(db_url: str) -> None:
    # A and B share transactions: B's batch stores them; A's, leased before, commits a null
    # for one (a lagging backend), and on PostgreSQL a commit beside B's can leave such a
    # record (written here). `status` said 0 failed, but every rerun of `enrich --contract A`
    # exited 3 ("1 permanent failure on record") and `gapfill failures` listed it.
    db = db_url
    for address in (A, B):
        assert run(db, "contract", "add", address, "--chain-id", "1").exit_code == 0
        assert run(db, "import", "-", "--contract", address, input=f"{h(1)}\n{h(2)}").exit_code == 0
    with open_store(db) as store:
        store.plan(store.create_run("concurrent", 2), [(1, A), (1, B)], batch_size=10)
        a, b = store.lease("wa", 300, [(1, A)]), store.lease("wb", 300, [(1, B)])
        assert a is not None and b is not None
        rows = [_row(1, 5), _row(2, 6)]
        assert store.commit_batches([(b, Enriched(rows))]) == [2]
        null = Failure(1, h(1), A, "not_found", "null")
        assert store.commit_batches([(a, Enriched(failures=[null]))]) == [0]
        with store._tx() as cur:  # type: ignore[attr-defined]
            cur.execute(store._sql("INSERT INTO failures (chain_id, tx_hash, contract, reason) "  # type: ignore[attr-defined]
                                   "VALUES (?, ?, ?, ?)"), (1, h(2), A, "not_found"))  # fmt: skip
    said = f"nothing to enrich: every ref of {A} on chain 1 is stored\n"
    r = run(db, "--rpc-url", UNREACHABLE, "enrich", "--contract", A)
    assert (r.exit_code, r.stderr) == (0, said), r.output + r.stderr
    for args in (["--contract", A], []):
        assert run(db, "failures", *args).stdout == "no failures\n"
        assert orjson.loads(run(db, "failures", "--json", *args).stdout) == []
    assert [c["failed"] for c in orjson.loads(run(db, "status", "--json").stdout)] == [0, 0]


def _row(i: int, block: int) -> Any:
    """A stored transaction ``h(i)`` in ``block``."""
    from gapfill.model import TxRow

    return TxRow(1, h(i), block, "0x" + "00" * 32, 0, None, "0x" + "11" * 20, A, 0, "0x", 0, 21_000, None,
                 None, None, 2, 1, None, 21_000, 21_000, None, None)  # fmt: skip


#: ``gapfill enrich`` in a process that says, as it exits, which of the RPC stack's modules it loaded.
_ENRICH_THEN_MODULES = """
import atexit, sys
atexit.register(lambda: print(sorted(m for m in ("aiohttp", "gapfill.rpc.client") if m in sys.modules)))
sys.argv = ["gapfill", "--db", sys.argv[1], "--rpc-url", sys.argv[2], "enrich"]
from gapfill.cli import main
main()
"""


def test_nothing_to_enrich_does_not_load_the_rpc_stack(sqlite_url: str) -> None:
    # The rerun a cron job makes after a complete run asks no node: importing the run's
    # engine for its check loaded aiohttp (~0.15 s, a third of the command on SQLite).
    db = sqlite_url
    assert run(db, "contract", "add", A, "--chain-id", "1").exit_code == 0
    assert run(db, "import", "-", "--contract", A, input=h(1)).exit_code == 0
    with open_store(db) as store:
        store.write(Enriched(failures=[Failure(1, h(1), A, "not_found", "null")]))
    r = subprocess.run([sys.executable, "-c", _ENRICH_THEN_MODULES, db, UNREACHABLE],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 3 and r.stderr.startswith("nothing to enrich: every ref of "), r.stderr
    assert "SECRETKEY" not in r.stdout + r.stderr
    assert r.stdout.strip() == "[]"


def test_contracts_without_refs_are_told_where_refs_come_from(db_url: str) -> None:
    db = db_url
    for address, chain in ((A, "1"), (B, "5")):
        assert run(db, "contract", "add", address, "--chain-id", chain).exit_code == 0
    r = run(db, "--rpc-url", UNREACHABLE, "enrich", "--contract", A)
    assert (r.exit_code, r.stderr) == (0, f"nothing to enrich: {A} on chain 1 has no refs yet: "
                                          "`gapfill discover` or `gapfill import` finds them\n")  # fmt: skip
    # On two chains: the node is not even asked which one it serves.
    r = run(db, "--rpc-url", UNREACHABLE, "enrich")
    assert (r.exit_code, r.stderr) == (0, "nothing to enrich: the 2 tracked contracts on chains 1, 5 have "
                                          "no refs yet: `gapfill discover` or `gapfill import` finds "
                                          "them\n")  # fmt: skip
    assert run(db, "runs").output.strip() == "no runs yet"


@pytest.mark.timeout(120)
def test_nothing_to_enrich_still_finishes_a_redecode_a_killed_run_left(small_chain: Any, db_url: str) -> None:
    # Every ref is stored, but the contract's ABI came after its rows and the re-decode was
    # cut short (a run killed after `contract add --abi`, which wrote the ABI and asked for
    # the re-decode in one transaction): a rerun has nothing to fetch, yet must decode them.
    db, chain = db_url, small_chain.chain
    token = chain.token
    track(db, chain, token, 4)
    assert run(db, "--rpc-url", small_chain.url, "enrich", "--mode", "batch").exit_code == 0
    with open_store(db) as store:
        assert {t["method_name"] for t in store.fetch_transactions(chain.chain_id)} == {None}
        (contract,) = store.list_contracts()
        store.add_contract(replace(contract, abi=chain.token_abi))  # the ABI only: killed here
        assert [p[1] for p in store.pending_redecodes()] == [token]
    r = run(db, "--rpc-url", UNREACHABLE, "enrich")
    assert r.exit_code == 0, r.output + r.stderr
    assert f"nothing to enrich: every ref of {token} on chain {chain.chain_id} is stored" in r.stderr
    said = f"decoded the stored rows of {token} on chain {chain.chain_id} again (4 transactions sent to it"
    assert said in r.stderr, r.stderr
    with open_store(db) as store:
        assert store.pending_redecodes() == []
        names = {t["method_name"] for t in store.fetch_transactions(chain.chain_id)}
    assert None not in names, names


@pytest.mark.timeout(120)
def test_an_address_tracked_on_two_chains_counts_only_the_nodes_chain(
    small_chain: Any, sqlite_url: str
) -> None:
    # `--contract X` of an address tracked on the node's chain and on chain 1: the node's
    # chain is the one meant. Its copy fully stored, chain 1's failed for good: the check ran
    # on both copies before the node was asked, ended with exit 3 for chain 1's failures, and
    # named one address "the 2 tracked contracts on chains 1, 31337".
    db, chain = sqlite_url, small_chain.chain
    x, mine = chain.silent, sorted(chain.direct[chain.silent])[:4]
    assert run(db, "contract", "add", x, "--chain-id", str(chain.chain_id)).exit_code == 0
    assert run(db, "import", "-", "--contract", x, "--chain-id", str(chain.chain_id),
               input="\n".join(mine)).exit_code == 0  # fmt: skip
    assert run(db, "contract", "add", x, "--chain-id", "1").exit_code == 0
    hashes = [h(i) for i in range(1, 4)]
    assert run(db, "import", "-", "--contract", x, "--chain-id", "1", input="\n".join(hashes)).exit_code == 0
    with open_store(db) as store:
        store.write(Enriched(failures=[Failure(1, t, x, "not_found", "null") for t in hashes]))
    r = run(db, "--rpc-url", small_chain.url, "enrich", "--contract", x, "--mode", "batch")
    assert r.exit_code == 0, r.output + r.stderr
    [first] = run_ids(db)
    r = run(db, "--rpc-url", small_chain.url, "enrich", "--contract", x, "--mode", "batch")
    assert (r.exit_code, r.stderr) == (0, (
        f"{x} is tracked on chains 1, {chain.chain_id}: working on chain {chain.chain_id}, the RPC "
        f"node's chain\nnothing to enrich: every ref of {x} on chain {chain.chain_id} is stored\n"
    )), r.output + r.stderr  # fmt: skip
    assert run_ids(db) == [first]  # no run recorded


@pytest.mark.timeout(120)
def test_retry_failed_says_an_endpoint_left_out_once(small_chain: Any, sqlite_url: str) -> None:
    # `--retry-failed` checks the node before putting failures back, then the run checked
    # it again: "left out for this run: ..." came twice (and a hung endpoint was waited for
    # twice). The run now goes without what the first check left out.
    db, chain = sqlite_url, small_chain.chain
    track(db, chain, chain.silent, 6)
    r = run(db, "--rpc-url", f"{small_chain.url},{UNREACHABLE}", "enrich", "--retry-failed")
    assert r.exit_code == 0, r.output + r.stderr
    said = r.stderr.count("left out for this run: could not reach the RPC node at http://127.0.0.1:1/")
    assert said == 1, r.stderr


@pytest.mark.timeout(120)
def test_a_worker_says_an_endpoint_left_out_once(small_chain: Any, sqlite_url: str) -> None:
    # `gapfill worker` asks its endpoints' chain before joining a plan, then its run's own
    # start-up check asked them again: "left out for this run: ..." came twice (a hung
    # endpoint waited for twice). The run goes without what the first check left out.
    db, chain = sqlite_url, small_chain.chain
    track(db, chain, chain.silent, 6)
    with open_store(db) as s:  # another host's `gapfill enrich` planned the gap
        s.plan(s.create_run("batch", 1), [(chain.chain_id, chain.silent)])
    r = run(db, "--rpc-url", f"{small_chain.url},{UNREACHABLE}", "worker", "--workers", "1")
    assert r.exit_code == 0, r.output + r.stderr
    said = r.stderr.count("left out for this run: could not reach the RPC node at http://127.0.0.1:1/")
    assert said == 1, r.stderr


def _fork_servers(marker: str) -> list[int]:
    """The live fork servers whose environment holds ``marker`` (not the resource tracker,
    which multiprocessing starts with it, and which exits by itself as its parent does)."""
    import os
    from pathlib import Path

    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if (marker.encode() in (proc / "environ").read_bytes()
                        and b"multiprocessing.forkserver" in (proc / "cmdline").read_bytes()):  # fmt: skip
                    found.append(int(proc.name))
            except OSError:
                pass
    return found


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ["nothing to do", "unreachable node"])
def test_concurrent_mode_leaves_no_fork_server_when_no_worker_starts(sqlite_url: str, case: str) -> None:
    # `--mode concurrent` starts the workers' fork server as soon as it finds work, so that
    # its import overlaps the command's own; a command that then starts no worker must not
    # leave it importing behind it (it would for a few tenths of a second, orphaned).
    import os
    import uuid

    marker = f"GAPFILL_TEST_MARK={uuid.uuid4().hex}"
    assert run(sqlite_url, "contract", "add", A, "--chain-id", "31337").exit_code == 0
    if case == "unreachable node":
        assert run(sqlite_url, "import", "-", "--contract", A, input=h(1)).exit_code == 0
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
    gapfill = "import sys; sys.argv[0] = 'gapfill'; from gapfill._entry import main; main()"
    cmd = [sys.executable, "-c", gapfill, "--db", sqlite_url, "--rpc-url", UNREACHABLE, "enrich", "--mode",
           "concurrent"]  # fmt: skip
    # Its output goes to a file: with a pipe, waiting for the pipe's end would wait for a
    # fork server left holding it, and see nothing left.
    with tempfile.TemporaryFile("w+") as err:
        code = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, timeout=50).returncode
        left = _fork_servers(marker.split("=")[1])
        err.seek(0)
        said = err.read()
    assert "Traceback" not in said and "SECRETKEY" not in said, said
    if case == "nothing to do":
        assert code == 0 and "nothing to enrich" in said, said
    else:
        assert code == 1 and "could not reach the RPC node" in said, said
    assert left == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["nothing to do", "open plan of nothing missing", "refs missing",
                                  "open plan"])  # fmt: skip
def test_concurrent_mode_starts_the_fork_server_only_for_work_to_lease(
    small_chain: Any, sqlite_url: str, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `--mode concurrent` started the workers' fork server first thing (a second Python,
    # and its import of the engine, ~0.3 s) even when the run then had nothing to lease,
    # and killed it at the end: a rerun with nothing to do took ~3x as long as in batch mode.
    from gapfill.engine import forkserver

    started: list[str] = []
    real_start = forkserver.start

    def start(db_url: str, tls: bool = False) -> None:
        started.append(db_url)
        real_start(db_url, tls)

    monkeypatch.setattr(forkserver, "start", start)
    db, chain = sqlite_url, small_chain.chain
    address = chain.silent
    assert run(db, "contract", "add", address, "--chain-id", str(chain.chain_id)).exit_code == 0
    mine = sorted(chain.direct[address])[:40]  # more than the start-up sample takes (20)
    assert run(db, "import", "-", "--contract", address, input="\n".join(mine)).exit_code == 0
    with open_store(db) as store:
        if "open plan" in case:  # as an interrupted run leaves it
            run_id = store.create_run("concurrent", 2, chain_id=chain.chain_id)
            store.plan(run_id, [(chain.chain_id, address)], batch_size=10)
            store.finish_run(run_id, "interrupted", 0)
        if "nothing" in case:  # no gap: each ref failed for good
            store.write(Enriched(failures=[Failure(chain.chain_id, x, address, "not_found", "null")
                                           for x in mine]))  # fmt: skip
    rpc = UNREACHABLE if "nothing" in case else small_chain.url  # no node needed: none asked
    r = run(db, "--rpc-url", rpc, "enrich", "--mode", "concurrent", "--workers", "2")
    said = r.output + r.stderr
    if "nothing" in case:  # the permanent failures: exit 3
        # (An open plan is a run, which closes its batches: "Run #2 done".)
        assert r.exit_code == 3 and ("Run #2 done" in said) == ("open plan" in case), said
        assert started == [], "the fork server was started for a run with nothing to lease"
    else:
        assert r.exit_code == 0 and "processed: 40 transactions" in said, said
        assert started, "the workers forked from a fork server that preloaded nothing"
    assert "Traceback" not in said
