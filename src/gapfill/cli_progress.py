"""Rendering the engine's progress events: a rich live view on a terminal, log lines elsewhere."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from gapfill.engine.events import (
    LEASE_GONE,
    BatchAbandoned,
    BatchAssigned,
    BatchDone,
    BatchesEmptied,
    Event,
    Notice,
    Progress,
    RunStarted,
    RunSummary,
    WorkerExited,
    WorkerStats,
    key_range,
)
from gapfill.wording import counted


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{seconds:.1f}s"


#: What the summary of an interrupted run says to do, after "interrupted: ".
RERUN = "rerun the same command to continue where it stopped"


def summary_lines(s: RunSummary, go_on: str = RERUN) -> list[str]:
    """The run's summary; ``go_on``: what an interrupted run's says to do (`gapfill demo`'s
    chain goes with its node: a rerun starts over)."""
    see = " (see `gapfill failures`)"
    # ``failed`` is what this run recorded, ``permanent_failures`` what the database holds
    # for the run's contracts, whichever run recorded it: two lines, where "3 (8,006
    # permanent)" read as 8,006 of the 3. This run's number stays first (bench/suite.py).
    lines = [
        f"Run #{s.run_id} {s.state}: mode {s.mode}, {s.workers} worker(s)",
        f"  processed: {counted(s.processed, 'transaction')}",
        f"  failed:    {s.failed:,} this run{see if s.failed and not s.permanent_failures else ''}",
    ]
    if s.permanent_failures:
        lines.append(f"  permanent: {counted(s.permanent_failures, 'failure')} on record for the run's "
                     f"contracts, whichever run recorded them{see}")  # fmt: skip
    lines += [
        f"  duration:  {fmt_duration(s.seconds)}",
        f"  rate:      {s.rate_tx_s:,.1f} tx/s",
        # Per transaction only when one was stored: "48 RPC calls, 0.00 per transaction" was
        # said of a run whose every ref failed.
        f"  calls:     {counted(s.calls, 'RPC call')}"
        + (f", {s.calls_per_tx:.2f} per transaction" if s.processed else ""),
    ]
    if s.speedup is not None and s.sequential_rate_tx_s is not None and s.processed:
        lines.append(f"  speedup:   {s.speedup:,.1f}x over sequential ({s.sequential_rate_tx_s:,.1f} tx/s, "
                     f"{s.sequential_rate_source})")  # fmt: skip
    if s.restarts:
        lines.append(f"  restarts:  {counted(s.restarts, 'worker restart')}")
    if s.beyond_head:
        head = "" if s.head is None else f" (its head was {s.head} when last asked)"
        lines.append(f"  not yet:   {counted(s.beyond_head, 'ref')} {'is' if s.beyond_head == 1 else 'are'} "
                     "in blocks the node has not reached yet"
                     f"{head}: rerun once it has caught up to fill them")  # fmt: skip
    if s.arrived:
        lines.append(f"  arrived:   {counted(s.arrived, 'ref')} imported or discovered during the run, after "
                     "its plan, still missing: rerun the same command to fill them")  # fmt: skip
    if s.state == "interrupted" and s.nothing_left:
        lines.append("  interrupted: the batches in flight finished, and nothing is left to enrich")
    elif s.state == "interrupted":
        lines.append(f"  interrupted: {go_on}")
    return lines


def _with_riders(rode: int) -> str:
    """What a batch stored of its riders: ``, with 120 refs of other batches in the same
    blocks`` (its own count apart: ``+N success`` and ``N stored`` count only its own refs)."""
    return f", with {counted(rode, 'ref')} of other batches in the same blocks" if rode else ""


def _what_was_kept(ev: BatchAbandoned) -> str:
    """`` (480 stored, the rest retried)`` for a batch given back with what it got; only
    what is true: ``(480 stored, 20 failed for good)`` says nothing is retried (a batch whose
    every ref was stored as it was given back is closed, and its line says it is complete)."""
    if not ev.kept and not ev.kept_failed and not ev.kept_rode:
        return ""
    said = [f"{ev.kept} stored{_with_riders(ev.kept_rode)}"]
    if ev.kept_failed:
        said.append(f"{ev.kept_failed} failed for good")
    if ev.rest:
        said.append("the rest retried")
    return f" ({', '.join(said)})"


def plan_said(ev: RunStarted) -> str:
    """A run's plan as its first line says it (the line renderer's and the live view's):
    ``RunStarted.refs`` counts only the refs newly planned, so on a resume (the open plan
    joined) a bare "0 refs" read as nothing to do; `gapfill worker` never plans, and says
    no planned refs at all."""
    join = f", joined {ev.joined} open plan(s)" if ev.joined else ""
    planned = "" if ev.mode == "worker" else f", {counted(ev.refs, 'ref')} newly planned"
    return f"{counted(ev.batches, 'open batch', 'open batches')}{planned}{join}"


class LineRenderer:
    """The seed's log lines, with key ranges where the seed printed offsets."""

    def __init__(self, out: TextIO | None = None, progress_every_s: float = 5.0, go_on: str = RERUN) -> None:
        self.out = out
        self.every = progress_every_s
        self.go_on = go_on  # see summary_lines
        self._last: float | None = None  # when a progress line was last said
        self._said_all: tuple[int, int] | None = None  # the "every batch done" line, said once

    def line(self, text: str) -> None:
        print(text, file=self.out or sys.stderr, flush=True)

    def __call__(self, ev: Event) -> None:
        if isinstance(ev, RunStarted):
            self.line(f"Run #{ev.run_id}: mode {ev.mode}, {ev.workers} worker(s) on {ev.cores} CPU cores; "
                      f"{plan_said(ev)}")  # fmt: skip
        elif isinstance(ev, BatchAssigned):
            again = f" (attempt {ev.attempt})" if ev.attempt > 1 else ""
            self.line(f"[Worker-{ev.worker + 1}] Assigned batch {ev.batch_id}: {key_range(ev.lo, ev.hi)}, "
                      f"{counted(ev.refs, 'ref')}{again}")  # fmt: skip
        elif isinstance(ev, BatchDone):
            if ev.committed:
                self.line(f"[Worker-{ev.worker + 1}] Batch {ev.batch_id} complete: +{ev.succeeded} success, "
                          f"{ev.failed} failed{_with_riders(ev.rode)} ({ev.seconds:.1f}s)")  # fmt: skip
            else:
                self.line(f"[Worker-{ev.worker + 1}] Batch {ev.batch_id}: lease lost, nothing written")
        elif isinstance(ev, BatchAbandoned) and ev.closed:
            self.line(f"[Worker-{ev.worker + 1}] Batch {ev.batch_id} complete as it was given back "
                      f"({ev.error}): +{ev.kept} success, {ev.kept_failed} failed"
                      f"{_with_riders(ev.kept_rode)}")  # fmt: skip
        elif isinstance(ev, BatchAbandoned) and ev.not_given == LEASE_GONE:
            self.line(f"[Worker-{ev.worker + 1}] Batch {ev.batch_id} attempt {ev.attempt} ({ev.error}): "
                      "its lease had ended already, nothing of it written; it was taken back for "
                      "another attempt")  # fmt: skip
        elif isinstance(ev, BatchAbandoned) and ev.not_given:
            self.line(f"[Worker-{ev.worker + 1}] Batch {ev.batch_id} attempt {ev.attempt} ({ev.error}) "
                      f"could not be given back ({ev.not_given}): nothing of it written; its lease "
                      f"expires {ev.lease_timeout_s:g} s after it was last renewed (--lease-timeout), "
                      "and the batch is taken back then")  # fmt: skip
        elif isinstance(ev, BatchAbandoned):
            self.line(f"[Worker-{ev.worker + 1}] Batch {ev.batch_id} attempt {ev.attempt} given back"
                      f"{_what_was_kept(ev)}: {ev.error}")  # fmt: skip
        elif isinstance(ev, Progress):
            now = time.monotonic()
            where = (ev.done_batches, ev.total_batches)
            finished = ev.done_batches == ev.total_batches
            due = self._last is None or now - self._last >= self.every
            if where != self._said_all and (finished or due):
                self._last = now
                if finished:
                    self._said_all = where
                pct = 100.0 * ev.done_batches / ev.total_batches if ev.total_batches else 100.0
                # The seed's line, word for word ("1 active workers" too): log parsers and
                # the README's example read it as it is.
                # What the batches in flight have fetched, after the seed's words: the rate and
                # the done count move only as batches are stored, and a run of one batch said
                # "0/1 batches ..., 0 tx/s" until its end.
                fetched = (f"; {counted(ev.fetched, 'transaction')} fetched, not stored yet"
                           if ev.fetched else "")  # fmt: skip
                self.line(f"Progress: {ev.done_batches}/{ev.total_batches} batches ({pct:.1f}%), "
                          f"{ev.active_workers} active workers, {ev.rate_tx_s:,.0f} tx/s, "
                          f"ETA {fmt_duration(ev.eta_s)}{fetched}")  # fmt: skip
        elif isinstance(ev, Notice):
            self.line(ev.text)
        elif isinstance(ev, WorkerExited):
            if ev.exitcode not in (0, None) and not ev.restarted and not ev.killed:
                self.line(f"[Worker-{ev.worker + 1}] exited with code {ev.exitcode}")
        elif isinstance(ev, RunSummary):
            for ln in summary_lines(ev, self.go_on):
                self.line(ln)


@dataclass
class _WorkerRow:
    pid: int = 0
    processed: int = 0
    failed: int = 0
    rate: float = 0.0
    retries: int = 0
    limited: int = 0
    batch: str = "-"


@dataclass
class LiveRenderer:
    """A rich live view: overall bar, tx/s, ETA, a row per worker, retries and 429s."""

    workers: dict[int, _WorkerRow] = field(default_factory=dict)
    progress: Progress | None = None
    started: RunStarted | None = None
    notices: list[str] = field(default_factory=list)
    _live: Any = None
    _t0: float = field(default_factory=time.perf_counter)
    _single: _WorkerRow = field(default_factory=_WorkerRow)

    def __enter__(self) -> LiveRenderer:
        from rich.live import Live

        self._live = Live(self._render(), refresh_per_second=4, transient=False)
        self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.__exit__(None, None, None)

    def _render(self) -> Any:
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        p = self.progress
        parts: list[Any] = []
        if self.started:
            s = self.started
            parts.append(Text(f"Run #{s.run_id} · mode {s.mode} · {s.workers} worker(s) on {s.cores} cores · "
                              f"{plan_said(s)}", style="bold"))  # fmt: skip
        total = p.total_batches if p else (self.started.batches if self.started else 0)
        done = p.done_batches if p else 0
        parts.append(ProgressBar(total=max(total, 1), completed=done, width=60))
        if p:
            # The ETA first: a narrow terminal cuts the line's end.
            tx = f"{p.processed:,} tx" + (f" (+{p.fetched:,} fetched, not stored yet)" if p.fetched else "")
            parts.append(Text(f"{done}/{total} batches · ETA {fmt_duration(p.eta_s)} · "
                              f"{p.rate_tx_s:,.0f} tx/s · {tx} · failed {p.failed:,} · "
                              f"retries {p.retries:,} · 429s {p.rate_limited:,}"))  # fmt: skip
        t = Table(box=None, pad_edge=False)
        for col in ("worker", "pid", "batch", "tx", "tx/s", "failed", "retries", "429s"):
            t.add_column(col, justify="left" if col in ("worker", "batch") else "right")
        for i, w in sorted(self.workers.items()):
            t.add_row(f"Worker-{i + 1}", str(w.pid), w.batch, f"{w.processed:,}", f"{w.rate:,.0f}",
                      str(w.failed), str(w.retries), str(w.limited))  # fmt: skip
        parts.append(t)
        for n in self.notices[-4:]:
            parts.append(Text(n, style="yellow"))
        return Group(*parts)

    def _count(self, done: int, stored: int, failed: int) -> None:
        """With one worker (batch and sequential mode, which count as this does), a batch's
        event moves the bar as it comes: a commit, a batch closed at lease time or given
        back closed alike. With several, the coordinator's ``Progress`` (once a second)
        does: it may already count a batch whose event it has not passed on yet."""
        if not (self.started and self.started.workers == 1):
            return
        prev = self.progress
        done += prev.done_batches if prev else 0
        elapsed = time.perf_counter() - self._t0
        processed = (prev.processed if prev else 0) + stored
        failed += prev.failed if prev else 0
        rate = processed / elapsed if elapsed > 0 else 0.0
        left = self.started.batches - done
        eta = left * (elapsed / done) if done else None
        self.progress = Progress(done, self.started.batches, 1, processed, failed, elapsed, rate, eta,
                                 self._single.retries, self._single.limited)  # fmt: skip

    def __call__(self, ev: Event) -> None:
        if isinstance(ev, RunStarted):
            self.started = ev
        elif isinstance(ev, WorkerStats):
            w = self.workers.setdefault(ev.worker, _WorkerRow())
            w.pid, w.processed, w.failed = ev.pid, ev.processed, ev.failed
            w.retries, w.limited = ev.retries, ev.rate_limited
            w.rate = ev.processed / ev.elapsed_s if ev.elapsed_s > 0 else 0.0
            if not self.progress or len(self.workers) == 1:
                # In-process modes send no Progress: derive it from the one worker.
                self._single = w
        elif isinstance(ev, BatchAssigned):
            row = self.workers.setdefault(ev.worker, _WorkerRow())
            row.batch = f"#{ev.batch_id} {key_range(ev.lo, ev.hi)}"
        elif isinstance(ev, BatchDone):
            self._count(1 if ev.committed else 0, ev.stored, ev.failed)
        elif isinstance(ev, BatchesEmptied):  # closed at lease time, nothing left to fetch: done
            self._count(ev.count, 0, 0)
        elif isinstance(ev, BatchAbandoned):  # with what it stored; done if that was all it had
            self._count(1 if ev.closed else 0, ev.kept_new, ev.kept_failed)
        elif isinstance(ev, Progress):
            self.progress = ev
        elif isinstance(ev, Notice):
            self.notices.append(ev.text)
        elif isinstance(ev, RunSummary):
            return
        if self._live is not None:
            self._live.update(self._render())
