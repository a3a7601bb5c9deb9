"""The progress lines printed where output is not a terminal (``LineRenderer``, and
``discover``'s printer)."""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path
from typing import Any

import pytest

from gapfill.cli_discover import _Printer
from gapfill.cli_progress import LineRenderer, LiveRenderer, summary_lines
from gapfill.discover.run import DiscoverProgress
from gapfill.engine.events import (
    LEASE_GONE,
    BatchAbandoned,
    BatchAssigned,
    BatchDone,
    BatchesEmptied,
    Progress,
    RunStarted,
    RunSummary,
)
from gapfill.wording import counted


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
def test_a_batch_not_given_back_is_not_said_given_back() -> None:
    # QA: a give-back that failed (the database gone) or found its lease ended was said as
    # "given back", and its lease then expired, or was someone else's already.
    out = io.StringIO()
    render = LineRenderer(out)
    render(BatchAbandoned(0, 4, "worker stopped", 2, 2, rest=500, not_given=LEASE_GONE, lease_timeout_s=300))
    render(BatchAbandoned(1, 5, "worker stopped", 1, 1, rest=500, not_given="the server is gone",
                          lease_timeout_s=300))  # fmt: skip
    assert out.getvalue().splitlines() == [
        "[Worker-1] Batch 4 attempt 2 (worker stopped): its lease had ended already, nothing of it "
        "written; it was taken back for another attempt",
        "[Worker-2] Batch 5 attempt 1 (worker stopped) could not be given back (the server is gone): "
        "nothing of it written; its lease expires 300 s after it was last renewed (--lease-timeout), "
        "and the batch is taken back then",
    ]


@pytest.mark.timeout(10)
def test_a_plan_that_grows_is_reported_again() -> None:
    # Another coordinator joins more batches to the plan: 4/4 is then not the end.
    out = io.StringIO()
    render = LineRenderer(out, progress_every_s=0)
    for done, total in ((4, 4), (4, 4), (4, 6), (6, 6)):
        render(progress(done, total))
    assert [ln.split(",")[0] for ln in out.getvalue().splitlines()] == [
        "Progress: 4/4 batches (100.0%)",
        "Progress: 4/6 batches (66.7%)",
        "Progress: 6/6 batches (100.0%)",
    ]


@pytest.mark.timeout(10)
@pytest.mark.parametrize("rescan", [False, True])
def test_ctrl_c_during_a_rescan_says_a_rerun_starts_over(rescan: bool) -> None:
    # A rescan ignores coverage: "continue where it stopped" was not what running it again does.
    printer = _Printer(rescan)
    printer(DiscoverProgress("chunk", 1, "0x" + "ab" * 20, ("blocks",), 0, 49, 50, 100, 2, 1,
                             (("blocks", ((0, 49),)),)))  # fmt: skip
    assert printer.kept() == (f"50 blocks (0-49) of {'0x' + 'ab' * 20} were {'re' if rescan else ''}scanned "
                              "and kept, with the 1 new ref found in them: run the same command again "
                              "to " + ("rescan from the start" if rescan
                                       else "continue where it stopped"))  # fmt: skip


C = "0x" + "ab" * 20


def printed(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, method: str,
            *events: tuple[str, int | None, int | None, int, int, int, int]) -> list[str]:  # fmt: skip
    """The progress lines a printer says for ``events`` (event, from, to, done, total, found,
    new) of one contract and method, every one due (no second between them needed)."""
    monkeypatch.setattr("gapfill.cli_discover.PROGRESS_EVERY_S", 0.0)
    printer = _Printer()
    for event in events:
        printer(DiscoverProgress(event[0], 1, C, (method,), *event[1:]))
    return capsys.readouterr().err.splitlines()


@pytest.mark.timeout(10)
def test_discover_says_its_last_progress_line_once(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The last chunk's line is said (a second after the one before), then "done" reports the same.
    said = printed(capsys, monkeypatch, "blocks", ("start", 0, 49, 0, 50, 0, 0),
                   ("chunk", 0, 49, 50, 50, 2, 1), ("done", 0, 49, 50, 50, 2, 1))
    assert said == [
        f"discover {C}: scanning blocks 0-49 with blocks: 50 blocks to do",
        f"discover {C}: 50/50 blocks (100%), 2 refs found, 1 new",
    ]


@pytest.mark.timeout(10)
def test_discover_progress_separates_thousands_as_its_summary_does(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Said "1,442 refs found, 1442 new" and "1400/2000 blocks" beside the summary's "1,442 new refs".
    said = printed(capsys, monkeypatch, "blocks", ("start", 0, 1999, 0, 2000, 0, 0),
                   ("chunk", 0, 1399, 1400, 2000, 1442, 1442))
    assert said == [
        f"discover {C}: scanning blocks 0-1999 with blocks: 2,000 blocks to do",
        f"discover {C}: 1,400/2,000 blocks (70%), 1,442 refs found, 1,442 new",
    ]


@pytest.mark.timeout(10)
def test_discover_with_nothing_to_do_says_it_once(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A rerun over scanned blocks said "0 blocks to do", then "0/0 blocks (100%), 0 refs found, 0 new".
    said = printed(capsys, monkeypatch, "trace", ("start", 0, 49, 0, 0, 0, 0), ("done", 0, 49, 0, 0, 0, 0),
                   ("start", None, None, 0, 0, 0, 0), ("done", None, None, 0, 0, 0, 0))
    assert said == [
        f"discover {C}: scanning blocks 0-49 with trace: 0 blocks to do",
        f"discover {C}: nothing to scan",
    ]


@pytest.mark.timeout(10)
def test_ctrl_c_names_the_blocks_each_contract_kept() -> None:
    # It said "1,000 block scans done and the 3 new refs found in them are committed": counts,
    # summed over contracts and methods, but not which blocks of which contract were kept.
    printer = _Printer()
    other = "0x" + "cd" * 20
    printer(DiscoverProgress("start", 1, other, ("blocks",), 0, 99, 0, 100, 0, 0))
    printer(DiscoverProgress("done", 1, other, ("blocks",), 0, 99, 100, 100, 2, 2,
                             (("blocks", ((0, 99),)),)))  # fmt: skip
    both = ("logs", "blocks")
    printer(DiscoverProgress("start", 1, C, both, 0, 999, 0, 2000, 0, 0))
    printer(DiscoverProgress("chunk", 1, C, both, 0, 49, 100, 2000, 1, 1,
                             (("logs", ((0, 49), (100, 149))), ("blocks", ((0, 49),)))))  # fmt: skip
    assert printer.kept() == (
        f"100 blocks (0-99) of {other} were scanned and kept, with the 2 new refs found in them; "
        f"100 blocks (0-49, 100-149) with logs and 50 blocks (0-49) with blocks of {C} were scanned and "
        "kept, with the 1 new ref found in them: run the same command again to continue where it stopped"
    )
    assert _Printer().kept() == "nothing was written; run the same command again"


@pytest.mark.timeout(10)
def test_an_error_mid_scan_names_the_blocks_each_method_kept() -> None:
    # The error ended the sentence at what failed: nothing said the chunks done were kept.
    methods = ("logs", "blocks")
    printer = _Printer()
    assert printer.kept_at_failure() is None  # no scan under way: the error alone
    printer(DiscoverProgress("start", 1, C, methods, 0, 999, 0, 2000, 0, 0))
    assert printer.kept_at_failure() == (f"no chunk of {C} was finished, so nothing was kept: run the "
                                         "same command again")  # fmt: skip
    both = ((0, 49), (100, 149))
    printer(DiscoverProgress("chunk", 1, C, methods, 100, 149, 200, 2000, 3, 2,
                             (("logs", both), ("blocks", both))))  # fmt: skip
    assert printer.kept_at_failure() == (
        f"100 blocks (0-49, 100-149) of {C} were scanned and kept, with the 2 new refs found in them: "
        "run the same command again to continue where it stopped")  # fmt: skip
    printer(DiscoverProgress("chunk", 1, C, methods, 5000, 5000, 201, 2000, 3, 0,
                             (("logs", ((0, 49), (100, 149), (5000, 5000))), ("blocks", both))))  # fmt: skip
    assert printer.kept_at_failure() == (
        f"101 blocks (0-49, 100-149, 5000) with logs and 100 blocks (0-49, 100-149) with blocks of {C} "
        "were scanned and kept (no new ref in them): run the same command again to continue where it "
        "stopped")  # fmt: skip
    printer(DiscoverProgress("done", 1, C, methods, 0, 999, 201, 2000, 3, 0))
    assert printer.kept_at_failure() is None  # this contract is done: the next one has not started


@pytest.mark.timeout(10)
def test_an_error_a_rerun_cannot_pass_says_what_to_fix_before_it() -> None:
    # A refused explorer key ended "...: run the same command again", which cannot pass.
    printer = _Printer()
    printer(DiscoverProgress("start", 1, C, ("explorer",), 0, 999, 0, 1000, 0, 0))
    fix = "check --explorer-key"
    assert printer.kept_at_failure(fix) == (f"no chunk of {C} was finished, so nothing was kept: check "
                                            "--explorer-key, then run the same command again")  # fmt: skip
    scanned = (("explorer", ((0, 49),)),)
    printer(DiscoverProgress("chunk", 1, C, ("explorer",), 0, 49, 50, 1000, 1, 1, scanned))
    assert printer.kept_at_failure(fix) == (
        f"50 blocks (0-49) of {C} were scanned and kept, with the 1 new ref found in them: check "
        "--explorer-key, then run the same command again to continue where it stopped")  # fmt: skip


@pytest.mark.timeout(10)
def test_an_error_mid_rescan_says_a_rerun_starts_over() -> None:
    printer = _Printer(rescan=True)
    printer(DiscoverProgress("start", 1, C, ("blocks",), 7, 7, 0, 1, 0, 0))
    printer(DiscoverProgress("chunk", 1, C, ("blocks",), 7, 7, 1, 1, 1, 1, (("blocks", ((7, 7),)),)))
    assert printer.kept_at_failure() == (f"1 block (7) of {C} was rescanned and kept, with the 1 new ref "
                                         "found in them: run the same command again to rescan from the "
                                         "start")  # fmt: skip


def summary(processed: int, failed: int, permanent: int, calls: int) -> RunSummary:
    return RunSummary(7, "batch", 1, processed, failed, permanent, 2.0, processed / 2.0, calls,
                      calls / processed if processed else 0.0, "done")  # fmt: skip


def bench_parse_summary(monkeypatch: pytest.MonkeyPatch) -> Any:
    """bench/suite.py's reader of the summary (the benchmarks' record of every run)."""
    path = Path(__file__).parents[2] / "bench" / "suite.py"
    spec = importlib.util.spec_from_file_location("bench_suite", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look themselves up
    spec.loader.exec_module(module)
    return module.parse_summary


@pytest.mark.timeout(30)
def test_the_summary_says_this_runs_failures_apart_from_the_permanent_ones_on_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 3 failed in this run; the database holds 8,006 permanent failures of the run's contracts,
    # most recorded by earlier runs. "failed: 3 (8,006 permanent; ...)" read as 8,006 of the 3.
    lines = summary_lines(summary(1_000, 3, 8_006, 2_003))
    assert lines[1:4] == [
        "  processed: 1,000 transactions",
        "  failed:    3 this run",
        "  permanent: 8,006 failures on record for the run's contracts, whichever run recorded them "
        "(see `gapfill failures`)",
    ], lines
    # None on record: no such line, and the run's own failures point at `gapfill failures`.
    lines = summary_lines(summary(1_000, 3, 0, 2_003))
    assert "  failed:    3 this run (see `gapfill failures`)" in lines, lines
    assert not any("permanent" in ln for ln in lines), lines
    assert "  failed:    0 this run" in summary_lines(summary(1_000, 0, 0, 2_003))
    # The benchmarks still read this run's numbers from it.
    parsed = bench_parse_summary(monkeypatch)("\n".join(summary_lines(summary(1_000, 3, 8_006, 2_003))))
    said = (parsed["processed"], parsed["failed"], parsed["calls"], parsed["calls_per_tx"])
    assert said == (1_000, 3, 2_003, 2.0), parsed


@pytest.mark.timeout(10)
def test_a_run_that_stored_nothing_says_no_calls_per_transaction() -> None:
    # Every ref failed (not found, beyond the head): 48 calls for no transaction stored,
    # which read "48 RPC calls, 0.00 per transaction".
    lines = summary_lines(summary(0, 5, 5, 48))
    assert "  calls:     48 RPC calls" in lines, lines
    assert "  calls:     1,003 RPC calls, 2.01 per transaction" in summary_lines(summary(499, 0, 0, 1_003))


@pytest.mark.timeout(10)
def test_a_count_of_one_is_said_in_the_singular() -> None:
    lines = summary_lines(summary(1, 0, 1, 1))
    assert "  processed: 1 transaction" in lines, lines
    assert "  permanent: 1 failure on record for the run's contracts, whichever run recorded them " \
           "(see `gapfill failures`)" in lines, lines  # fmt: skip
    assert "  calls:     1 RPC call, 1.00 per transaction" in lines, lines
    out = io.StringIO()
    render = LineRenderer(out)
    render(RunStarted(7, "batch", 1, 2, 1, 1, 0))
    render(BatchAssigned(0, 5, (10, 0, 0), (10, 0, 0), 1, 1, 1))
    render(RunStarted(8, "worker", 2, 2, 3, 0, 1))  # `gapfill worker` joins; it never plans
    assert out.getvalue().splitlines() == [
        "Run #7: mode batch, 1 worker(s) on 2 CPU cores; 1 open batch, 1 ref newly planned",
        "[Worker-1] Assigned batch 5: blocks 10-10, 1 ref",
        "Run #8: mode worker, 2 worker(s) on 2 CPU cores; 3 open batches, joined 1 open plan(s)",
    ]
    assert (counted(0, "batch", "batches"), counted(2_000, "RPC call")) == ("0 batches", "2,000 RPC calls")


def live_view_text(live: LiveRenderer) -> str:
    from rich.console import Console

    console = Console(width=200, record=True, file=io.StringIO())
    console.print(live._render())
    return console.export_text()


@pytest.mark.timeout(10)
def test_the_live_view_header_words_the_plan_as_the_line_renderer_does() -> None:
    # RunStarted.refs counts the refs newly planned only: on a resume, and in `gapfill
    # worker`, the header said "0 refs" of a run with batches open.
    for started, said in [
        (RunStarted(9, "batch", 1, 2, 4, 0, 1),
         "4 open batches, 0 refs newly planned, joined 1 open plan(s)"),
        (RunStarted(8, "worker", 2, 2, 3, 0, 1), "3 open batches, joined 1 open plan(s)"),
    ]:
        live = LiveRenderer()
        live(started)
        header = live_view_text(live).splitlines()[0]
        out = io.StringIO()
        LineRenderer(out=out)(started)
        assert header.endswith(f" · {said}") and out.getvalue().rstrip().endswith(f"; {said}"), header
        assert "0 refs\n" not in live_view_text(live)


@pytest.mark.timeout(10)
def test_progress_of_a_batch_in_flight_says_what_it_fetched() -> None:
    # QA: a run of one batch said "0/1 batches (0.0%), 1 active workers, 0 tx/s, ETA ?" (and
    # the live view "0 tx") until its end, with nothing to show it was fetching: the rate and
    # the done count move as batches are stored. What is fetched and not stored yet is said
    # after the seed's words, which log parsers read as they were.
    out = io.StringIO()
    render = LineRenderer(out, progress_every_s=0)
    render(Progress(0, 1, 1, 0, 0, 3.0, 0.0, None, fetched=312))
    render(Progress(1, 1, 1, 480, 0, 6.0, 80.0, 0.0))
    assert out.getvalue().splitlines() == [
        "Progress: 0/1 batches (0.0%), 1 active workers, 0 tx/s, ETA ?; 312 transactions fetched, "
        "not stored yet",
        "Progress: 1/1 batches (100.0%), 1 active workers, 80 tx/s, ETA 0.0s",
    ]
    live = LiveRenderer()
    live(RunStarted(7, "batch", 1, 2, 1, 480, 0))
    live(Progress(0, 1, 1, 0, 0, 3.0, 0.0, None, fetched=1_312))
    assert "0/1 batches · ETA ? · 0 tx/s · 0 tx (+1,312 fetched, not stored yet) · failed 0" in (
        live_view_text(live)), live_view_text(live)  # fmt: skip


@pytest.mark.timeout(10)
def test_the_live_view_counts_batches_closed_without_a_commit_as_they_come() -> None:
    # One worker (batch mode): its events move the bar between the once-a-second Progress
    # events. A lease that found 2 batches' ranges already stored closes them, and a batch
    # given back with all it had left stored is done: both used to wait for the next Progress.
    live = LiveRenderer()
    live(RunStarted(7, "batch", 1, 2, 5, 2_000, 0))
    live(BatchDone(0, 1, 400, 0, 0.5, True, 400))
    assert live.progress is not None and live.progress.done_batches == 1
    live(BatchesEmptied(0, 2))
    assert live.progress.done_batches == 3
    live(BatchAbandoned(0, 4, "worker stopped", 1, 1, kept=380, kept_failed=20, kept_new=370, closed=True))
    assert (live.progress.done_batches, live.progress.processed, live.progress.failed) == (4, 770, 20)
    # Given back with some of it stored: not done, what it stored counted.
    live(BatchAbandoned(0, 5, "HTTP 503", 1, 1, kept=100, rest=300, kept_new=100))
    assert (live.progress.done_batches, live.progress.processed) == (4, 870)
    assert "4/5 batches" in live_view_text(live)


@pytest.mark.timeout(10)
def test_discover_says_one_ref_found_in_the_singular(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gapfill.cli_discover.PROGRESS_EVERY_S", 0.0)
    c = "0x" + "ab" * 20
    _Printer()(DiscoverProgress("chunk", 1, c, ("blocks",), 0, 49, 50, 50, 1, 1))
    assert capsys.readouterr().err == f"discover {c}: 50/50 blocks (100%), 1 ref found, 1 new\n"


@pytest.mark.timeout(10)
def test_a_coordinators_done_count_takes_emptied_and_closed_batches_as_they_come() -> None:
    # With several workers the renderers show the coordinator's Progress; `gapfill worker`'s
    # counts the batches its workers' events say are done: committed, closed at lease time
    # or closed as given back (not one given back for a retry). The line renderer has no
    # count of its own: it prints that Progress.
    from gapfill.engine.run import Coordinator, EnrichJob

    seen: list[Any] = []
    job = EnrichJob("sqlite:///unused.db", (), ((1, "0x" + "ab" * 20),), 1, workers=2, plan_new=False)
    coordinator = Coordinator(job, seen.append)
    try:
        coordinator._take(BatchDone(0, 1, 10, 0, 0.5, True, 10))
        coordinator._take(BatchesEmptied(1, 2))
        closed = BatchAbandoned(0, 4, "worker stopped", 1, 1, kept=5, kept_failed=5, kept_new=5, closed=True)
        coordinator._take(closed)
        coordinator._take(BatchAbandoned(1, 5, "HTTP 503", 1, 1, kept=3, rest=7, kept_new=3))
    finally:
        coordinator.lifeline.close()
        coordinator._lifeline_w.close()
    assert coordinator.done_batches == 4 and coordinator.totals()[:2] == (18, 5)
    assert len(seen) == 4  # every event passed on to the renderer


@pytest.mark.timeout(10)
def test_a_run_of_one_open_batch_says_batch() -> None:
    from gapfill.engine.events import RunStarted

    out = io.StringIO()
    LineRenderer(out)(RunStarted(3, "batch", 1, 2, 1, 3, 0))
    assert "; 1 open batch, 3 refs newly planned" in out.getvalue(), out.getvalue()


@pytest.mark.timeout(10)
def test_a_workers_refusal_is_the_runs_error_or_said_when_the_run_stops_anyway() -> None:
    # A worker that stops on a database refusal sends it for the coordinator's error (said
    # once, not as each worker's notice too); after a Ctrl+C the run ends interrupted, so
    # the refusals are said as the workers' notices, as they were before they ended the run:
    # the one that comes then, and the one kept before the stop.
    from gapfill.engine.events import WorkerRefused
    from gapfill.engine.run import Coordinator, EnrichJob
    from gapfill.errors import StoreRefused

    seen: list[Any] = []
    job = EnrichJob("sqlite:///unused.db", (), ((1, "0x" + "ab" * 20),), 1, workers=2)
    coordinator = Coordinator(job, seen.append)
    try:
        coordinator._take(WorkerRefused(0, 'database "x" takes no writes', "point --db at the primary"))
        assert seen == [] and isinstance(coordinator.refused[0], StoreRefused)
        assert str(coordinator.refused[0]) == 'database "x" takes no writes: point --db at the primary'
        coordinator.stopping_at = 1.0
        coordinator._take(WorkerRefused(1, 'database "x" takes no writes', "point --db at the primary"))
    finally:
        coordinator.lifeline.close()
        coordinator._lifeline_w.close()
    assert [e.text for e in seen] == ['[Worker-1] database "x" takes no writes: point --db at the primary',
                                      '[Worker-2] database "x" takes no writes: point --db at the primary']
    assert all(e.quiet_too for e in seen)  # what to fix before the rerun: said under -q too


@pytest.mark.timeout(10)
def test_a_workers_refusal_kept_for_the_runs_error_is_said_once_when_a_stop_comes_first() -> None:
    # The refusal came while the run went on, and was kept for the run's error, said when the
    # loop sees that worker exit; a Ctrl+C came first, and the loop skips the exit codes of a
    # run that stops (it ends interrupted): the refusal was never said.
    import signal

    from gapfill.engine.events import WorkerRefused
    from gapfill.engine.run import Coordinator, EnrichJob

    seen: list[Any] = []
    job = EnrichJob("sqlite:///unused.db", (), ((1, "0x" + "ab" * 20),), 1, workers=2)
    coordinator = Coordinator(job, seen.append)
    coordinator.planned = coordinator.spawning = True  # its workers were being started
    try:
        coordinator._take(WorkerRefused(0, 'database "x" takes no writes', "point --db at the primary"))
        coordinator._say_unsaid()  # a turn of the supervision loop
        assert seen == []
        coordinator._on_signal(signal.SIGINT, None)
        for _ in range(2):  # the loop's next turns, and the run's end
            coordinator._say_unsaid()
    finally:
        coordinator.lifeline.close()
        coordinator._lifeline_w.close()
    assert [e.text for e in seen] == [
        f"stopping: no new batches; workers have {job.grace_period_s:g}s to finish (Ctrl+C again to stop "
        "at once)",
        '[Worker-1] database "x" takes no writes: point --db at the primary',
    ]
    assert seen[-1].quiet_too


@pytest.mark.timeout(10)
def test_a_workers_lost_node_is_said_when_the_run_stops_anyway() -> None:
    # A worker that loses the node (no reply for the outage window, every endpoint refusing
    # the key) sends why for the run's error, raised when the loop sees it exit with
    # EXIT_LOST_NODE; a run that stops skips its workers' exit codes (it ends interrupted), so
    # one lost during the stop (a Ctrl+C at a hung node, say), or kept before the stop came,
    # was never said, as refusals were not: the rerun met the dead node unwarned.
    import signal

    from gapfill.engine.events import WorkerLostNode
    from gapfill.engine.run import Coordinator, EnrichJob

    lost = "no RPC node has replied for 60 s (last: no reply): check the node, then rerun to continue"
    seen: list[Any] = []
    job = EnrichJob("sqlite:///unused.db", (), ((1, "0x" + "ab" * 20),), 1, workers=3)
    coordinator = Coordinator(job, seen.append)
    coordinator.planned = coordinator.spawning = True  # its workers were being started
    try:
        coordinator._take(WorkerLostNode(0, lost))  # kept for the run's error
        coordinator._take(WorkerLostNode(2, "its start-up check failed", at_start=True))  # a restart's
        coordinator._say_unsaid()
        assert seen == []
        coordinator._on_signal(signal.SIGINT, None)
        coordinator._say_unsaid()
        coordinator._take(WorkerLostNode(1, lost))  # during the stop
        coordinator._say_unsaid()  # the run's end
    finally:
        coordinator.lifeline.close()
        coordinator._lifeline_w.close()
    assert [e.text for e in seen[1:]] == [f"[Worker-1] {lost}", f"[Worker-2] {lost}"], seen
    assert all(e.quiet_too for e in seen[1:])


@pytest.mark.timeout(10)
def test_a_notice_every_worker_says_once_is_said_once_per_run() -> None:
    # Each worker process sets aside an endpoint that refuses the API key, and says so: the
    # run says it once, and still every other notice.
    from gapfill.engine.events import Notice
    from gapfill.engine.run import Coordinator, EnrichJob

    seen: list[Any] = []
    job = EnrichJob("sqlite:///unused.db", (), ((1, "0x" + "ab" * 20),), 1, workers=2, plan_new=False)
    coordinator = Coordinator(job, seen.append)
    set_aside = Notice("set aside for this run: the RPC node at http://a/v3/*** refused it", once=True)
    retrying = "database error while leasing a batch, retrying"
    try:
        for worker in (1, 2):
            coordinator._take(set_aside)
            coordinator._take(Notice(f"[Worker-{worker}] {retrying}"))
    finally:
        coordinator.lifeline.close()
        coordinator._lifeline_w.close()
    assert [e.text for e in seen] == [set_aside.text, f"[Worker-1] {retrying}", f"[Worker-2] {retrying}"]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("planned", "spawning", "said"), [
    (False, False, "stopping: no worker has started yet, so nothing is planned or fetched"),
    (True, False, "stopping: no worker has started yet, so nothing is fetched; the open plan stays for "
                  "the rerun"),
    (True, True, "stopping: no new batches; workers have 30s to finish (Ctrl+C again to stop at once)"),
    # As the plan is written (at a million refs, seconds): its transaction goes on to commit.
    ("as it is written", False, "stopping: no worker has started yet, so nothing is fetched; the open "
                                "plan stays for the rerun"),
])  # fmt: skip
def test_a_ctrl_c_as_a_concurrent_run_starts_says_what_it_leaves(
    planned: bool | str, spawning: bool, said: str
) -> None:
    # A Ctrl+C while the workers were being started said "no worker has started yet, so
    # nothing is planned or fetched"; the run had planned, and its workers then leased and
    # committed two batches before "interrupted: the batches in flight finished". One while
    # the plan was written said so too, after "Run #N: ... refs newly planned": the handler
    # words it when the main thread says it.
    from gapfill.engine.events import Notice
    from gapfill.engine.run import Coordinator, EnrichJob

    seen: list[Any] = []
    job = EnrichJob("sqlite:///unused.db", (), ((1, "0x" + "ab" * 20),), 1, workers=2, plan_new=True)
    coordinator = Coordinator(job, seen.append)
    coordinator.planned, coordinator.spawning = planned is True, spawning
    try:
        coordinator._on_signal(2, None)
        assert coordinator.lifeline.poll()  # the workers, started or to start, see the stop
        assert seen == []  # the handler writes nothing; the main thread says it
        coordinator.planned = bool(planned)
        coordinator._say_unsaid()
    finally:
        coordinator.lifeline.close()
        coordinator._lifeline_w.close()
    assert [e.text for e in seen if isinstance(e, Notice)] == [said]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("grace_s", "said"), [
    (0.0, "the workers are stopped now and give their batches in flight back"),
    (0.4, "workers have 0.4s to finish"),
    (30.0, "workers have 30s to finish"),
])  # fmt: skip
def test_a_ctrl_c_says_the_grace_period_as_given(grace_s: float, said: str) -> None:
    # --grace-period 0 said "workers have 0s to finish", and 0.4 the same.
    from gapfill.engine.events import Notice
    from gapfill.engine.run import Coordinator, EnrichJob

    seen: list[Any] = []
    job = EnrichJob("sqlite:///unused.db", (), ((1, "0x" + "ab" * 20),), 1, workers=2, plan_new=True,
                    grace_period_s=grace_s)  # fmt: skip
    coordinator = Coordinator(job, seen.append)
    coordinator.planned = coordinator.spawning = True
    try:
        coordinator._on_signal(2, None)
        coordinator._say_unsaid()
    finally:
        coordinator.lifeline.close()
        coordinator._lifeline_w.close()
    assert [e.text for e in seen if isinstance(e, Notice)] == [
        f"stopping: no new batches; {said} (Ctrl+C again to stop at once)"]


@pytest.mark.timeout(10)
def test_a_ctrl_c_that_lands_while_a_line_is_written_is_said_after_it() -> None:
    # The coordinator's handler said "stopping: ..." itself. A handler runs between two
    # bytecodes of the main thread, here inside the write of a progress line to standard
    # error (the CLI's stream, whose raw write is Python code), and its own line to the
    # same stream raised "RuntimeError: reentrant call inside <_io.BufferedWriter>" there.
    import os
    import signal

    from gapfill.cli import _WholeWrites
    from gapfill.engine.run import Coordinator, EnrichJob

    class SignalledMidWrite(_WholeWrites):
        fired = False

        def write(self, data: Any, /) -> int:
            if not self.fired:
                self.fired = True
                signal.raise_signal(signal.SIGINT)  # its handler runs here, in this frame
            return super().write(data)

    read_end, write_end = os.pipe()
    # As the CLI's _whole_writes() puts standard error where it is not a terminal.
    err = io.TextIOWrapper(io.BufferedWriter(SignalledMidWrite(write_end)), line_buffering=True)
    job = EnrichJob("sqlite:///unused.db", (), ((1, "0x" + "ab" * 20),), 1, workers=2, plan_new=True)
    coordinator = Coordinator(job, LineRenderer(err))
    coordinator.planned = coordinator.spawning = True
    previous = signal.signal(signal.SIGINT, coordinator._on_signal)
    try:
        coordinator.emit(progress(1, 4))
        coordinator._say_unsaid()  # what its loop does next
        err.flush()
    finally:
        signal.signal(signal.SIGINT, previous)
        coordinator.lifeline.close()
        coordinator._lifeline_w.close()
        err.close()  # not the descriptor: a raw stream of the CLI's leaves it open
        os.close(write_end)
    with os.fdopen(read_end) as said:
        lines = said.read().splitlines()
    assert lines[0].startswith("Progress: 1/4 batches (25.0%)"), lines
    assert lines[1:] == ["stopping: no new batches; workers have 30s to finish (Ctrl+C again to stop at "
                         "once)"]  # fmt: skip
