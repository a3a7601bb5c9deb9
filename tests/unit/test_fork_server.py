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
        workers_server.stop(unused=True)
    assert server._forkserver_pid is None  # type: ignore[attr-defined]
    with pytest.raises(ChildProcessError):  # already reaped: nothing outlives the run
        os.waitpid(pid, os.WNOHANG)
