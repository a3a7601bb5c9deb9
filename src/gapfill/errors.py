"""One exception root for everything a user can hit.

::

    GapfillError                 message is one sentence that says what to do
    ├── FixFirst                 running again cannot pass until the user fixes something:
    │                            ``what`` happened, then ``fix`` (mixed into RpcKeyRefused,
    │                            StoreRefused and gapfill.discover.explorer's refusals)
    ├── ConfigError              bad flag, env var, config file or URL
    ├── InputError               bad address, hash, import file
    ├── UnknownContractError     --contract names nothing tracked
    ├── StoreError               database unreachable, missing, or failing
    │   ├── StoreRefused         it refuses the writes until fixed (also a FixFirst)
    │   ├── StoreDropped         a connection that worked was lost, or cannot be reopened
    │   ├── StoreBusy            it did not do it this time, for a reason that may pass
    │   └── StoreNoSlot          a first connection found no connection slot free
    └── RpcError                 node unreachable, wrong chain, method missing
        ├── RpcKeyRefused        the node refused the key (also a FixFirst)
        ├── NodeUnavailable      the start-up check failed for a reason that may pass
        └── (see gapfill.rpc.errors for the per-call classification)

Driver exceptions (psycopg, sqlite3, aiohttp) are translated into these at the
boundary with ``raise ... from exc``; the CLI prints ``str(exc)`` and exits 1.
"""

from __future__ import annotations


class GapfillError(Exception):
    """Root of gapfill's errors; ``str()`` is a message fit for the user."""

    exit_code = 1


class _WhatThenFix(GapfillError):
    """An error of two parts: ``what`` happened, then ``fix`` (what to do); ``str()`` is
    both, the fix last."""

    def __init__(self, what: str, fix: str) -> None:
        super().__init__(f"{what}: {fix}")
        self.what = what
        self.fix = fix

    def __reduce__(self) -> tuple[type[_WhatThenFix], tuple[str, str]]:
        # Pickled with its two parts (a process hands it on): the default passes str() alone.
        return type(self), (self.what, self.fix)


class FixFirst(_WhatThenFix):
    """An error the same command cannot get past until the user fixes something (an API key
    the node or the explorer refuses, a wrong explorer URL): ``what`` says what happened
    and ``fix`` what to do ("check the API key in --rpc-url"); ``str()`` is both, the fix
    last. A caller that words a longer sentence (what a scan kept before the error) keeps
    the fix last, before the rerun. Mixed into the error's own class (:class:`RpcKeyRefused`,
    the explorer's)."""


class ConfigError(GapfillError):
    """A flag, environment variable, config file or URL is wrong."""


class InputError(GapfillError):
    """User-supplied data (an address, a hash, an import file) is malformed."""


class UnknownContractError(GapfillError):
    """The contract is not tracked (or is ambiguous across chains)."""


class StoreError(GapfillError):
    """The database cannot be reached, does not exist, or failed."""


class StoreRefused(StoreError, FixFirst):
    """The database refused what the command must do, and does so until the user fixes it:
    the role lacks a privilege, the database takes no writes (a hot standby,
    ``default_transaction_read_only``, a read-only SQLite file or folder), or its disk is
    full; or a run met a :class:`StoreBusy` until its retries ran out. ``fix`` is what to do
    before running the command again."""


class StoreDropped(StoreError, _WhatThenFix):
    """A connection to the database that had worked was dropped (a server restart,
    ``pg_terminate_backend``), or opening it again failed: the URL was right, so the
    message does not send the user to fix it. ``what`` says what happened ("lost the
    connection to PostgreSQL at ..."), ``fix`` what to do; ``str()`` is both. A run that
    retries says ``what`` and that it retries (:func:`gapfill.engine.events.db_retrying`)."""


class StoreBusy(StoreError, _WhatThenFix):
    """The server did not do what was asked this time, for a reason that may pass: a
    ``lock_timeout`` met waiting for another session's lock (every worker's commit updates
    the run's row), a ``statement_timeout`` met (under contention too), or the server out
    of memory. Nothing of it was written. ``what`` says which, ``fix`` what to do if it
    keeps happening (the setting to raise, the memory to free); ``str()`` is both. A run retries
    it, saying ``what`` (:func:`gapfill.engine.events.db_retrying`), and ends with both
    once its retries run out (a worker ends with a :class:`StoreRefused` of them)."""


class StoreNoSlot(StoreError, _WhatThenFix):
    """A command's first connection found no connection slot free on the server (PostgreSQL's
    ``max_connections`` in use, or a role's or database's ``CONNECTION LIMIT`` reached):
    ``what`` says which limit, ``fix`` what to do (close other clients, fewer ``--workers``,
    or raise it); ``str()`` is both. A command ends with it; a run's worker process, whose
    coordinator had connected, waits a little for a slot (other clients may leave), then
    ends the run with it as a :class:`StoreRefused`."""


class RpcError(GapfillError):
    """A JSON-RPC endpoint cannot serve what gapfill needs."""


class RpcKeyRefused(RpcError, FixFirst):
    """The RPC node refused the request's credentials (HTTP 401, or a 403 that is neither a
    rate limit nor a refused method), or no endpoint serves a method a call needs: asking
    again cannot pass until the key (or the node) is fixed."""


class NodeUnavailable(RpcError):
    """No endpoint passed the start-up check, for a reason that may pass by trying again
    (HTTP 5xx, a timeout, a refused or reset connection): not a wrong chain id, a web
    page or a refused API key. A worker process whose check fails so, although its
    coordinator's passed, is restarted rather than ending the run."""


class Interrupted(GapfillError):
    """The user interrupted the run."""

    exit_code = 130
