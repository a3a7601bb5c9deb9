"""Which processes this one may judge alive or dead by their pid.

A lease owner and a run name the process behind them by host name and pid, and a run
that starts gives back the leases of its host's dead processes and marks their runs
``interrupted``. A host name does not say whose pids those are: a ``gapfill worker`` in a
container started with ``--network host`` has the host's name but a PID namespace of its
own, two VMs cloned from one image keep its name, ``docker run --hostname w`` twice gives
two containers one name. Each sees the other's pids as gone, and released the other's
live leases (its commits then failed the lease check) and marked its live run
``interrupted``.

So each process also records its *space*: the machine (a hash of ``/etc/machine-id``),
the boot (``/proc/sys/kernel/random/boot_id``) and the PID namespace
(``/proc/self/ns/pid``'s inode) it runs in. A pid is judged only where that is sound
(:func:`verdict`):

* same host name, same space: the pid is this process's to look up, as before;
* same host name, same machine, an earlier boot, both in the machine's initial PID
  namespace: the machine rebooted since, so every process of that boot is gone (a
  different boot id of this machine can only be an earlier one);
* a row or owner written by an older gapfill (no space): judged by host name, as that
  version did, so an upgrade strands nothing;
* anything else (another namespace of this boot, another machine with this name, a
  container's namespace of an earlier boot, or no space known here): not judged. Its
  leases are left to expire and its ``running`` row stays as it is (``gapfill runs``
  says it is not checked from here): a stale row is the lesser evil, next to marking a
  live run interrupted.

Machines are told apart by machine id: VMs cloned with one (which systemd requires to be
unique) each take the other's processes for an earlier boot's.

Where ``/proc`` lacks the boot id or the namespace (not Linux), :func:`here` is None and
this process writes and judges as older versions did, by host name.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket

from gapfill.records import record

#: The inode of the initial PID namespace (the kernel's ``PROC_PID_INIT_INO``): the same
#: on every Linux machine, so it names no machine; other namespaces are numbered as made.
INIT_PID_NS = 0xEFFFFFFC


@record
class Space:
    """Where a process's pid means something: ``machine.boot.pidns`` as text."""

    machine: str  #: 12 hex digits of a hash of the machine id; "" where there is none
    boot: str  #: 12 hex digits of the kernel's boot id
    pidns: int  #: inode of the PID namespace

    def __str__(self) -> str:
        return f"{self.machine or '-'}.{self.boot}.{self.pidns:x}"

    @classmethod
    def parse(cls, text: str | None) -> Space | None:
        """The space ``str`` wrote; None for none (an older gapfill's). Text that is not one
        (a later version's?) is a space no process has, judged by nobody."""
        if not text:
            return None
        parts = text.split(".")
        try:
            machine, boot, pidns = parts[0], parts[1], int(parts[2], 16)
        except (IndexError, ValueError):
            return cls("", text, 0)
        return cls("" if machine == "-" else machine, boot, pidns) if len(parts) == 3 else cls("", text, 0)


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii") as fh:
            return fh.read().strip()
    except (OSError, UnicodeDecodeError):
        return ""


@functools.cache
def here() -> Space | None:
    """This process's space, None where ``/proc`` does not tell it (read once per process:
    a fork server's children share it)."""
    boot = _read("/proc/sys/kernel/random/boot_id").replace("-", "")[:12]
    try:
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    if not boot:
        return None
    # The machine id is not to be shown as it is (machine-id(5)): a hash of it, for gapfill.
    raw = _read("/etc/machine-id") or _read("/var/lib/dbus/machine-id")
    machine = hashlib.sha256(f"gapfill:{raw}".encode()).hexdigest()[:12] if raw else ""
    return Space(machine, boot, pidns)


def host() -> str:
    """This process's host name, as runs and lease owners show it."""
    return socket.gethostname()


def owner_host() -> str:
    """The host part of this process's lease owner ids: ``host@space``, or ``host`` alone
    where no space is known (as older versions wrote, which read it the same)."""
    space = here()
    return host() if space is None else f"{host()}@{space}"


def split_owner_host(text: str) -> tuple[str, Space | None]:
    """``host`` and the space of an :func:`owner_host`; (text, None) for an older one's."""
    name, at, space = text.partition("@")
    return (name, Space.parse(space)) if at else (text, None)


def shown_owner(owner: str) -> str:
    """A lease owner id as users read it: ``host:pid/runN/wN``, without the space."""
    where, colon, rest = owner.partition(":")
    return f"{where.partition('@')[0]}{colon}{rest}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs in this PID namespace (a zombie does not: it was
    killed, and its parent has not reaped it yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):  # no /proc here: kill() is all there is to ask
        return True
    return state not in (b"Z", b"X")


def _how(name: str, space: Space | None) -> str:
    """How a process of host ``name`` in ``space`` is judged from here: ``pid`` (look it
    up), ``gone`` (an earlier boot of this machine) or ``unknown`` (see the module)."""
    if name != host():
        return "unknown"
    if space is None:
        return "pid"  # written by an older gapfill: judged by host name, as it judged it
    mine = here()
    if mine is None:
        return "unknown"
    if space == mine:
        return "pid"
    if (space.boot != mine.boot and space.machine and space.machine == mine.machine
            and space.pidns == mine.pidns == INIT_PID_NS):  # fmt: skip
        return "gone"  # this machine rebooted since: nothing of that boot runs
    return "unknown"


def judged_here(name: str, space: Space | None) -> bool:
    """Whether this process can tell if a process of host ``name`` in ``space`` runs."""
    return _how(name, space) != "unknown"


def verdict(name: str, space: Space | None, pid: int) -> bool | None:
    """Whether process ``pid`` of host ``name`` in ``space`` (None: written by an older
    gapfill) runs: True, False, or None where this process cannot tell (see the module)."""
    how = _how(name, space)
    return pid_alive(pid) if how == "pid" else False if how == "gone" else None
