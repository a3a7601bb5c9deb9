"""``pid_alive`` decides which local lease owners and running runs are dead."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from gapfill.store.liveness import pid_alive


def _state(pid: int) -> bytes:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        return fh.read().rsplit(b")", 1)[1].split()[0]


@pytest.mark.timeout(30)
def test_a_zombie_is_not_alive() -> None:
    # A process killed outright whose parent has not reaped it yet still has a pid: its
    # leases must be given back and its run marked interrupted all the same.
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 20
        while _state(child.pid) != b"Z":  # exited, not reaped (no wait() yet)
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.02)
        assert pid_alive(child.pid) is False
    finally:
        child.wait()
    assert pid_alive(child.pid) is False  # reaped: no such process
    assert pid_alive(os.getpid()) is True
