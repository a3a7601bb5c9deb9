"""Imported last by concurrent mode's fork server (see :mod:`gapfill.engine.forkserver`):
says to the process that started it, on the socket its environment names, that its
preload is imported, so that the start-up sample measures the node without that import
taking a core from it."""

import contextlib
import os
import socket

_name = os.environ.pop("GAPFILL_FORKSERVER_READY", None)  # (its workers have no use for it)
if _name:
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as _s:
        _s.sendto(b"1", "\0" + _name)
