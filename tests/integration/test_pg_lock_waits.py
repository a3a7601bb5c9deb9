"""PostgreSQL lock waits are said, as SQLite's are: after ~2 s a command waiting for another
session's lock names what it waits for and who holds it, then goes on once it is released."""

from __future__ import annotations

import queue
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import IO, Any
from urllib.parse import urlsplit

import psycopg
import pytest
from click.testing import CliRunner
from engine_support import gapfill_argv

from gapfill.cli import cli
from gapfill.model import Contract, Ref
from gapfill.store import open_store
from gapfill.store.pg_wait import PLAN_LOCK, REMOVAL_LOCK

C = "0x" + "ab" * 20
C2 = "0x" + "cd" * 20
#: How long a notice may take to come: ~2 s of waiting, after a process's start.
SAY_WITHIN_S = 20.0


def run(db: str, *args: str) -> Any:
    r = CliRunner().invoke(cli, ["--db", db, *args], catch_exceptions=False)
    assert r.exit_code == 0, r.output + r.stderr
    return r


def waiting(db: str, what: str, holder: str) -> str:
    return (f"waiting for {what} in PostgreSQL database {urlsplit(db).path.lstrip('/')} at "
            f"127.0.0.1:5432, held by {holder}: gapfill goes on once it commits or ends\n")  # fmt: skip


class Lines:
    """The lines a stream gives, read by a thread, so that a test waits for one with a timeout."""

    def __init__(self, stream: IO[str] | None) -> None:
        assert stream is not None
        self.q: queue.Queue[str | None] = queue.Queue()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in iter(stream.readline, ""):
            self.q.put(line)
        self.q.put(None)

    def next(self, timeout: float = SAY_WITHIN_S) -> str | None:
        return self.q.get(timeout=timeout)

    def rest(self) -> str:
        """What else the stream gives, to its end."""
        self.thread.join(timeout=120)
        return "".join(iter(lambda: self.q.get_nowait() if not self.q.empty() else None, None))


def finish(p: subprocess.Popen[str], err: Lines) -> tuple[str, str]:
    """``p``'s output and the rest of its standard error, once it has ended."""
    assert p.stdout is not None
    with p:  # closes its pipes
        out = p.stdout.read()
        p.wait(timeout=120)
        return out, err.rest()


def gapfill(db: str, *args: str, stderr: int = subprocess.PIPE) -> subprocess.Popen[str]:
    return subprocess.Popen([*gapfill_argv(), "--db", db, *args], stdout=subprocess.PIPE, stderr=stderr,
                            text=True)  # fmt: skip


@pytest.fixture
def psql(pg_url: str) -> Iterator[psycopg.Connection[Any]]:
    """Someone's psql session, which will be left in a transaction."""
    with psycopg.connect(pg_url, application_name="psql") as conn:
        yield conn


def test_contract_remove_says_it_waits_for_a_row_and_for_another_removal_naming_who_holds_them(
    pg_url: str, psql: psycopg.Connection[Any]
) -> None:
    db = pg_url
    run(db, "contract", "add", C, "--chain-id", "1")
    run(db, "contract", "add", C2, "--chain-id", "1")
    psql.execute("SELECT * FROM contracts WHERE address = %s FOR UPDATE", (C,))  # BEGIN; ... left open
    first = gapfill(db, "contract", "remove", C, "--yes")
    first_err = Lines(first.stderr)
    second = second_err = None
    try:
        said = first_err.next()
        assert said == waiting(db, "a row of table contracts",
                               f"session {psql.info.backend_pid} of psql, idle in transaction")  # fmt: skip
        # The first removal holds the removal lock: a second one waits for it, and names it.
        second = gapfill(db, "contract", "remove", C2, "--yes")
        second_err = Lines(second.stderr)
        said2 = second_err.next()
        with psycopg.connect(db) as look:
            (session,) = look.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                (f"gapfill contract remove (pid {first.pid})",),
            ).fetchone() or (None,)
        holder = f"session {session} of gapfill contract remove (pid {first.pid})"
        assert said2 == waiting(db, "the contract removal lock", holder)
    finally:
        psql.commit()
        out, err = finish(first, first_err)
        out2, err2 = finish(second, second_err) if second and second_err else ("", "")
    assert first.returncode == 0 and err == "", err
    assert out.startswith(f"removed {C} on chain 1: ")
    assert second is not None and second.returncode == 0 and err2 == "", err2
    assert out2.startswith(f"removed {C2} on chain 1: ")
    with open_store(db) as s:
        assert s.list_contracts() == []


@pytest.mark.parametrize("lock", ["removal", "planning"])
def test_an_advisory_lock_another_session_holds_is_said_and_waited_for(
    pg_url: str, psql: psycopg.Connection[Any], lock: str
) -> None:
    heard: list[tuple[float, str]] = []
    with open_store(pg_url) as s:
        s.add_contract(Contract(1, C))
        s.add_refs([Ref(1, C, "0x" + "11" * 32, 5, "test")])
        run_id = s.create_run("concurrent", 1)
        psql.execute("SELECT pg_advisory_xact_lock(%s)", (REMOVAL_LOCK if lock == "removal" else PLAN_LOCK,))
        t0 = time.monotonic()
        said = threading.Event()

        def notice(text: str) -> None:
            heard.append((time.monotonic() - t0, text))
            said.set()

        def release() -> None:
            said.wait(SAY_WITHIN_S)  # (never said: the assertions below tell)
            psql.commit()

        s.notice = notice
        # The lock is released once the wait is said: released at a fixed 3.5 s, it left the
        # notice 1.5 s to come, which a loaded machine can miss.
        releaser = threading.Thread(target=release)
        releaser.start()
        # Not failed: each waited, then did its work.
        if lock == "removal":
            assert s.remove_contract(1, C)["refs"] == 1
        else:
            assert s.plan(run_id, [(1, C)], batch_size=10).refs == 1
        took = time.monotonic() - t0
        releaser.join()
    holder = f"session {psql.info.backend_pid} of psql, idle in transaction"
    what = "the contract removal lock" if lock == "removal" else "the planning lock"
    assert [text + "\n" for _, text in heard] == [waiting(pg_url, what, holder)]
    # Said after ~2 s of waiting, while it waited (the lock went only then), and then it went on.
    assert 1.9 <= heard[0][0] <= took, (heard, took)


def test_no_wait_and_a_long_statement_that_waits_for_no_lock_say_nothing(pg_url: str) -> None:
    heard: list[str] = []
    with open_store(pg_url, notice=heard.append) as s:
        s.add_contract(Contract(1, C))
        with s._tx() as cur:  # a plan of a million refs: seconds, and no lock waited for
            cur.execute("SELECT pg_sleep(2.6)")
        s.remove_contract(1, C)
    assert heard == []
    r = CliRunner().invoke(cli, ["--db", pg_url, "contract", "add", C, "--chain-id", "1"])
    assert r.exit_code == 0 and r.stderr == "", r.stderr
    r = CliRunner().invoke(cli, ["--db", pg_url, "contract", "remove", C, "--yes"])
    assert r.exit_code == 0 and r.stderr == "", r.stderr


def test_enrich_says_it_waits_for_a_contract_row_another_session_holds_then_fills_the_gap(
    small_chain: Any, pg_url: str, psql: psycopg.Connection[Any]
) -> None:
    db, chain = pg_url, small_chain.chain
    silent = chain.silent.lower()
    run(db, "contract", "add", silent, "--chain-id", str(chain.chain_id))
    mine = sorted(chain.direct[chain.silent])[:3]
    r = CliRunner().invoke(cli, ["--db", db, "import", "-", "--contract", silent], input="\n".join(mine))
    assert r.exit_code == 0, r.output + r.stderr
    psql.execute("SELECT * FROM contracts WHERE address = %s FOR UPDATE", (silent,))
    p = gapfill(db, "--rpc-url", small_chain.url, "enrich", "--mode", "concurrent", "--workers", "1",
                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        got = Lines(p.stdout)
        seen: list[str] = []
        deadline = time.monotonic() + SAY_WITHIN_S
        while "waiting for" not in (line := got.next(max(deadline - time.monotonic(), 0.1)) or "waiting for"):
            seen.append(line)
    finally:
        psql.commit()
    assert line == waiting(db, "a row of table contracts",
                           f"session {psql.info.backend_pid} of psql, idle in transaction"), seen  # fmt: skip
    with p:
        p.wait(timeout=120)
        out = got.rest()
    assert p.returncode == 0, out
    with open_store(db) as s:
        assert s.count_gap(chain.chain_id, silent) == 0
