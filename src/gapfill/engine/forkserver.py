"""The server the concurrent mode's workers fork from: started early, stopped with the run.

A worker forks from a server process that imported the engine once (a spawned worker would
import everything again: ~0.4 CPU s each, on the node's cores). That import takes ~0.3 s on
the bench machine (0.65 s on a slower one), and until it is done no worker starts: the
node waits. So the server is started as early as the command knows it runs concurrent
mode (:func:`start`, from the CLI before it opens the database or imports the engine),
and imports the store's backend too (psycopg), which each worker otherwise imported
after its fork. This module imports nothing heavy, so that starting the server early
costs the command itself nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys


def preload(db_url: str, tls: bool = False) -> list[str]:
    """The modules the server imports for a run on ``db_url``: the engine and keccak's
    backend (:mod:`gapfill.engine.preload`), the database's store backend, and with ``tls``
    (an endpoint may use TLS: :func:`gapfill.rpc.tls.may_use_tls`) the CA certificates
    (:mod:`gapfill.rpc.trusted`)."""
    sqlite = db_url.lower().startswith("sqlite:")
    backend = "gapfill.store.sqlite" if sqlite else "gapfill.store.postgres"
    return ["gapfill.engine.preload", backend, *(["gapfill.rpc.trusted"] if tls else [])]


def start(db_url: str, tls: bool = False) -> None:
    """Start the fork server for a run on ``db_url`` (if it is not running) without
    waiting for its import; ``tls`` as for :func:`preload`.

    It starts with SIGINT ignored (a disposition a new process inherits): the server
    protects itself from Ctrl+C only once its preload is imported, and a Ctrl+C meant
    for the coordinator would otherwise kill it mid-import with a traceback.
    """
    from multiprocessing import forkserver

    forkserver.set_forkserver_preload(preload(db_url, tls))
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with contextlib.suppress(Exception):  # if it fails here, the first worker's start says why
            forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, previous)


def stop(*, unused: bool = False) -> None:
    """Stop and reap the workers' fork server, if one runs, once they are gone.

    Python 3.11 leaves it to exit by itself after the coordinator; reaping it here means
    no process outlives the run and the workers' CPU time counts in the coordinator's
    children (``wait4``), as it did with spawned workers. A server that forked nothing
    (``unused``: nothing to do, or the run failed first) is killed rather than asked to
    stop: it would finish importing its preload (~0.3 s) before it noticed. Where none was
    started, multiprocessing is not imported for it (a command with nothing to do).
    """
    forkserver = sys.modules.get("multiprocessing.forkserver")
    if forkserver is None:  # this process started no server
        return
    server = getattr(forkserver, "_forkserver", None)
    if unused:
        pid = getattr(server, "_forkserver_pid", None)
        if isinstance(pid, int):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        server._stop()  # type: ignore[union-attr]  # the one way the stdlib offers (its tests use it)
