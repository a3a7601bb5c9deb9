"""Which lease owners and running runs a process may judge dead: only those of its own
host name, machine, boot and PID namespace (or of an earlier boot of its machine), and
those an older gapfill wrote (by host name, as before)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from gapfill.cli import cli
from gapfill.model import Contract, Ref
from gapfill.store import Store, liveness, open_store, run_owner
from gapfill.store.liveness import INIT_PID_NS, Space

A = "0x" + "aa" * 20
#: This process, as each test makes it: a machine's initial PID namespace, boot b1.
HERE = Space("0a0a0a0a0a0a", "b1b1b1b1b1b1", INIT_PID_NS)


@pytest.fixture
def gone_pid() -> int:
    """A pid no process has here any more."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _store(tmp_path: Path) -> Store:
    store = open_store(f"sqlite:///{tmp_path / 'g.db'}")
    store.add_contract(Contract(1, A))
    store.add_refs([Ref(1, A, f"0x{i:064x}", i) for i in range(1, 31)])
    return store


def _run_of(store: Store, monkeypatch: pytest.MonkeyPatch, space: Space | None, pid: int) -> tuple[int, str]:
    """A run started by process ``pid`` of this host name in ``space`` (None: an older
    gapfill's, which wrote none), holding a lease; returns its id and owner."""
    with monkeypatch.context() as m:
        m.setattr(liveness, "here", lambda: space)
        run = store.create_run("concurrent", 1)
        owner = run_owner(liveness.owner_host(), pid, "w1", run)
    with store._tx() as cur:
        cur.execute(store._sql("UPDATE runs SET pid = ? WHERE run_id = ?"), (pid, run))
    store.plan(run, [(1, A)], batch_size=10)
    assert store.lease(owner, 300.0) is not None
    return run, owner


def _state(store: Store, run: int) -> str:
    return {r.run_id: r.state for r in store.list_runs()}[run]


@pytest.mark.parametrize(
    "other",
    [
        Space(HERE.machine, HERE.boot, 4026532999),  # a container (--network host) beside it
        Space("0b0b0b0b0b0b", "b0b0b0b0b0b0", INIT_PID_NS),  # a cloned VM that kept the name
        Space(HERE.machine, "b0b0b0b0b0b0", 4026532999),  # a container of an earlier boot
        Space("", "b0b0b0b0b0b0", INIT_PID_NS),  # a machine without a machine id
    ],
    ids=["namespace", "machine", "container-of-earlier-boot", "no-machine-id"],
)
def test_a_process_of_another_namespace_or_machine_is_never_judged_dead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gone_pid: int, other: Space
) -> None:
    # Review: a coordinator starting released the live leases of a `gapfill worker` in a
    # container with the host's name (its pid was no process here), whose commits then
    # failed the lease check, and marked its running run `interrupted`.
    with _store(tmp_path) as store:
        run, owner = _run_of(store, monkeypatch, other, gone_pid)
        monkeypatch.setattr(liveness, "here", lambda: HERE)
        assert store.release_dead_local_owners() == {}
        store.create_run("batch", 1)  # the run that would notice it
        assert store.lease_owners() == [owner]  # left to its lease's expiry
        assert _state(store, run) == "running"
        out = CliRunner().invoke(cli, ["--db", f"sqlite:///{tmp_path / 'g.db'}", "runs"])
        assert out.exit_code == 0, out.output
        line = next(x for x in out.output.splitlines() if x.startswith(f"#{run} "))
        assert f" {socket.gethostname()} concurrent x1 running (not checked from here): " in line


def test_an_earlier_boot_of_this_machine_is_gone_whatever_its_pid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After a reboot a pid of the old boot may be a live process of this one: nothing of
    # that boot runs, so its leases go back and its run is interrupted at once.
    with _store(tmp_path) as store:
        run, _owner = _run_of(
            store, monkeypatch, Space(HERE.machine, "b0b0b0b0b0b0", INIT_PID_NS), os.getpid()
        )
        monkeypatch.setattr(liveness, "here", lambda: HERE)
        assert store.release_dead_local_owners() == {os.getpid(): 1}
        assert store.lease_owners() == []
        store.create_run("batch", 1)
        assert _state(store, run) == "interrupted"


@pytest.mark.parametrize("space", [HERE, None], ids=["same-space", "older-gapfill"])
def test_a_dead_process_of_this_space_or_an_older_gapfills_row_is_judged_by_its_pid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gone_pid: int, space: Space | None
) -> None:
    # An older gapfill's owners (host:pid/...) and runs (no space) are judged by host name
    # as it judged them, so an upgrade strands no lease and no `running` row.
    with _store(tmp_path) as store:
        run, owner = _run_of(store, monkeypatch, space, gone_pid)
        assert (":" in owner.split("@")[0]) is (space is None)  # an older gapfill's owner id
        alive, _ = _run_of(store, monkeypatch, space, os.getpid())
        monkeypatch.setattr(liveness, "here", lambda: HERE)
        assert store.release_dead_local_owners() == {gone_pid: 1}
        store.create_run("batch", 1)
        assert (_state(store, run), _state(store, alive)) == ("interrupted", "running")
        assert {r.run_id: r.judged_here for r in store.list_runs()}[alive] is True


def test_without_proc_a_process_writes_and_judges_as_older_versions_did(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gone_pid: int
) -> None:
    with _store(tmp_path) as store:
        run, _owner = _run_of(store, monkeypatch, HERE, gone_pid)
        monkeypatch.setattr(liveness, "here", lambda: None)
        assert liveness.owner_host() == socket.gethostname()
        assert store.release_dead_local_owners() == {}  # a space it cannot place
        legacy, _ = _run_of(store, monkeypatch, None, gone_pid)
        assert store.release_dead_local_owners() == {gone_pid: 1}
        store.create_run("batch", 1)
        assert (_state(store, run), _state(store, legacy)) == ("running", "interrupted")


def test_a_space_reads_back_as_written_and_this_process_has_one() -> None:
    for space in (HERE, Space("", "b0", 4026532999)):
        assert Space.parse(str(space)) == space
    assert Space.parse(None) is None
    odd = Space.parse("a later version's")  # judged by nobody, not as an older gapfill's
    assert odd is not None and odd != HERE and odd.pidns != INIT_PID_NS
    mine = liveness.here()
    if os.path.exists("/proc/self/ns/pid"):
        assert mine is not None and mine.pidns == os.stat("/proc/self/ns/pid").st_ino


def test_an_expired_lease_is_said_with_its_owners_host_and_pid_not_its_space() -> None:
    # What the progress lines show stays `host:pid/runN/wN`: the space is for judging.
    from types import SimpleNamespace

    from gapfill.engine.events import Notice
    from gapfill.engine.metrics import LeaseTally
    from gapfill.engine.run import Coordinator
    from gapfill.model import Batch

    owner = f"w1@{HERE}:4242/run7/w2"
    said: list[object] = []
    expired = Batch(3, 7, 1, A, (1, "0x00"), (9, "0xff"), 10, "leased", 1, owner, 0.0)
    store = SimpleNamespace(expire_leases=lambda: [expired])
    coordinator = SimpleNamespace(leases=LeaseTally(), emit=said.append, slots={}, expired_from=None,
                                  _kill_stuck=lambda owner, batch_id, attempt: None)  # fmt: skip
    Coordinator._supervise_leases(coordinator, store)  # type: ignore[arg-type]
    assert said == [Notice("lease of batch 3 held by w1:4242/run7/w2 expired; it goes back to the plan")]
    assert liveness.shown_owner("h:1/run2/w3") == "h:1/run2/w3"  # an older gapfill's


def test_a_local_worker_whose_expired_lease_another_worker_took_is_killed_as_stuck() -> None:
    # The other worker's lease call took the batch back itself, before the coordinator's
    # check: the worker that held it was left stuck in its call, unsaid ("stuck past its
    # lease" missing from a CI run's output). Now it is killed once, as when the coordinator
    # takes the lease back, however many of its leases were taken and however often seen.
    from types import SimpleNamespace

    from gapfill.engine.events import Notice
    from gapfill.engine.metrics import LeaseTally
    from gapfill.engine.run import Coordinator

    said: list[object] = []
    killed: list[int] = []

    def slot(index: int) -> SimpleNamespace:
        proc = SimpleNamespace(is_alive=lambda: True, kill=lambda: killed.append(index))
        return SimpleNamespace(index=index, proc=proc, stuck=False)

    slots = {0: slot(0), 1: slot(1), 2: slot(2)}
    # Worker 3 let batch 6's lease expire (its give-back failed in a database outage) and went
    # on: no stuck worker, whoever takes the lease back. Worker 1's lease of batch 2 the
    # coordinator takes back itself: said once, its event seen below too.
    events = [(6, 2, "me/w0", 1), (7, 3, "me/w1", 1), (8, 4, "me/w1", 1), (9, 5, "elsewhere/w1", 1),
              (10, 6, "me/w2", 1)]  # fmt: skip
    asked: list[int] = []

    def expired_after(after: int) -> tuple[int, list[tuple[int, int, str, int]]]:
        asked.append(after)
        return 2_000, [e for e in events if e[0] > after]

    from gapfill.model import Batch

    own = [Batch(2, 7, 1, A, (1, "0x00"), (9, "0xff"), 10, "leased", 1, "me/w0", 0.0)]
    store = SimpleNamespace(expire_leases=lambda: own[:1] and [own.pop()], expired_after=expired_after)
    coordinator = SimpleNamespace(leases=LeaseTally(), emit=said.append, slots=slots, expired_from=5,
                                  expired_seen=set(), let_expire={(6, 1)},
                                  _owner=lambda s: f"me/w{s.index}")  # fmt: skip
    coordinator._kill_stuck = lambda *a: Coordinator._kill_stuck(coordinator, *a)  # type: ignore[arg-type]
    for _ in range(2):
        Coordinator._supervise_leases(coordinator, store)  # type: ignore[arg-type]
    assert killed == [0, 1] and said == [
        Notice("lease of batch 2 held by me/w0 expired; it goes back to the plan"),
        Notice("[Worker-1] is stuck past its lease; killing it"),
        Notice("[Worker-2] is stuck past its lease; killing it"),
    ]
    assert coordinator.let_expire == set()
    from gapfill.engine.events import LEASE_GONE, BatchAbandoned

    taking = SimpleNamespace(slots={}, leases=LeaseTally(), done_batches=0, committed=0, committed_failed=0,
                             let_expire=set(), emit=said.append)  # fmt: skip
    for batch_id, not_given in ((11, "database gone"), (12, ""), (13, LEASE_GONE)):
        # Its first try, on its third lease (two stops gave the others back): the lease it
        # leaves to expire is lease 3, as the 'expired' event will say, not attempt 1.
        Coordinator._take(taking, BatchAbandoned(2, batch_id, "stopping", 1, 3, not_given=not_given))  # type: ignore[arg-type]
    assert taking.let_expire == {(11, 3)}
    assert asked == [5, 1_000]  # then it looks back 1,000 events, not from the start
    assert coordinator.expired_seen == set()  # the events seen are forgotten once out of reach


def test_a_worker_stuck_on_a_batch_another_once_let_expire_is_killed_all_the_same() -> None:
    # The coordinator spared a worker stuck past its lease of a batch whose number another
    # worker's failed give-back had left: that lease had ended without expiring (the other
    # worker's release_owner, after a lost lease answer, gave it back), so the entry was
    # still there, and the stuck worker holding no other lease stayed stuck. A lease is a
    # batch and an attempt: only the very lease let expire is spared.
    from types import SimpleNamespace

    from gapfill.engine.events import BatchAbandoned
    from gapfill.engine.metrics import LeaseTally
    from gapfill.engine.run import Coordinator
    from gapfill.model import Batch

    killed: list[int] = []

    def slot(index: int) -> SimpleNamespace:
        proc = SimpleNamespace(is_alive=lambda: True, kill=lambda: killed.append(index))
        return SimpleNamespace(index=index, proc=proc, stuck=False)

    def coordinator(taken: list[tuple[int, int, str, int]]) -> tuple[SimpleNamespace, SimpleNamespace]:
        c = SimpleNamespace(slots={0: slot(0), 1: slot(1)}, leases=LeaseTally(), done_batches=0,
                            committed=0, committed_failed=0, let_expire=set(), emit=lambda ev: None,
                            expired_from=0 if taken else None, expired_seen=set(),
                            _owner=lambda s: f"me/w{s.index + 1}")  # fmt: skip
        c._kill_stuck = lambda *a: Coordinator._kill_stuck(c, *a)  # type: ignore[arg-type]
        # Worker 2's give-back of batch 6 (attempt 1) failed: said, left to expire. It never
        # did: worker 2's release_owner gave it back, so no 'expired' event came for it.
        Coordinator._take(c, BatchAbandoned(1, 6, "HTTP 502", 1, 1, not_given="lost the connection"))  # type: ignore[arg-type]
        stuck = Batch(6, 7, 1, A, (1, "0x00"), (9, "0xff"), 10, "leased", 2, "me/w1", 0.0)
        store = SimpleNamespace(expire_leases=lambda: [] if taken else [stuck],
                                expired_after=lambda after: (10, taken))  # fmt: skip
        return c, store

    # Worker 1's lease of batch 6, attempt 2, expires: the coordinator takes it back ...
    c, store = coordinator([])
    Coordinator._supervise_leases(c, store)  # type: ignore[arg-type]
    assert killed == [0]
    # ... or another worker's lease call does.
    killed.clear()
    c, store = coordinator([(9, 6, "me/w1", 2)])
    Coordinator._supervise_leases(c, store)  # type: ignore[arg-type]
    assert killed == [0]
    # The lease worker 2 let expire, when it does expire, still kills nobody.
    killed.clear()
    c, store = coordinator([(9, 6, "me/w2", 1)])
    Coordinator._supervise_leases(c, store)  # type: ignore[arg-type]
    assert killed == [] and c.let_expire == set()


def test_a_worker_stopped_while_it_waits_for_a_connection_slot_says_no_refusal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Ctrl+C while a worker waited for a PostgreSQL connection slot printed the refusal
    # ("[Worker-N] ... no connection slot left: close other clients ...") beside the stop.
    import asyncio

    from gapfill.engine import run as run_module
    from gapfill.engine.run import EnrichJob
    from gapfill.engine.worker import WorkerSettings
    from gapfill.errors import StoreNoSlot, StoreRefused

    def no_slot(*args: object, **kwargs: object) -> Store:
        raise StoreNoSlot("PostgreSQL at h:5432 has no connection slot left", "close other clients")

    monkeypatch.setattr(run_module, "open_store", no_slot)
    said: list[object] = []
    job = EnrichJob("postgresql://u@h/db", (), ((1, A),), 1, worker=WorkerSettings(no_slot_wait_s=60.0))
    polls = iter([False, True])
    stopped = type("Lifeline", (), {"poll": lambda self: next(polls)})()
    assert asyncio.run(run_module._open_for_worker(0, job, said.append, stopped)) is None  # type: ignore[arg-type]
    assert len(said) == 1  # the wait, said once; no refusal
    gone = type("Lifeline", (), {"poll": lambda self: False})()
    job = EnrichJob("postgresql://u@h/db", (), ((1, A),), 1, worker=WorkerSettings(no_slot_wait_s=0.0))
    with pytest.raises(StoreRefused, match="no connection slot left"):  # without a stop: refused
        asyncio.run(run_module._open_for_worker(0, job, said.append, gone))  # type: ignore[arg-type]
