"""The host-shared token bucket (gapfill.rpc.budget)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gapfill.rpc.budget import SharedBudget, budget_path

URL = "https://rpc.example/v2/abcdefghijklmnopqrstuvwxyz"


def test_file_name_hides_the_url(tmp_path: Path) -> None:
    path = budget_path(URL, str(tmp_path))
    assert "abcdefghijklmnop" not in path
    assert path.startswith(str(tmp_path))


def test_burst_is_at_most_one_second(tmp_path: Path) -> None:
    budget = SharedBudget(URL, 100, budget_dir=str(tmp_path), burst_s=5.0)
    try:
        assert budget.capacity == 100
        assert budget.reserve(100) == 0.0
        wait = budget.reserve(50)
        assert wait == pytest.approx(0.5, abs=0.05)
    finally:
        budget.close()


def test_reservations_queue_in_order(tmp_path: Path) -> None:
    budget = SharedBudget(URL, 10, budget_dir=str(tmp_path), burst_s=1.0)
    try:
        waits = [budget.reserve(5) for _ in range(4)]
        assert waits == pytest.approx([0.0, 0.0, 0.5, 1.0], abs=0.05)
        budget.refund(5)
        assert budget.reserve(5) == pytest.approx(1.0, abs=0.05)
    finally:
        budget.close()


def test_aimd_factor_and_pause_are_shared(tmp_path: Path) -> None:
    one = SharedBudget(URL, 100, budget_dir=str(tmp_path))
    two = SharedBudget(URL, 100, budget_dir=str(tmp_path))
    try:
        assert one.on_rate_limited(2.0) == 0.5
        assert one.on_rate_limited(None) == 0.5  # one cut per second
        assert two.factor() == 0.5
        assert two.paused_for() == pytest.approx(2.0, abs=0.1)
        assert two.reserve(1) >= 1.8
        for _ in range(30):
            two.on_success()
        assert one.factor() == 1.0
    finally:
        one.close()
        two.close()


_WORKER = textwrap.dedent(
    """
    import sys, time
    from gapfill.rpc.budget import SharedBudget
    url, rps, budget_dir, start, end = sys.argv[1], float(sys.argv[2]), sys.argv[3], \\
        float(sys.argv[4]), float(sys.argv[5])
    budget = SharedBudget(url, rps, budget_dir=budget_dir, burst_s=1.0)
    while time.monotonic() < start:
        time.sleep(0.005)
    sent = []
    while True:
        wait = budget.reserve(5)
        at = time.monotonic() + wait
        if at >= end:
            break
        time.sleep(wait)
        sent.append(at)
    print(" ".join(f"{t:.6f}" for t in sent))
    """
)


@pytest.mark.timeout(30)
def test_processes_share_one_budget(tmp_path: Path) -> None:
    """Four processes drawing 5 calls at a time never exceed rps together."""
    rps, processes, seconds = 100.0, 4, 2.0
    start = time.monotonic() + 1.5  # let every interpreter start first
    end = start + seconds
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, URL, str(rps), str(tmp_path), str(start), str(end)],
            stdout=subprocess.PIPE, text=True, env=env,
        )
        for _ in range(processes)
    ]
    stamps: list[float] = []
    per_process: list[int] = []
    for child in children:
        out, _ = child.communicate(timeout=25)
        assert child.returncode == 0
        mine = [float(x) for x in out.split()]
        per_process.append(len(mine))
        stamps.extend(mine)
    stamps.sort()
    calls = 5 * len(stamps)
    # One second of burst plus the refill over the window, and nearly all of it used.
    ceiling = rps * 1.0 + rps * seconds
    assert calls <= ceiling + 5
    assert calls >= 0.9 * ceiling
    assert all(n > 0 for n in per_process), per_process
    # Any one-second window after the burst holds at most rps (+ one draw of slack).
    for i, t in enumerate(stamps):
        window = [s for s in stamps[i:] if s < t + 1.0]
        if t > start + 1.0:
            assert 5 * len(window) <= rps + 5


def test_the_default_budget_folder_is_the_users_own(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # One /tmp/gapfill-budgets for every user of the host: the first made it mode 755 and
    # the others could not create their buckets in it.
    from gapfill.rpc.budget import BUDGET_DIR_ENV, default_budget_dir

    monkeypatch.delenv(BUDGET_DIR_ENV, raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert default_budget_dir().endswith(f"gapfill-budgets-{os.getuid()}")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_budget_dir() == str(tmp_path / "gapfill-budgets")
    monkeypatch.setenv(BUDGET_DIR_ENV, str(tmp_path / "mine"))
    assert default_budget_dir() == str(tmp_path / "mine")  # one user's processes share it as told


def test_a_budget_folder_it_cannot_use_is_one_sentence_at_once(tmp_path: Path) -> None:
    # It was an OSError at the first call of a run: "internal error (ExceptionGroup ...)".
    from gapfill.errors import ConfigError

    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match="set GAPFILL_BUDGET_DIR to a folder this user can write to"):
        SharedBudget(URL, 10, budget_dir=str(tmp_path / "a-file" / "budgets"))
