"""The progress lines printed where output is not a terminal (``LineRenderer``, and
``discover``'s printer)."""

from __future__ import annotations

import io

import pytest

from gapfill.cli_discover import _Printer
from gapfill.cli_progress import LineRenderer
from gapfill.discover.run import DiscoverProgress
from gapfill.engine.events import Progress


def progress(done: int, total: int) -> Progress:
    return Progress(done, total, 1, done * 10, 0, 1.0, 10.0, None)


@pytest.mark.timeout(10)
def test_progress_is_shown_every_period_and_the_finished_plan_once() -> None:
    out = io.StringIO()
    render = LineRenderer(out, progress_every_s=3600)
    for done in (0, 1, 2, 3, 4, 4, 4):  # a coordinator reports each second, also while workers exit
        render(progress(done, 4))
    lines = out.getvalue().splitlines()
    # The first report (no line said yet), then nothing until the period passes, except the
    # line for the whole plan, which is said once however often it is reported.
    assert lines == [
        "Progress: 0/4 batches (0.0%), 1 active workers, 10 tx/s, ETA ?",
        "Progress: 4/4 batches (100.0%), 1 active workers, 10 tx/s, ETA ?",
    ], lines


@pytest.mark.timeout(10)
def test_a_plan_that_grows_is_reported_again() -> None:
    # Another coordinator joins more batches to the plan: 4/4 is then not the end.
    out = io.StringIO()
    render = LineRenderer(out, progress_every_s=0)
    for done, total in ((4, 4), (4, 4), (4, 6), (6, 6)):
        render(progress(done, total))
    assert [ln.split(",")[0] for ln in out.getvalue().splitlines()] == [
        "Progress: 4/4 batches (100.0%)", "Progress: 4/6 batches (66.7%)", "Progress: 6/6 batches (100.0%)",
    ]


@pytest.mark.timeout(10)
@pytest.mark.parametrize("rescan", [False, True])
def test_ctrl_c_during_a_rescan_says_a_rerun_starts_over(rescan: bool) -> None:
    # A rescan ignores coverage: "continue where it stopped" was not what running it again does.
    printer = _Printer(rescan)
    printer(DiscoverProgress("chunk", 1, "0x" + "ab" * 20, ("blocks",), 0, 49, 50, 100, 2, 1))
    assert printer.kept() == ("50 blocks scanned and the 1 new ref found in them are committed; run the "
                              "same command again to " + ("rescan from the start" if rescan
                                                          else "continue where it stopped"))  # fmt: skip


@pytest.mark.timeout(10)
def test_discover_says_its_last_progress_line_once(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The last chunk's line is said (a second after the one before), then "done" reports the same.
    monkeypatch.setattr("gapfill.cli_discover.PROGRESS_EVERY_S", 0.0)
    printer = _Printer()
    c = "0x" + "ab" * 20
    printer(DiscoverProgress("start", 1, c, ("blocks",), 0, 49, 0, 50, 0, 0))
    printer(DiscoverProgress("chunk", 1, c, ("blocks",), 0, 49, 50, 50, 2, 1))
    printer(DiscoverProgress("done", 1, c, ("blocks",), 0, 49, 50, 50, 2, 1))
    assert capsys.readouterr().err.splitlines() == [
        f"discover {c}: scanning blocks 0-49 with blocks: 50 blocks to do",
        f"discover {c}: 50/50 blocks (100%), 2 refs found, 1 new",
    ]
