"""A worker's SIGTERM: cancels its main task once, and is harmless as its loop closes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# The loop closes its wakeup pipe before it removes its signal handlers: the script sends
# SIGTERM in that gap, as the coordinator's repeated SIGTERM once did in CI.
_SCRIPT = textwrap.dedent("""
    import asyncio, os, signal
    from gapfill.engine.run import _sigterm_cancels_main

    {helper}

    async def main():
        loop = asyncio.get_running_loop()
        close_pipe = loop._close_self_pipe

        def close_then_term():
            close_pipe()
            os.kill(os.getpid(), signal.SIGTERM)

        loop._close_self_pipe = close_then_term
        with guard():
            await asyncio.sleep(0)

    asyncio.run(main())
    print("exited normally")
""")
_NEW = "guard = _sigterm_cancels_main"
# What the worker did before: the loop's handler and nothing when the block ends.
_OLD = """
import contextlib
@contextlib.contextmanager
def guard():
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, lambda: None)
    yield
"""


def _python(script: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)


def _run(helper: str) -> subprocess.CompletedProcess[str]:
    return _python(_SCRIPT.format(helper=helper))


@pytest.mark.timeout(60)
def test_a_sigterm_as_the_workers_loop_closes_prints_nothing() -> None:
    old = _run(_OLD)  # the race is real: the old way printed a traceback
    assert "Exception ignored when trying to write to the signal wakeup fd" in old.stderr, old.stderr
    new = _run(_NEW)
    assert new.returncode == 0 and new.stdout == "exited normally\n", new
    assert new.stderr == "", new.stderr


@pytest.mark.timeout(60)
def test_sigterm_in_the_block_cancels_the_main_task_once() -> None:
    script = textwrap.dedent("""
        import asyncio, os, signal
        from gapfill.engine.run import _sigterm_cancels_main

        async def main():
            with _sigterm_cancels_main():
                os.kill(os.getpid(), signal.SIGTERM)
                try:
                    await asyncio.sleep(10)
                except asyncio.CancelledError:
                    print("cancelled")
                os.kill(os.getpid(), signal.SIGTERM)  # a repeat does not cut the clean-up
                await asyncio.sleep(0.1)
                print("clean-up finished")
            os.kill(os.getpid(), signal.SIGTERM)  # ignored once the block is left
            print("after the block")

        asyncio.run(main())
    """)
    done = _python(script)
    assert done.returncode == 0, done
    assert done.stdout == "cancelled\nclean-up finished\nafter the block\n", done
    assert done.stderr == ""


@pytest.mark.timeout(60)
def test_a_sigterm_as_the_handler_changes_hands_does_not_kill_the_worker() -> None:
    # The block's end restored SIG_DFL (the loop's remove_signal_handler) before it ignored
    # SIGTERM, blocked in the main thread alone: a SIGTERM then went to another thread (the
    # worker's events sender), and killed the worker before its last events were sent.
    script = textwrap.dedent("""
        import asyncio, os, signal, threading, time
        from gapfill.engine.run import _sigterm_cancels_main

        threading.Thread(target=threading.Event().wait, daemon=True).start()
        set_handler = signal.signal

        def set_then_term(sig, handler):  # a SIGTERM right after each change of hands
            previous = set_handler(sig, handler)
            if sig == signal.SIGTERM:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)
            return previous

        async def main():
            with _sigterm_cancels_main():
                await asyncio.sleep(0)
                signal.signal = set_then_term

        asyncio.run(main())
        print("exited normally")
    """)
    done = _python(script)
    assert done.returncode == 0 and done.stdout == "exited normally\n", done


@pytest.mark.timeout(60)
@pytest.mark.parametrize("taken_by", ["the main thread", "another thread"])
def test_a_sigterm_wakes_the_idle_loop(taken_by: str) -> None:
    # The kernel gives a process's SIGTERM to any thread that does not block it. Taken by
    # the main thread, it interrupts the loop's wait; taken by another (the worker's events
    # sender, the executor's resolvers), it interrupts no wait of the main thread, whose
    # Python handler runs only once it runs again: here the main thread blocks it to make
    # sure. Either way the loop has nothing to do for an hour.
    script = textwrap.dedent("""
        import asyncio, os, signal, threading, time
        from gapfill.engine.run import _sigterm_cancels_main

        def term_later():
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)

        async def main():
            with _sigterm_cancels_main():
                threading.Thread(target=term_later, daemon=True).start()
                if {block}:
                    signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGTERM}})
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    print("cancelled")

        asyncio.run(main())
    """).format(block=taken_by == "another thread")
    try:
        done = _python(script, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("the SIGTERM did not wake the idle loop")
    assert done.returncode == 0 and done.stdout == "cancelled\n", done
    assert done.stderr == "", done.stderr


@pytest.mark.timeout(60)
def test_the_block_refuses_a_wakeup_fd_set_already() -> None:
    # Its own wakeup fd replaced the one found, whose readers (the loop's
    # `add_signal_handler` handlers) then never ran; it now refuses and leaves it be.
    script = textwrap.dedent("""
        import asyncio, signal
        from gapfill.engine.run import _sigterm_cancels_main

        async def main():
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGUSR1, lambda: None)
            found = signal.set_wakeup_fd(-1)
            signal.set_wakeup_fd(found)
            try:
                with _sigterm_cancels_main():
                    print("entered")
            except RuntimeError as exc:
                print("refused:", "add_signal_handler" in str(exc))
            after = signal.set_wakeup_fd(-1)
            signal.set_wakeup_fd(after)
            print("left be:", found != -1 and after == found)
            loop.remove_signal_handler(signal.SIGUSR1)

        asyncio.run(main())
    """)
    done = _python(script)
    assert done.returncode == 0 and done.stdout == "refused: True\nleft be: True\n", done


def _ending_with_events_unsent(events: object, count: int) -> None:
    """A worker that the coordinator's SIGTERM finds with ``count`` events still to send (more
    than a pipe holds): it sends them as it exits (:meth:`_EventSender.close`), then ends 0."""
    import signal

    from gapfill.engine.events import Notice
    from gapfill.engine.run import _EventSender

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as a worker's is once its loop has ended
    sender = _EventSender(events, "Worker-1")  # type: ignore[arg-type]
    for i in range(count):
        sender.put(Notice(f"event {i} " + "x" * 200))
    sender.close()


@pytest.mark.timeout(60)
def test_the_coordinator_reads_a_stopping_workers_events_while_it_waits_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # _stop_workers (a lost node, a refusal) sent SIGTERM and joined each worker for up to
    # LOST_NODE_STOP_S without reading their event pipes: a worker with more than a pipe's
    # 64 KiB of events unsent blocked in its last send until then, and the run's end killed it,
    # its last events (what it gave back, and with what) lost.
    import multiprocessing

    import gapfill.engine.run
    from gapfill.engine.run import Coordinator, EnrichJob, _Slot

    monkeypatch.setattr(gapfill.engine.run, "LOST_NODE_STOP_S", 3.0)
    seen: list[object] = []
    job = EnrichJob("sqlite:///unused.db", (), ((1, "0x" + "ab" * 20),), 1, workers=1)
    c = Coordinator(job, seen.append)
    fork = multiprocessing.get_context("fork")
    reader, writer = fork.Pipe(duplex=False)
    proc = fork.Process(target=_ending_with_events_unsent, args=(writer, 1_000), daemon=True)
    proc.start()
    writer.close()
    c.events.append(reader)
    c.slots[0] = _Slot(0, proc, 0.0)
    try:
        assert reader.poll(30)  # it sends: its SIGTERM is ignored by now
        c._stop_workers()
        alive = proc.is_alive()
    finally:
        proc.kill()
        proc.join()
        c.lifeline.close()
        c._lifeline_w.close()
    assert not alive and proc.exitcode == 0, "the worker was left blocked on its event pipe"
    assert len(seen) == 1_000
