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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import socket


def preload(db_url: str, tls: bool = False) -> list[str]:
    """The modules the server imports for a run on ``db_url``: the engine and keccak's
    backend (:mod:`gapfill.engine.preload`), the database's store backend, and with ``tls``
    (an endpoint may use TLS: :func:`gapfill.rpc.tls.may_use_tls`) the CA certificates
    (:mod:`gapfill.rpc.trusted`)."""
    sqlite = db_url.lower().startswith("sqlite:")
    backend = "gapfill.store.sqlite" if sqlite else "gapfill.store.postgres"
    return ["gapfill.engine.preload", backend, *(["gapfill.rpc.trusted"] if tls else [])]


#: The environment variable that names, to the server, the socket :func:`ready` waits on.
READY_ENV = "GAPFILL_FORKSERVER_READY"

#: The socket the server last started says on that its preload is imported (None: no
#: server was started, or it said so already).
_ready: socket.socket | None = None


def start(db_url: str, tls: bool = False) -> None:
    """Start the fork server for a run on ``db_url`` (if it is not running) without
    waiting for its import (:func:`ready` waits); ``tls`` as for :func:`preload`.

    It starts with SIGINT ignored (a disposition a new process inherits): the server
    protects itself from Ctrl+C only once its preload is imported, and a Ctrl+C meant
    for the coordinator would otherwise kill it mid-import with a traceback.
    """
    global _ready
    import socket  # (multiprocessing.forkserver imports it anyway)
    from multiprocessing import forkserver

    # Its last import (gapfill.engine.preloaded) sends a datagram to an abstract socket
    # named in its environment: the one way out of a server that keeps only its own fds.
    forkserver.set_forkserver_preload([*preload(db_url, tls), "gapfill.engine.preloaded"])
    server = forkserver._forkserver
    before = getattr(server, "_forkserver_pid", None)
    said = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"gapfill-forkserver-{os.getpid()}-{os.urandom(8).hex()}"
    try:
        said.bind("\0" + name)
        os.environ[READY_ENV] = name
        listening = True
    except OSError:  # no abstract namespace (not Linux): nothing waits for the import
        listening = False
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with contextlib.suppress(Exception):  # if it fails here, the first worker's start says why
            forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, previous)
        os.environ.pop(READY_ENV, None)
    pid = getattr(server, "_forkserver_pid", None)
    if not listening or pid is None or pid == before:  # none started, or one was running already
        said.close()
        return
    if _ready is not None:
        _ready.close()
    _ready = said


async def ready(timeout_s: float) -> bool:
    """Wait until the server :func:`start` started has imported its preload (~0.3 s of CPU,
    0.65 s on a slow machine): True once it has (or where none is starting), False after
    ``timeout_s`` (a server that died importing never says). What measures the node (the
    start-up sample) waits for it: on a 2-core machine that import took a core from the
    node and the sample, which measured 48 to 689 tx/s of a node a sequential run did
    192 tx/s on."""
    global _ready
    said = _ready
    if said is None:
        return True
    import asyncio

    loop = asyncio.get_running_loop()
    heard: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if not heard.done():
            heard.set_result(None)

    loop.add_reader(said.fileno(), on_readable)
    try:
        await asyncio.wait_for(heard, timeout_s)
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(said.fileno())
    said.close()
    _ready = None
    return True


def stop() -> None:
    """Kill and reap the workers' fork server, if one runs, once its workers are gone.

    Python 3.11 leaves it to exit by itself after the coordinator; reaping it here means
    no process outlives the run and the workers' CPU time counts in the coordinator's
    children (``wait4``: the server reaped them), as it did with spawned workers. It is
    killed rather than asked to stop: asked (its alive pipe closed), it finalised an
    interpreter that had imported the engine, and every concurrent run's end waited
    0.07-0.14 s for it (2-core machine, 20,000-ref runs, a third of what that end took
    more than batch mode's); one that forked nothing (nothing to do, or the run failed
    first) would have finished importing its preload (~0.3 s) before it noticed. It holds
    nothing to write: its workers are gone, their exit codes read. Where none was started,
    multiprocessing is not imported for it (a command with nothing to do).
    """
    global _ready
    if _ready is not None:
        _ready.close()
        _ready = None
    forkserver = sys.modules.get("multiprocessing.forkserver")
    if forkserver is None:  # this process started no server
        return
    server = getattr(forkserver, "_forkserver", None)
    pid = getattr(server, "_forkserver_pid", None)
    if isinstance(pid, int):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        server._stop()  # type: ignore[union-attr]  # the one way the stdlib offers (its tests use it)
