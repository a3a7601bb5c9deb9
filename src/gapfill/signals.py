"""Ctrl+C and SIGTERM held where acting on them at once would misreport what was stored.

A signal's handler runs in the main thread between two bytecodes, and a ``KeyboardInterrupt``
raised there said nothing of a step that had already happened: a run's end recorded, or a
commit that completed (SQLite's ``COMMIT`` is one step no handler can cut: a Ctrl+C during
the 2 s commit of a 1M-ref import raised as it returned, and the CLI said "nothing was
imported" of an import stored whole). On PostgreSQL psycopg answers a ``KeyboardInterrupt``
during a ``COMMIT`` by cancelling it on the server, which may or may not have committed
(work the commit does, such as deferred triggers, is cancelled; its flush is not), so the
outcome was unknown there.

* :class:`HeldSignals`: from :meth:`~HeldSignals.hold` on, the first signal is counted and
  nothing more, a second raises ``KeyboardInterrupt`` at once (where what is waited for hangs).
* :func:`committing`: the stores run each write transaction's commit of the main thread in
  it, so that a first signal waits for the commit's end, whose outcome is then known; a
  second stops the command at once with :class:`CommitUnknown` (on PostgreSQL: SQLite's
  commit, which no signal cuts, has returned by then, and its store says what it did).
* :class:`HoldFromCommit`: where a command says what a commit stored, it holds the signals
  from that commit's start to the scope's end, and the command reports what it did.
* :func:`run_interruptible`: ``asyncio.run`` for a command's wait on a node, which a first
  Ctrl+C ends wherever it lands (:func:`keep_lost_interrupts` keeps one a finalizer swallowed).

Neutral: the stores, the engine and the CLI use it, and it imports none of them.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")


class HeldSignals:
    """Ctrl+C and SIGTERM while a step must not be cut short (a run's end recorded and said, a
    commit, a database closed): the first is held, so that what the step does is done and
    said as it is; a second, where the step hangs (the database), stops the command at once.
    ``held`` counts them; ``first`` is the first one's number.

    A handler is swapped in rather than the signals blocked with ``pthread_sigmask``: that
    blocks them for the calling thread only, another thread of the process (an executor's,
    the metrics server's) takes them, and their Python handler runs in the main thread all
    the same."""

    def __init__(self) -> None:
        self.held = 0
        self.first: int | None = None
        self._previous: dict[int, Any] = {}

    def hold(self, previous: dict[int, Any] | None = None) -> None:
        """From here on (the main thread only: no other can handle signals); once is enough.
        ``previous``: the handlers :meth:`restore` puts back, if not those this replaces (an
        ignored one is put back at once, as one ignored here is left so)."""
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            if previous is not None:
                if previous[signum] is signal.SIG_IGN:  # given back now: it stays ignored
                    signal.signal(signum, signal.SIG_IGN)
                    continue
                signal.signal(signum, self._on_signal)
                self._previous[signum] = previous[signum]
            elif signal.getsignal(signum) not in (signal.SIG_IGN, None):  # `cmd &` ignores SIGINT
                self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _: Any) -> None:
        self.held += 1
        if self.first is None:
            self.first = signum
        if self.held > 1:
            raise KeyboardInterrupt

    def restore(self) -> None:
        """Put back the handlers :meth:`hold` replaced."""
        while self._previous:
            signum, handler = self._previous.popitem()
            signal.signal(signum, handler)


class CommitUnknown(KeyboardInterrupt):
    """A second Ctrl+C or SIGTERM during a commit stopped the command before the commit's
    outcome was known: on PostgreSQL psycopg cancels the ``COMMIT``, which may have completed.
    SQLite's ``COMMIT`` is one C call that no signal cuts, so the store knows the outcome
    there and raises a plain ``KeyboardInterrupt`` instead (:func:`mark_committed`)."""


#: The :class:`HoldFromCommit` scopes open, innermost last (the main thread's only).
_scopes: list[HoldFromCommit] = []


class HoldFromCommit:
    """A command's commit and what it says of it: from the start of the first commit of a
    write made in the scope (by the main thread) to the scope's end, Ctrl+C and SIGTERM are
    held (:class:`HeldSignals`). A first one lets the command say what it stored, where it
    raised ``KeyboardInterrupt`` as the commit returned and the command said that nothing
    was; a second stops it at once, and ``committed`` tells the command's last line whether
    the commit was done.

    ``deliver``: at the scope's end a signal held is handled as if it came then (the
    command stops there, once it has recorded what the commit stored); else it is left to
    the command, which reads ``held``."""

    def __init__(self, deliver: bool = True) -> None:
        self.deliver = deliver
        #: Whether a commit of the scope finished (its outcome is stored).
        self.committed = False
        self._held: HeldSignals | None = None

    @property
    def held(self) -> int:
        """The signals held since the scope's first commit started."""
        return self._held.held if self._held is not None else 0

    def __enter__(self) -> HoldFromCommit:
        if threading.current_thread() is threading.main_thread():
            _scopes.append(self)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        if self in _scopes:
            _scopes.remove(self)
        held, self._held = self._held, None
        if held is None:
            return
        held.restore()
        if held.held:
            self._held = held  # for the caller to read once the scope is over
        if kind is None and self.deliver and held.first is not None:
            signal.raise_signal(held.first)  # its handler, put back, runs now


def mark_committed() -> None:
    """The commit that :class:`CommitUnknown` stopped is known to be done (SQLite's, whose
    ``COMMIT`` had returned when the second signal was handled): the :class:`HoldFromCommit`
    scope open says so in ``committed``, and the command says what it stored."""
    if _scopes and threading.current_thread() is threading.main_thread():
        _scopes[-1].committed = True


def _holding() -> bool:
    """Whether Ctrl+C or SIGTERM is held already (a run's end, a scope after its commit):
    that holder decides what a signal does."""
    return any(isinstance(getattr(signal.getsignal(s), "__self__", None), HeldSignals)
               for s in (signal.SIGINT, signal.SIGTERM))  # fmt: skip


@contextmanager
def committing() -> Iterator[None]:
    """Around a write transaction's ``COMMIT`` (the stores'): in the main thread, the only
    one signals reach, a first Ctrl+C or SIGTERM waits for the commit's end, whose outcome
    is then known, and is handled after it (at once, or at the end of a
    :class:`HoldFromCommit` scope open, or as the commit fails: its error is then the
    ``KeyboardInterrupt``'s context); a second raises :class:`CommitUnknown`. Elsewhere, or
    where a holder is already at work, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    scope = _scopes[-1] if _scopes else None
    if _holding():
        yield
        if scope is not None:
            scope.committed = True
        return
    held = HeldSignals()
    held.hold()
    try:
        yield
    except KeyboardInterrupt:  # only a second signal raises it here
        held.restore()
        raise CommitUnknown from None
    except BaseException:
        held.restore()
        if held.first is not None:
            # The commit failed (a PostgreSQL serialization failure or deferred constraint,
            # SQLite's disk full): the signal held is handled all the same, the error its
            # context. Dropped, the command said the error and exited 1, and a caller that
            # catches the store's error lost the Ctrl+C.
            signal.raise_signal(held.first)
        raise
    if scope is not None:
        scope.committed = True
        scope._held = held  # held on to the scope's end
        return
    held.restore()
    if held.first is not None:
        signal.raise_signal(held.first)  # handled now that the commit is done


#: Ctrl+Cs (or SIGTERMs raised as ``KeyboardInterrupt``) that a finalizer swallowed, not yet
#: acted on (see :func:`keep_lost_interrupts`).
_lost: list[KeyboardInterrupt] = []


def keep_lost_interrupts() -> None:
    """Keep the ``KeyboardInterrupt`` a first Ctrl+C raised where Python cannot pass it on,
    in a finalizer (``__del__``, a weakref callback such as an import's module lock's, the
    garbage collector's): Python printed it as "Exception ignored in ..." and the command
    went on, into a wait on the node for all of ``--rpc-timeout``. The next
    :func:`run_interruptible` acts on it, before it waits for anything. At each command's
    start (the hook is installed once); other unraisable exceptions go to the hook there was."""
    _lost.clear()  # one an earlier command lost (in-process: tests) is not this one's
    previous = sys.unraisablehook
    if getattr(previous, "keeps_lost_interrupts", False):
        return

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            _lost.append(unraisable.exc_value)
            return
        previous(unraisable)

    hook.keeps_lost_interrupts = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


class _Interrupts:
    """A first Ctrl+C during :func:`run_interruptible`: counted, and the main task cancelled
    (nothing is raised, so no finalizer can swallow it); a second raises at once."""

    def __init__(self) -> None:
        self.count = 0
        self.task: Any = None  # the asyncio task to cancel, once there is one

    def on_signal(self, signum: int, _: Any) -> None:
        self.count += 1
        if self.count > 1:
            raise KeyboardInterrupt
        task = self.task
        if task is not None and not task.done():
            task.cancel()
            task.get_loop().call_soon_threadsafe(lambda: None)  # wakes a select() with a long timeout


def run_interruptible(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """``asyncio.run(main())`` that a first Ctrl+C ends with ``KeyboardInterrupt`` wherever it
    lands, once the loop is torn down: before the loop runs (``main``'s module imports are
    best made in it), while ``main`` waits, or as the loop closes. ``asyncio.run`` raises
    in its handler only from its own, so a Ctrl+C in ``main``'s imports before it, or in
    a finalizer there, was lost and the command waited on its node until the node's
    timeout; one the command lost before (:func:`keep_lost_interrupts`) ends it here. Where
    Ctrl+C is not Python's default (ignored, held) or outside the main thread, it is
    ``asyncio.run`` as it is."""
    import asyncio

    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):  # fmt: skip
        return asyncio.run(main())
    got = _Interrupts()
    previous = signal.signal(signal.SIGINT, got.on_signal)
    try:
        if _lost:
            _lost.clear()
            raise KeyboardInterrupt
        result: Any = None
        with asyncio.Runner() as runner:
            loop = runner.get_loop()
            if not got.count:
                got.task = loop.create_task(main())
                try:
                    result = loop.run_until_complete(got.task)
                except BaseException:
                    if not got.count or got.count > 1:
                        raise
                    # Cancelled by the first Ctrl+C, or an error of its own meanwhile.
        if got.count:  # whatever ``main`` did with its cancellation, the command stops
            raise KeyboardInterrupt
        return result  # type: ignore[no-any-return]
    finally:
        if signal.getsignal(signal.SIGINT) == got.on_signal:
            signal.signal(signal.SIGINT, previous)
