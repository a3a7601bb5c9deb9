"""The workers' fork server: started early, deaf to Ctrl+C, never left behind."""

from __future__ import annotations

import os
import signal
from multiprocessing import forkserver

import pytest

from gapfill.engine import forkserver as workers_server


def _ignored_signals(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        line = next(ln for ln in f if ln.startswith("SigIgn:"))
    return int(line.split()[1], 16)


@pytest.mark.timeout(30)
def test_the_fork_server_ignores_ctrl_c_from_its_start_and_an_unused_one_is_reaped() -> None:
    # The server protects itself from SIGINT only after importing its preload (~0.3 s):
    # it must start with SIGINT ignored, or a Ctrl+C during planning kills it mid-import.
    before = signal.getsignal(signal.SIGINT)
    workers_server.start("sqlite:///unused.db")
    server = forkserver._forkserver
    pid = server._forkserver_pid  # type: ignore[attr-defined]
    try:
        assert isinstance(pid, int)
        assert signal.getsignal(signal.SIGINT) is before  # the coordinator's handler is back
        assert _ignored_signals(pid) & (1 << (signal.SIGINT - 1)), "the server would die on Ctrl+C"
    finally:
        workers_server.stop()
    assert server._forkserver_pid is None  # type: ignore[attr-defined]
    with pytest.raises(ChildProcessError):  # already reaped: nothing outlives the run
        os.waitpid(pid, os.WNOHANG)


def test_the_fork_server_preloads_the_store_backend_and_the_cas_only_when_needed() -> None:
    assert workers_server.preload("sqlite:///x.db") == ["gapfill.engine.preload", "gapfill.store.sqlite"]
    assert workers_server.preload("SQLite:///x.db")[1] == "gapfill.store.sqlite"
    assert workers_server.preload("postgresql://u@h/db", tls=True) == [
        "gapfill.engine.preload", "gapfill.store.postgres", "gapfill.rpc.trusted"]  # fmt: skip


def test_what_the_fork_server_preloads_runs_no_command_and_loads_the_cas() -> None:
    # Its workers inherit what it loaded: keccak's backend (without the `file` command
    # pycryptodome runs on its own) and, for an endpoint that may use TLS, the CA
    # certificates, which each worker loaded again otherwise (~85 ms each).
    import subprocess
    import sys

    code = (
        "import sys\n"
        "seen = []\n"
        "sys.addaudithook(lambda event, args: seen.append(args) if event == 'subprocess.Popen' else None)\n"
        "import gapfill.engine.preload, gapfill.store.sqlite, gapfill.rpc.trusted\n"
        "import aiohttp.connector as c\n"
        "print(seen, c._SSL_CONTEXT_VERIFIED.cert_store_stats()['x509_ca'] > 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["[]", "True"], out.stdout + out.stderr


@pytest.mark.timeout(30)
def test_ready_returns_once_the_server_has_imported_its_preload() -> None:
    # The start-up sample measures the node only once the server's import (~0.3 s of CPU)
    # is over (its last module says so; the order is checked end to end in
    # test_cli_examples.py), and asks once.
    import asyncio

    workers_server.start("sqlite:///unused.db")
    try:
        assert asyncio.run(workers_server.ready(20.0)) is True
        assert asyncio.run(workers_server.ready(0.0)) is True  # said once: no second wait
    finally:
        workers_server.stop()
    assert workers_server.READY_ENV not in os.environ


@pytest.mark.timeout(30)
def test_a_used_fork_server_is_killed_at_the_end(monkeypatch: pytest.MonkeyPatch) -> None:
    # Asked to stop (its alive pipe closed), a server that had forked workers finalised an
    # interpreter with the engine imported: every concurrent run's end waited 0.07-0.14 s
    # for it. Once its workers are gone it holds nothing to write: it is killed.
    import multiprocessing

    workers_server.start("sqlite:///unused.db")
    server = forkserver._forkserver
    pid = server._forkserver_pid  # type: ignore[attr-defined]
    sent: list[tuple[int, int]] = []
    real_kill = os.kill

    def kill(p: int, sig: int) -> None:
        sent.append((p, sig))
        real_kill(p, sig)

    try:
        worker = multiprocessing.get_context("forkserver").Process(target=os.getpid)
        worker.start()
        worker.join(20)
        assert worker.exitcode == 0
        monkeypatch.setattr(os, "kill", kill)
    finally:
        workers_server.stop()
    assert sent == [(pid, signal.SIGKILL)]
    assert server._forkserver_pid is None  # type: ignore[attr-defined]
    with pytest.raises(ChildProcessError):  # reaped: nothing outlives the run
        os.waitpid(pid, os.WNOHANG)
