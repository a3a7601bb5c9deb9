"""PostgreSQL backend (psycopg 3): many processes, many hosts.

Bulk writes go through ``COPY`` into a session-local staging table and one
``INSERT ... SELECT ... ON CONFLICT`` per table, inside the caller's
transaction. Leases are claimed with ``FOR UPDATE SKIP LOCKED`` and measured
against the database's clock, so workers on hosts with skewed clocks agree.
"""

from __future__ import annotations

import getpass
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from operator import itemgetter
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson
import psycopg
from psycopg.conninfo import conninfo_to_dict

from gapfill.errors import StoreBusy, StoreDropped, StoreError, StoreNoSlot, StoreRefused
from gapfill.importing import lazy_pattern
from gapfill.model import LogRow, Ref, RefKey, TxRow
from gapfill.redact import DbUrl, redact_db_url, redact_text
from gapfill.signals import committing
from gapfill.store.base import (
    DB_CHECK,
    FIRST_GIVEN,
    JSON_COLUMNS,
    KEY_SQL,
    LOG_COLUMNS,
    NOT_STORED,
    TX_COLUMNS,
    Store,
    check_row_tuples,
    failed_refs_sql,
    gap_where,
    migrated,
    migrations,
    status_sql,
)
from gapfill.store.pg_wait import MIGRATION_LOCK, PLAN_LOCK, REMOVAL_LOCK, LockWatch, application_name

_UPDATE_TX = ", ".join(f"{c} = EXCLUDED.{c}" for c in TX_COLUMNS[2:])
_UPDATE_LOG = ", ".join(f"{c} = EXCLUDED.{c}" for c in LOG_COLUMNS[3:])
_TX_COLS = ", ".join(TX_COLUMNS)
_LOG_COLS = ", ".join(LOG_COLUMNS)
_STAGE = """
CREATE TEMP TABLE IF NOT EXISTS stage_tx
    (LIKE transactions INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_logs (LIKE logs) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_refs (LIKE refs, seq BIGINT) ON COMMIT DELETE ROWS;
"""
#: TCP settings against a server that vanished without closing the connection (a host
#: crash, a dropped NAT entry): without them a store call waits on the kernel's
#: retransmission timeout (~15 min), holding its worker's database lock all along. With
#: them it fails within about a minute and the store reconnects. A URL's own values win,
#: and so does a service file the URL names (``?service=``).
TCP_DEFAULTS = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
                "keepalives_count": 3, "tcp_user_timeout": 60_000}  # fmt: skip
#: The same on the server's side of the connection, set per session. A worker whose host
#: vanished mid-transaction leaves its backend waiting for the next command, holding the
#: transaction's row locks (a batch's lease row, say), until the server's own keepalive
#: gives up: the kernel's default is 2 hours, during which a retried commit of that batch
#: blocks on those locks. With these the backend ends, and its locks go, within about a
#: minute. The URL's ``options`` (``-c tcp_keepalives_idle=...``) or a service file win.
SERVER_TCP_DEFAULTS = {"tcp_keepalives_idle": 30, "tcp_keepalives_interval": 10,
                       "tcp_keepalives_count": 3, "tcp_user_timeout": 60_000}  # fmt: skip
#: A permanent failure record's refs, looked up by hash (``refs_tx_hash``) in a subquery the
#: contract's test stays out of (``OFFSET 0``). With it inside, PostgreSQL without statistics
#: (after an import) looked each record's ref up in ``refs_key``, by chain and contract alone:
#: every ref of the contract read per record (200,000 refs, 70 records: 600 ms instead of 3).
_REFS_OF_RECORD = (
    "LATERAL (SELECT x.chain_id, x.contract, x.tx_hash, x.block_number, x.source FROM refs x "
    "WHERE x.chain_id = f.chain_id AND x.tx_hash = f.tx_hash OFFSET 0) r"
)
#: An import's staged refs give their block numbers (``{block}``: see ``Store.add_refs``) to
#: refs of one contract that have none. The refs an import has just inserted have no
#: statistics yet: filtered by contract, they looked like one row to the planner, which then
#: rescanned the staged refs for each ref (quadratic: 40,000 hashes took 48 s, a million
#: would take hours). So the contract is named inside a subquery the planner cannot pull up
#: (``OFFSET 0``) and does not carry over to refs, and the staged refs are analyzed first:
#: the planner knows how many there are, and hashes the join or looks refs up one by one as
#: their numbers say.
_FILL_FROM_STAGE = (
    "UPDATE refs r SET block_number = x.block_number FROM (SELECT DISTINCT ON (s.tx_hash) s.chain_id, "
    "s.contract, s.tx_hash, {block} AS block_number FROM stage_refs s "
    f"WHERE s.chain_id = ? AND s.contract = ? ORDER BY s.tx_hash, {FIRST_GIVEN} OFFSET 0) x "
    "WHERE r.chain_id = x.chain_id AND r.contract = x.contract AND r.tx_hash = x.tx_hash "
    "AND r.block_number IS NULL AND x.block_number IS NOT NULL"
)
#: The staged refs, each from its first row that gives a block number, else its first.
_INSERT_STAGED = (
    "INSERT INTO refs (chain_id, contract, tx_hash, block_number, source) "
    "SELECT DISTINCT ON (s.chain_id, s.contract, s.tx_hash) s.chain_id, s.contract, "
    "s.tx_hash, {block}, s.source FROM stage_refs s "
    f"ORDER BY s.chain_id, s.contract, s.tx_hash, {FIRST_GIVEN} "
    "ON CONFLICT (chain_id, contract, tx_hash) DO NOTHING"
)


# Hashes (an array) looked up one by one, each a scalar subquery (one probe of the primary
# key), which PostgreSQL cannot make a join. As ``tx_hash = ANY(%s)`` the planner, with
# statistics missing or stale, read every row of the chain and checked each against the
# array: a commit's clearing of failure records grew with the chain's records (100,000 of
# them: 21 ms instead of 1 for each commit), a lookup of stored blocks with the chain's
# transactions (130,000: 56 ms instead of 2).
#: Each hash with its stored transaction's block, NULL where none is stored.
_STORED_BLOCKS = (
    "SELECT h, (SELECT x.block_number FROM transactions x WHERE x.chain_id = %s AND x.tx_hash = h) "
    "FROM unnest(%s::text[]) AS h"
)
#: Those of some hashes that have a failure record: a commit asks it for every transaction it
#: writes, and usually none has one (so none comes back).
_WITH_FAILURE = (
    "SELECT h FROM unnest(%s::text[]) AS h "
    "WHERE (SELECT 1 FROM failures x WHERE x.chain_id = %s AND x.tx_hash = h) IS NOT NULL"
)


#: A row if the transactions table has rows but no statistics (never analyzed, or analyzed
#: while empty): see ``PostgresStore._fresh_stats``.
_NEVER_ANALYZED = (
    "SELECT 1 FROM pg_class c WHERE c.oid = 'transactions'::regclass AND c.reltuples <= 0 "
    "AND EXISTS (SELECT 1 FROM transactions)"
)


#: Settings of every session besides the TCP ones, unless the URL's ``options`` or PGOPTIONS
#: name them. JIT off: gapfill's large reads (status, the dry run's and the planner's counts
#: at a million refs) paid more for compiling than they won by it; on 1M refs (bench/
#: read_scale.py) `status` took 1.51 s with it and 1.36 s without, `enrich --dry-run` 4.92
#: and 4.60 (best of 5 each).
SESSION_DEFAULTS = {"jit": "off"}


#: The logs a transaction stored again no longer has: of another block, where it was
#: before a reorg (its row now says the new one, and log_count the new logs).
_DELETE_STALE_LOGS = """
DELETE FROM logs l USING stage_tx s
WHERE l.chain_id = s.chain_id AND l.tx_hash = s.tx_hash AND NOT EXISTS
    (SELECT 1 FROM stage_logs g
     WHERE g.chain_id = l.chain_id AND g.tx_hash = l.tx_hash AND g.log_index = l.log_index)
"""


def _session_settings(given: dict[str, Any]) -> dict[str, str]:
    """The settings to set on a new session: the server-side TCP ones unless the URL's
    ``options`` name them, a service file decides, or the URL turned keepalives off; and
    :data:`SESSION_DEFAULTS` unless the URL's ``options`` or PGOPTIONS name them."""
    options = str(given.get("options", ""))
    out = {k: v for k, v in SESSION_DEFAULTS.items()
           if k not in options and k not in os.environ.get("PGOPTIONS", "")}  # fmt: skip
    if "service" in given or str(given.get("keepalives", "1")) == "0":
        return out
    return {**{k: str(v) for k, v in SERVER_TCP_DEFAULTS.items() if k not in options}, **out}


#: orjson writes a NUL as ``\u0000`` and a backslash as ``\\``: ``\u0000`` is a NUL only after
#: an even number of backslashes (``\\u0000`` is a literal backslash then "u0000").
_JSON_NUL = lazy_pattern(r"(?<!\\)((?:\\\\)*)\\u0000")


def _jsonb(value: Any) -> str | None:
    """JSON text PostgreSQL accepts: JSONB refuses NUL characters, which decoded strings may
    hold; each becomes U+FFFD (the replacement character)."""
    if value is None:
        return None
    text = orjson.dumps(value).decode()
    if "\\u0000" not in text:
        return text
    return _JSON_NUL.sub(r"\1\\ufffd", text)


class _JsonbDumper(psycopg.adapt.Dumper):
    """JSON text (see :func:`_jsonb`) as a binary ``jsonb`` value of a ``COPY``: the format's
    version (1), then the text. Registered for the type only (``COPY`` after ``set_types``),
    not for ``str``."""

    format = psycopg.pq.Format.BINARY
    oid = psycopg.adapters.types["jsonb"].oid

    def dump(self, obj: str) -> bytes:
        return b"\x01" + obj.encode()


class _Committing:
    """A write transaction (``conn.transaction()``) whose commit, not its rollback, runs in
    ``committing``: psycopg answers a ``KeyboardInterrupt`` during a ``COMMIT`` by cancelling it
    on the server, which may have committed (a cancel stops work the commit does, such as
    deferred triggers, not its flush), so a Ctrl+C there left the outcome unknown. Held, the
    first one waits for the commit's end."""

    def __init__(self, tx: AbstractContextManager[psycopg.Transaction]) -> None:
        self._tx = tx

    def __enter__(self) -> psycopg.Transaction:
        return self._tx.__enter__()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool | None:  # fmt: skip
        if kind is not None:
            return self._tx.__exit__(kind, exc, tb)
        with committing():
            return self._tx.__exit__(None, None, None)


def _tx_tuple(t: TxRow) -> tuple[Any, ...]:
    """A row in TX_COLUMNS order, JSON columns as text (COPY turns ints into NUMERIC itself).
    :func:`_jsonb` is called only for a value: most JSON columns of a row are NULL, and a
    call per column cost more than its test (as :func:`gapfill.store.sqlite._tx_tuple`)."""
    access_list, blob_hashes, authorizations, method_args = (
        t.access_list, t.blob_versioned_hashes, t.authorization_list, t.method_args)  # fmt: skip
    return (
        t.chain_id, t.tx_hash, t.block_number, t.block_hash, t.tx_index, t.block_timestamp,
        t.from_address, t.to_address, t.value, t.input, t.nonce, t.gas, t.gas_price,
        t.max_fee_per_gas, t.max_priority_fee_per_gas, t.tx_type, t.status, t.root, t.gas_used,
        t.cumulative_gas_used, t.effective_gas_price, t.created_contract,
        None if access_list is None else _jsonb(access_list), t.max_fee_per_blob_gas,
        None if blob_hashes is None else _jsonb(blob_hashes), t.blob_gas_used, t.blob_gas_price,
        None if authorizations is None else _jsonb(authorizations), t.method_id, t.method_name,
        None if method_args is None else _jsonb(method_args), t.log_count,
    )  # fmt: skip


def _log_tuple(g: LogRow) -> tuple[Any, ...]:
    args = g.event_args
    return (g.chain_id, g.tx_hash, g.log_index, g.block_number, g.address, g.topic0, g.topic1,
            g.topic2, g.topic3, g.data, g.event_name, None if args is None else _jsonb(args))  # fmt: skip


check_row_tuples(_tx_tuple, _log_tuple, big=(), json=JSON_COLUMNS)

#: The type of each column of ``transactions`` and ``logs`` that a commit writes (psycopg's
#: names, which are pg_type's): rows are copied in binary, and binary needs the exact type.
COPY_TYPES = {
    "chain_id": "int8", "tx_hash": "text", "block_number": "int8", "block_hash": "text",
    "tx_index": "int4", "block_timestamp": "int8", "from_address": "text", "to_address": "text",
    "value": "numeric", "input": "text", "nonce": "numeric", "gas": "numeric",
    "gas_price": "numeric", "max_fee_per_gas": "numeric", "max_priority_fee_per_gas": "numeric",
    "tx_type": "int4", "status": "int2", "root": "text", "gas_used": "numeric",
    "cumulative_gas_used": "numeric", "effective_gas_price": "numeric",
    "created_contract": "text", "access_list": "jsonb", "max_fee_per_blob_gas": "numeric",
    "blob_versioned_hashes": "jsonb", "blob_gas_used": "numeric", "blob_gas_price": "numeric",
    "authorization_list": "jsonb", "method_id": "text", "method_name": "text",
    "method_args": "jsonb", "log_count": "int4",
    "log_index": "int4", "address": "text", "topic0": "text", "topic1": "text",
    "topic2": "text", "topic3": "text", "data": "text", "event_name": "text", "event_args": "jsonb",
}  # fmt: skip
_TX_TYPES = [COPY_TYPES[c] for c in TX_COLUMNS]
_LOG_TYPES = [COPY_TYPES[c] for c in LOG_COLUMNS]


def _copy(cur: Any, table: str, columns: str, types: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> None:
    """``COPY table (columns) FROM STDIN`` of ``rows`` (nothing when there are none), whose
    columns are of ``types``. In binary: the server reads numerics and integers as they
    are instead of parsing their decimal text (bench/hotpath.py, dense chain: -15% of the
    server's CPU per stored transaction, and -19% of this process's)."""
    if rows:
        with cur.copy(f"COPY {table} ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(types)
            for row in rows:
                copy.write_row(row)


#: libpq's refusals of a URL's ``?key=value`` part: an unknown key, a key without a value,
#: or a value it cannot read (``sslmode=bogus``). The server was never asked.
_BAD_QUERY = lazy_pattern(
    r'URI query parameter|invalid connection option|invalid \w+ value: "|for connection option "',
    re.IGNORECASE,
)


# Connection errors the server (or libpq) raises when it is there: a fix in --db, not in
# whether the server runs. libpq gives them no SQLSTATE; the text is its own.
_NO_ROLE = lazy_pattern(r'\brole "((?:[^"]|"")*)" does not exist')
_NO_SSL = lazy_pattern(r"server does not support SSL, but SSL was required", re.IGNORECASE)


#: libpq's refusal of an ``options=`` value with a bare '=' (``-c name=value`` as typed).
_OPTIONS_EQUALS = lazy_pattern(r'separator "=" in URI query parameter: "options"')
#: The server's refusals of the settings a connection's ``options`` (``?options=`` in the URL,
#: or PGOPTIONS) pass it at start-up: it runs, and the options are what to fix.
_BAD_OPTIONS = lazy_pattern(
    r"FATAL:\s+(invalid command-line argument for server process|(?:-c \S+|--\S+) requires a value"
    r"|unrecognized configuration parameter|invalid value for parameter"
    r'|parameter "[^"]*" (?:cannot be changed|requires)|.* is outside the valid range for parameter'
    r"|permission denied to set parameter)"
)


def _options_refused(msg: str, url: str, where: str, check: str) -> StoreError | None:
    """The server refused the start-up options: the sentence names where they were set."""
    m = _BAD_OPTIONS.search(msg)
    if m is None:
        return None
    try:
        given = conninfo_to_dict(url).get("options")
    except psycopg.Error:
        given = None
    env = os.environ.get("PGOPTIONS")
    if not given and not env:
        return None
    said = msg[m.start(1) :]
    if given:
        return StoreError(f"PostgreSQL at {where} refused the options= of the URL ({said}): fix them in "
                          f"{check}, each setting written as -c%20name%3Dvalue, or remove them")  # fmt: skip
    return StoreError(f"PostgreSQL at {where} refused PGOPTIONS in the environment ({said}): fix it, "
                      "each setting written as -c name=value, or unset it")  # fmt: skip


def _given(url: str, name: str) -> str | None:
    """The connection parameter ``name`` as the URL sets it, else as libpq's variable does."""
    try:
        given = conninfo_to_dict(url).get(name)
    except psycopg.Error:
        given = None
    return str(given) if given else None


def _sslmode_source(url: str, check: str) -> str:
    """Where the ``sslmode`` that demanded SSL was set, for a message."""
    given = _given(url, "sslmode")
    if given:
        return f"sslmode={given} in {check}"
    env = os.environ.get("PGSSLMODE")
    return f"PGSSLMODE={env} in the environment" if env else "the connection's sslmode"


def _system_roots(url: str, check: str) -> str | None:
    """Where ``sslrootcert=system`` was set, when it was (it makes libpq check the server's
    certificate and name against the system's CAs, and verify-full the default sslmode)."""
    if _given(url, "sslrootcert") == "system":
        return f"sslrootcert=system in {check}"
    return "PGSSLROOTCERT=system in the environment" if os.environ.get("PGSSLROOTCERT") == "system" else None


#: libpq's refusal of an sslmode weaker than another setting needs (sslrootcert=system,
#: sslnegotiation=direct), before it connects.
_WEAK_SSLMODE = lazy_pattern(r'weak sslmode "([^"]*)" may not be used with (\S+?)=?(\w+)? \(use ([^)]*)\)')
#: A ``service=`` (or PGSERVICE) that no service file defines.
_NO_SERVICE = lazy_pattern(r'definition of service "([^"]*)" not found')
#: libpq's refusals of one parameter: one it does not know, or a value it cannot read.
_UNKNOWN_PARAM = lazy_pattern(r'invalid (?:URI query parameter|connection option): "([^"]*)"')
_BAD_VALUE = lazy_pattern(r'invalid (\w+) value: "([^"]*)"')


_NO_ROOT_CERT = lazy_pattern(r'root certificate file "([^"]*)" does not exist|could not read root '
                             r'certificate file "([^"]*)"|could not get home directory to locate root '
                             r"certificate")
_CERT_REFUSED = lazy_pattern(r"certificate verify failed")
_CERT_NAME = lazy_pattern(r'server certificate for "([^"]*)"(?: \(and \d+ other names?\))? does not match '
                          r'host name "([^"]*)"')
_CERT_OTHER = lazy_pattern(r"certificate|sslrootcert|private key", re.IGNORECASE)
def _ssl_fix(check: str, system: bool = False) -> str:
    if system:  # sslmode=require is refused beside sslrootcert=system
        return (f"point sslrootcert in {check} at the server's CA certificate instead of system, "
                "or remove sslrootcert=system and use sslmode=require to encrypt without checking "
                "it")  # fmt: skip
    return (f"point sslrootcert in {check} at the server's CA certificate, or use "
            "sslmode=require to encrypt without checking it")  # fmt: skip


def _root_cert(url: str, check: str, path: str = "") -> str:
    """The root certificates libpq checks the server's against (``path``: the file libpq
    named), and where they were set, as a message names them."""
    try:
        given = conninfo_to_dict(url).get("sslrootcert")
    except psycopg.Error:
        given = None
    source = f"sslrootcert in {check}" if given else "PGSSLROOTCERT in the environment"
    given = given or os.environ.get("PGSSLROOTCERT")
    if given == "system":
        return "the system's trusted roots (sslrootcert=system)"
    if not given:
        source = "libpq's default, as no sslrootcert is set"
    return f'the root certificate file "{path or given or "~/.postgresql/root.crt"}" ({source})'


def _certificate_problem(msg: str, url: str, where: str, check: str) -> StoreError | None:
    """A server certificate libpq could not check, or would not accept, as the one sentence
    naming it (the server answered: whether it runs is not the question)."""
    said = msg.rpartition(" failed: ")[2] or msg
    m = _NO_ROOT_CERT.search(msg)
    if m:
        return StoreError(
            f"cannot check the certificate of PostgreSQL at {where}: "
            f"{_root_cert(url, check, m.group(1) or m.group(2) or '')} cannot be read ({said}); "
            f"{_ssl_fix(check)}"
        )
    if _CERT_REFUSED.search(msg):
        return StoreError(
            f"PostgreSQL at {where} presented a certificate that no CA in {_root_cert(url, check)} "
            f"signed ({said}); {_ssl_fix(check, _system_roots(url, check) is not None)}"
        )
    m = _CERT_NAME.search(msg)
    if m:
        return StoreError(
            f'PostgreSQL at {where} presented a certificate for "{m.group(1)}", not for the host '
            f'name "{m.group(2)}" that sslmode=verify-full checks: connect to the name in its '
            "certificate, or use sslmode=verify-ca to check the certificate but not its name"
        )
    if _CERT_OTHER.search(msg):
        return StoreError(
            f"PostgreSQL at {where} and the SSL settings in {check} do not agree "
            f"({said}): check sslmode, sslrootcert, sslcert and sslkey"
        )
    return None


def server_and_db(url: str) -> tuple[str, str]:
    """Where libpq connects for ``url`` and to which database, for messages.

    As libpq reads them: the URL's ``?host=`` / ``?port=`` / ``?dbname=`` before its other
    parts, then ``PGHOST`` and the like; no host means the local Unix socket, and no
    database the user's name.
    """
    try:
        info = conninfo_to_dict(url)
    except psycopg.Error:
        parts = urlsplit(url)
        info = {"host": parts.hostname, "port": parts.port, "dbname": parts.path.lstrip("/")}
    env = os.environ
    host = str(info.get("host") or env.get("PGHOST") or "")
    port = str(info.get("port") or env.get("PGPORT") or 5432)
    if not host or host.startswith("/"):
        where = f"the local socket ({host or 'default directory'}, port {port})"
    else:
        where = f"{host}:{port}"
    return where, str(info.get("dbname") or env.get("PGDATABASE") or role_name(url))


def role_name(url: str) -> str:
    """The role libpq logs in as for ``url``."""
    try:
        user = conninfo_to_dict(url).get("user")
    except psycopg.Error:
        user = urlsplit(url).username
    return str(user or os.environ.get("PGUSER") or getpass.getuser())


_DENIED = lazy_pattern(r"permission denied for (\w+) (\S+)")


def _privilege_error(msg: str, url: str, reading: bool, check: str) -> StoreRefused:
    """A refused privilege, as the one sentence saying which one the role lacks."""
    role = f'PostgreSQL role "{role_name(url)}"'
    where = f'database "{server_and_db(url)[1]}"'
    m = _DENIED.search(msg)
    kind, name = m.groups() if m else ("", "")
    if kind == "schema":
        return StoreRefused(
            f"{role} may not create gapfill's tables in schema {name} of {where} ({msg})",
            "grant it CREATE on that schema, or run `gapfill init` once as a role that may",
        )
    if kind == "sequence":
        return StoreRefused(f"{role} lacks USAGE on sequence {name} of {where} ({msg})",
                            f"grant it, or use a role that may write, in {check}")  # fmt: skip
    if kind == "table" and not reading:
        return StoreRefused(
            f"{role} may not write to table {name} of {where} ({msg})",
            f"grant it INSERT, UPDATE and DELETE on gapfill's tables, or use a role that may write, "
            f"in {check}",
        )
    if kind == "table":
        return StoreRefused(f"{role} lacks SELECT on table {name} of {where} ({msg})",
                            "grant it SELECT on gapfill's tables")  # fmt: skip
    return StoreRefused(f"{role} lacks a privilege on {where} ({msg})",
                        f"grant it, or use another role in {check}")  # fmt: skip


def _refused_by_server(exc: psycopg.Error, msg: str, url: str, check: str) -> StoreRefused | None:
    """A statement the server refuses until someone changes it: a database that takes no
    writes, a full disk (SQLite's equivalents say what to do too)."""
    where, dbname = server_and_db(url)
    if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
        return StoreRefused(
            f'PostgreSQL database "{dbname}" on {where} takes no writes ({msg})',
            f"point {check} at the primary server (a hot standby is read-only) or another writable "
            "database, or turn default_transaction_read_only off for it",
        )
    if isinstance(exc, psycopg.errors.DiskFull):
        return StoreRefused(f'PostgreSQL at {where} has no disk space left for database "{dbname}" ({msg})',
                            "free space on the database server")  # fmt: skip
    return None


def _timed_out(exc: psycopg.Error, msg: str, url: str, check: str) -> StoreBusy | None:
    """A statement the server cancelled at the ``statement_timeout`` or ``lock_timeout`` of
    gapfill's session. Waiting for another session's commit is normal (every worker's commit
    updates the run's row; contracts share transaction rows), so it may pass: a run retries
    it, and ends with what to raise only if it keeps meeting it."""
    where = server_and_db(url)[0]
    if isinstance(exc, psycopg.errors.QueryCanceled) and "statement timeout" in msg.lower():
        role = role_name(url)
        return StoreBusy(
            f"PostgreSQL at {where} cancelled a statement of gapfill's at its statement_timeout ({msg})",
            f'raise or unset statement_timeout for role "{role}" (ALTER ROLE "{role}" SET '
            f"statement_timeout = 0), or in {check} if its options set it",
        )
    if isinstance(exc, psycopg.errors.LockNotAvailable) and "lock timeout" in msg.lower():
        role = role_name(url)
        return StoreBusy(
            f"PostgreSQL at {where} cancelled a statement of gapfill's that waited for a lock longer "
            f"than its lock_timeout ({msg})",
            f'raise or unset lock_timeout for role "{role}" (ALTER ROLE "{role}" SET lock_timeout = 0), '
            f"or in {check} if its options set it",
        )
    return None


#: The server's refusals of a new session for want of a slot (SQLSTATE 53300, which libpq
#: passes on without its code at connect time, as it does a server that is not there): all of
#: its ``max_connections`` in use (or all but those it keeps for superusers), or the role's or
#: the database's ``CONNECTION LIMIT`` reached.
_NO_SLOT = lazy_pattern(r'sorry, too many clients already|remaining connection slots are reserved'
                      r'|too many connections for (role|database) "((?:[^"]|"")*)"')
_FEWER = "close other clients, or run gapfill with fewer --workers (each worker holds a connection)"


def _no_slot_left(exc: psycopg.Error, msg: str, where: str,
                  connection: Literal["first", "open", "again"]) -> StoreError | None:  # fmt: skip
    """A new session the server refused for want of a connection slot, as the sentence naming
    the limit and what to do. Other clients may leave, so a run that had connected retries
    it as it retries a server that is not answering (:class:`StoreDropped`); a command's
    first connection ends the command with it."""
    m = _NO_SLOT.search(msg)
    if m is None and not isinstance(exc, psycopg.errors.TooManyConnections):
        return None
    kind, name = (m.group(1), m.group(2).replace('""', '"')) if m and m.group(1) else ("", "")
    if kind == "role":
        what = (f'PostgreSQL role "{name}" has as many sessions on {where} as its CONNECTION LIMIT '
                f"allows ({msg})")  # fmt: skip
        fix = f'{_FEWER}, or raise the limit (ALTER ROLE "{name}" CONNECTION LIMIT -1 lifts it)'
    elif kind == "database":
        what = (f'PostgreSQL database "{name}" on {where} has as many sessions as its CONNECTION LIMIT '
                f"allows ({msg})")  # fmt: skip
        fix = f'{_FEWER}, or raise the limit (ALTER DATABASE "{name}" CONNECTION LIMIT -1 lifts it)'
    else:
        what = f"PostgreSQL at {where} has no connection slot left: its max_connections are in use ({msg})"
        fix = f"{_FEWER}, or raise max_connections on the server (it takes a restart)"
    if connection == "first":
        return StoreNoSlot(what, fix)
    return StoreDropped(what, f"{fix}, then run the command again")


#: A server out of memory as a session starts: libpq passes it on without its SQLSTATE.
_NO_MEMORY = lazy_pattern(r"FATAL:\s+out of memory")


def translate(exc: psycopg.Error, url: str, *, reading: bool = False, check: str = DB_CHECK,
              connection: Literal["first", "open", "again"] = "first") -> StoreError:  # fmt: skip
    """Turn a driver error into one sentence that says what to do (``reading``: it came from
    a read-only transaction; ``check``: where ``url`` came from, as the sentence names it;
    ``connection``: the error came while opening the first connection, on one that was
    ``open``, or opening one ``again`` after the first had worked, when a lost server is
    no reason to doubt the URL)."""
    where, dbname = server_and_db(url)
    msg = redact_text(str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc), DbUrl(url))
    low = msg.lower()
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return _privilege_error(msg, url, reading, check)
    no_slot = _no_slot_left(exc, msg, where, connection)
    if no_slot is not None:
        return no_slot
    if isinstance(exc, psycopg.errors.OutOfMemory) or _NO_MEMORY.search(msg):
        # It may pass (another session's query freed its memory): a run retries it, saying
        # what it met (db_retrying), not the rerun a command ends with.
        return StoreBusy(
            f"PostgreSQL at {where} ran out of memory ({msg})",
            "nothing of what failed was written; free memory on the database server (or run "
            "gapfill with fewer --workers, or lower work_mem for its role), then run the command again",
        )
    role = _NO_ROLE.search(msg)
    if role:
        name = role.group(1).replace('""', '"')
        return StoreError(
            f'PostgreSQL at {where} has no role "{name}": fix the user name in {check}, '
            f"or create that role (createuser {name})"
        )
    options = _options_refused(msg, url, where, check)
    if options is not None:
        return options
    service = _NO_SERVICE.search(msg)
    if service:
        source = f"service= in {check}" if _given(url, "service") else "PGSERVICE in the environment"
        return StoreError(
            f'no service file defines the service "{service.group(1)}" that {source} names: add it to '
            "~/.pg_service.conf (or the file PGSERVICEFILE names), or remove it"
        )
    weak = _WEAK_SSLMODE.search(msg)
    if weak:
        mode, needs = weak.group(1), weak.group(2) + (f"={weak.group(3)}" if weak.group(3) else "")
        if needs == "sslrootcert=system":
            source = _system_roots(url, check) or needs
            why = ", which checks the server's certificate and name"
        else:
            source, why = (f"{needs} in {check}" if _given(url, weak.group(2)) else needs), ""
        return StoreError(
            f"sslmode={mode} is too weak for {source}{why}: set sslmode to "
            f"{weak.group(4).replace(chr(34), '')}, or remove {needs}"
        )
    if _NO_SSL.search(msg):
        system = _system_roots(url, check)
        if system and not (_given(url, "sslmode") or os.environ.get("PGSSLMODE")):
            demands, fix = f"{system} demands (it makes verify-full the default sslmode)", "remove it"
        elif system:  # sslmode=prefer is refused beside it
            demands = f"{_sslmode_source(url, check)} demands"
            fix = "remove sslrootcert=system and set sslmode to prefer (or disable)"
        else:
            demands, fix = f"{_sslmode_source(url, check)} demands", "set it to prefer (or disable)"
        return StoreError(f"PostgreSQL at {where} does not accept SSL, which {demands}: {fix}, or enable "
                          "SSL on the server")  # fmt: skip
    certificate = _certificate_problem(msg, url, where, check)
    if certificate is not None:
        return certificate
    if "does not exist" in low and "database" in low:
        return StoreError(
            f'PostgreSQL database "{dbname}" does not exist on {where}: '
            f"create it (createdb {dbname}) or fix {check}"
        )
    if "password authentication failed" in low or "authentication" in low:
        return StoreError(
            f"PostgreSQL at {where} refused the credentials in {redact_db_url(url)}: fix {check}"
        )
    if _BAD_QUERY.search(msg) and _OPTIONS_EQUALS.search(msg):
        return StoreError(
            f"PostgreSQL cannot use the URL {redact_db_url(url)} ({msg}): in the options= of {check}, "
            "write each '=' as %3D and each space as %20 (-c%20name%3Dvalue)"
        )
    if _BAD_QUERY.search(msg):
        unknown, bad = _UNKNOWN_PARAM.search(msg), _BAD_VALUE.search(msg)
        if unknown:
            return StoreError(
                f'libpq has no connection parameter "{unknown.group(1)}" (in {check}): remove it, or '
                "correct its name (such as sslmode, connect_timeout, application_name)"
            )
        if bad:
            return StoreError(
                f'libpq cannot take "{bad.group(2)}" for {bad.group(1)} (in {check}): correct it, or '
                "remove it to use the default"
            )
        return StoreError(
            f"PostgreSQL cannot use the URL {redact_db_url(url)} ({msg}): check the query parameters "
            f"of {check} (only libpq connection parameters, such as sslmode=require, "
            "are allowed)"
        )
    if isinstance(exc, psycopg.errors.DeadlockDetected | psycopg.errors.SerializationFailure):
        # OperationalErrors too, but the server is there: a concurrent transaction won. It
        # passes: a run retries it, saying what it met (db_retrying), not the command's rerun.
        return StoreBusy(
            f"PostgreSQL at {where} rolled the change back because a concurrent one conflicted "
            f"with it ({msg})",
            "nothing of it was written; run the command again",
        )
    if isinstance(exc, psycopg.OperationalError) and _connection_lost(exc):
        if connection == "first":
            return StoreError(
                f"could not connect to PostgreSQL at {where} ({msg}): "
                f"check that the server runs and fix {check}"
            )
        what = (f"lost the connection to PostgreSQL at {where} ({msg})" if connection == "open"
                else f"PostgreSQL at {where} is not answering now ({msg})")  # fmt: skip
        return StoreDropped(what, "check that the server runs, then run the command again")
    said = _refused_by_server(exc, msg, url, check) or _timed_out(exc, msg, url, check)
    if said is not None:
        return said
    return StoreError(f"PostgreSQL error on {redact_db_url(url)}: {msg}")


def _connection_lost(exc: psycopg.Error) -> bool:
    """Whether the error is about reaching the server (no answer, refused, dropped, shut
    down), not one the server raised for a statement (a timeout, a full disk, a conflict)."""
    state = exc.sqlstate
    return state is None or state.startswith(("08", "57P"))


class PostgresStore(Store):
    backend = "postgres"
    _LEASE_LOCK = " FOR UPDATE SKIP LOCKED"
    _SHARE_LOCK = " FOR SHARE"
    _COVERAGE_LOCK = " FOR NO KEY UPDATE"
    _ROW_LOCK = " FOR UPDATE"
    _HAS_SCHEMA_TABLE = "SELECT (to_regclass('schema_migrations') IS NOT NULL)::int"
    #: The gap's test as PostgreSQL runs it: each ref looked up in ``transactions`` and
    #: ``failures`` by their primary keys. ``OFFSET 0`` keeps the planner from turning the
    #: ``NOT EXISTS`` into a join, which it chose by statistics that are wrong in the middle of
    #: a run: with ``refs`` analyzed (autovacuum does, a minute after a large import) and
    #: ``transactions`` not yet, a batch's gap query hashed every stored transaction, so each
    #: batch read all the others' rows (80,000 transactions: 258 s instead of 14), and with
    #: neither analyzed, it checked each ref against every failure record (1M refs, 3,000
    #: records: 72 s to count a gap).
    _GAP_WHERE = gap_where(" OFFSET 0")
    #: Each block joined laterally, fenced (``OFFSET 0``): with ``= ANY(array)``, or the
    #: lateral join unfenced, and no statistics (a table never analyzed) PostgreSQL sought
    #: the contract in the key index and filtered every ref of it by block, per batch leased.
    _IN_BLOCKS = ("SELECT r.tx_hash, r.block_number, r.source FROM unnest(CAST(? AS BIGINT[])) AS k(b) "
                  "CROSS JOIN LATERAL (SELECT r.tx_hash, r.block_number, r.source FROM refs r "
                  "WHERE {gap} AND " + KEY_SQL + " = k.b OFFSET 0) r")  # fmt: skip
    _BLOCKS_AS_ARRAY = True
    _FENCE = " OFFSET 0"
    _NOT_STORED = NOT_STORED.format(probe=" OFFSET 0")
    #: The refs of permanent failure records (see :data:`_REFS_OF_RECORD`), and how many per
    #: contract (``status``).
    _FAILED_REFS = failed_refs_sql(_REFS_OF_RECORD, " OFFSET 0")
    _STATUS = status_sql(failed_refs_sql(_REFS_OF_RECORD, " OFFSET 0", counts=True))

    def __init__(self, url: str, *, connect_timeout_s: float = 10.0, check: str = DB_CHECK,
                 app: str = "") -> None:  # fmt: skip
        """``app``: the command, as the session's ``application_name`` (``gapfill <app> (pid
        N)``) names it to another session waiting for its locks."""
        self.url = url
        self.check = check
        self.display_url = redact_db_url(url)
        self._connect_timeout_s = connect_timeout_s
        self._app = application_name(app)
        self._conn: psycopg.Connection[Any] | None = None
        #: How a failure to connect is worded: after one connection has worked, the URL is right.
        self._once: Literal["first", "again"] = "first"
        self._depth = 0
        self._watch = LockWatch(self._side_connection, lambda: self.notice, *server_and_db(url))
        self._connect()

    def _open(self, *, autocommit: bool, app: str) -> psycopg.Connection[Any]:
        given = conninfo_to_dict(self.url)
        # A service file (?service=) may set these itself: then it decides.
        tcp: dict[str, Any] = (
            {} if "service" in given else {k: v for k, v in TCP_DEFAULTS.items() if k not in given}
        )
        return psycopg.connect(self.url, autocommit=autocommit, connect_timeout=int(self._connect_timeout_s),
                               application_name=app, **tcp)  # fmt: skip

    def _side_connection(self) -> psycopg.Connection[Any]:
        """The lock watch's connection, which only reads ``pg_locks`` (see ``pg_wait``)."""
        return self._open(autocommit=True, app=f"{self._app} lock watch")

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            given = conninfo_to_dict(self.url)
            conn = self._open(autocommit=False, app=self._app)
        except psycopg.Error as exc:
            raise translate(exc, self.url, check=self.check, connection=self._once) from None
        server = _session_settings(given)
        if server:
            try:
                # Only those the server knows: one without JIT (PostgreSQL 10) refused
                # set_config('jit', ...), and the TCP settings in the same statement with it.
                conn.execute(
                    "SELECT set_config(s.name, v.value, false) FROM (VALUES "
                    + ", ".join("(%s::text, %s::text)" for _ in server)
                    + ") AS v(name, value) JOIN pg_settings s ON s.name = v.name",
                    [x for kv in server.items() for x in kv],
                )
                conn.commit()
            except psycopg.OperationalError as exc:
                conn.close()
                raise translate(exc, self.url, check=self.check, connection=self._once) from None
            except psycopg.Error:
                conn.rollback()  # a server or a pooler that refuses them: go on without
        conn.adapters.register_dumper(None, _JsonbDumper)  # for the type only: see _copy
        self._conn = conn
        self._staged = False
        self._once = "again"
        return conn

    def _live(self) -> psycopg.Connection[Any]:
        """The connection, reconnecting if the server dropped it (e.g. pg_terminate_backend)."""
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                conn.close()
            conn = self._connect()
        return conn

    def close(self) -> None:
        self._watch.close()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _sql(self, sql: str) -> str:
        return sql.replace("%", "%%").replace("?", "%s")

    def _now(self, cur: Any) -> float:
        cur.execute("SELECT extract(epoch from clock_timestamp())::float8")
        return float(cur.fetchone()[0])

    @contextmanager
    def _tx(self, reading: bool = False) -> Iterator[psycopg.Cursor[Any]]:
        conn = self._live()
        # The Transaction itself, not `conn.transaction()`'s generator around it: its status
        # says whether a `with` cut short left it begun (below).
        tx = psycopg.Transaction(conn)
        # Its lock waits are said (LockWatch) where someone listens, as SQLite's are.
        watched = self._depth == 0 and self.notice is not None
        if watched:
            self._watch.begin(conn.info.backend_pid)
        outermost_write = self._depth == 0 and not reading
        self._depth += 1
        try:
            with _Committing(tx) if outermost_write else tx, conn.cursor() as cur:
                yield cur
        except BaseException as exc:
            if tx.status is tx.Status.ACTIVE:
                # Begun, but a Ctrl+C whose handler ran as its enter returned (after BEGIN)
                # raised before the `with` held it, so nothing ended it: left open, each later
                # transaction of the connection was a savepoint in it, never committed.
                with suppress(psycopg.Error):
                    tx.__exit__(type(exc), exc, exc.__traceback__)
            # A rollback takes the staging tables created in it (or in a savepoint of it)
            # with it: the next staged upsert creates them again.
            self._staged = False
            if isinstance(exc, psycopg.Error):
                raise translate(exc, self.url, reading=reading, check=self.check,
                                connection="open") from exc
            raise
        finally:
            self._depth -= 1
            if watched:
                self._watch.end()

    def _read(self) -> Any:
        return self._tx(reading=True)

    def migrate(self) -> int:
        # A schema already at this version is left alone, read without writing: CREATE TABLE
        # IF NOT EXISTS asks for CREATE on the schema even when the table is there, and
        # `gapfill init` as a role that may only read an up-to-date database said to grant it.
        current = self.schema_version()
        if current is not None and current >= self.latest_version():
            return current
        with self._tx() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            cur.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")
            row = cur.fetchone()
            current = int(row[0]) if row else 0
            for version, sql in migrations("postgres"):
                if version <= current:
                    continue
                started = time.perf_counter()
                cur.execute(sql.encode())
                cur.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
                migrated(self.display_url, version, started)
                current = version
            return current

    def _stage(self, cur: Any) -> None:
        if not self._staged:
            cur.execute(_STAGE.encode())
            self._staged = True

    _INSERT_STAGED = _INSERT_STAGED
    _FILL_FROM_STAGE = _FILL_FROM_STAGE

    def _stage_refs(self, cur: Any, refs: Iterable[Ref]) -> tuple[int, set[tuple[int, str]]]:
        self._stage(cur)
        contracts: set[tuple[int, str]] = set()
        staged = 0
        with cur.copy(
            "COPY stage_refs (chain_id, contract, tx_hash, block_number, source, seq) FROM STDIN"
        ) as copy:
            for r in refs:
                contracts.add((r.chain_id, r.contract))
                copy.write_row((r.chain_id, r.contract, r.tx_hash, r.block_number, r.source, staged))
                staged += 1
        return staged, contracts

    def _analyze_stage(self, cur: Any) -> None:
        # A temporary table, sampled: ~0.1 s for a million rows. Without it the join may
        # take the staged refs for one row. A CSV of 200,000 refs imported again counts its
        # conflicts in 1.5 s instead of 1.0.
        cur.execute("ANALYZE stage_refs")

    def _unstage(self, cur: Any) -> None:
        cur.execute("TRUNCATE stage_refs")

    def _stored_blocks(self, cur: Any, chain_id: int, hashes: Sequence[str]) -> dict[str, int]:
        cur.execute(_STORED_BLOCKS, (chain_id, list(hashes)))
        return {h: int(b) for h, b in cur.fetchall() if b is not None}

    def _upsert(
        self, cur: Any, txs: Sequence[TxRow], logs: Sequence[LogRow]
    ) -> set[tuple[int, str]] | None:
        # In key order (chain, hash[, log index]), whatever the batches' order (block, hash):
        # two workers writing transactions they share then take those rows' locks in the
        # same order, so one waits for the other instead of both waiting for each other
        # ("deadlock detected" after a second, and the loser's commit group written again).
        tx_rows = sorted((_tx_tuple(t) for t in txs), key=itemgetter(0, 1))
        log_rows = sorted((_log_tuple(g) for g in logs), key=itemgetter(0, 1, 2))
        # Fast path: COPY straight into the tables, under a savepoint. Rows of a gap are
        # normally new, so this writes each row once (and every one is new). Any row already
        # there (re-enrichment, a tx shared by two contracts, a duplicate in the batch, or
        # one another transaction is writing: COPY waits for it) raises a unique
        # violation: the savepoint undoes the partial COPY and the staged upsert runs.
        try:
            with cur.connection.transaction():
                _copy(cur, "transactions", _TX_COLS, _TX_TYPES, tx_rows)
                _copy(cur, "logs", _LOG_COLS, _LOG_TYPES, log_rows)
            return None
        except psycopg.errors.UniqueViolation:
            pass
        self._stage(cur)
        inserted: set[tuple[int, str]] = set()
        for stage, table, cols, types, key, update, rows in (
            ("stage_tx", "transactions", _TX_COLS, _TX_TYPES, "chain_id, tx_hash", _UPDATE_TX, tx_rows),
            ("stage_logs", "logs", _LOG_COLS, _LOG_TYPES, "chain_id, tx_hash, log_index", _UPDATE_LOG,
             log_rows),
        ):
            if not rows:
                continue
            _copy(cur, stage, cols, types, rows)
            upsert = (
                f"INSERT INTO {table} ({cols}) SELECT DISTINCT ON ({key}) {cols} FROM {stage} "
                f"ON CONFLICT ({key}) DO UPDATE SET {update}"
            )
            if table == "transactions":
                # A row this statement inserted has no xmax; one it updated (stored before,
                # by whichever transaction) has this transaction's: only the first is new.
                cur.execute(f"WITH w AS ({upsert} RETURNING chain_id, tx_hash, xmax = 0 AS new) "
                            "SELECT chain_id, tx_hash FROM w WHERE new")  # fmt: skip
                inserted = {(int(c), h) for c, h in cur.fetchall()}
            else:
                cur.execute(upsert)
        if tx_rows:
            # Under the rows' locks the upsert took: no other writer of them in between.
            cur.execute(_DELETE_STALE_LOGS)
        filled = [stage for stage, rows in (("stage_tx", tx_rows), ("stage_logs", log_rows)) if rows]
        cur.execute(f"TRUNCATE {', '.join(filled)}")  # one of them at least: a COPY failed
        return inserted

    def _failed_of(self, cur: Any, txs: Sequence[TxRow]) -> list[tuple[int, str]]:
        # Which of the batch's transactions have a record: one statement, one probe each
        # (_WITH_FAILURE); then only those go, each by its key (usually none).
        by_chain: dict[int, list[str]] = {}
        for t in txs:
            by_chain.setdefault(t.chain_id, []).append(t.tx_hash)
        gone = []
        for chain_id, hashes in by_chain.items():
            cur.execute(_WITH_FAILURE, (hashes, chain_id))
            gone += [(chain_id, h) for (h,) in cur.fetchall()]
        return sorted(gone)

    def _plan_lock(self, cur: Any) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (PLAN_LOCK,))

    def _fresh_stats(self) -> None:
        # A transactions table never analyzed (or analyzed empty) has no statistics: the
        # gap's probe of a ref's stored transaction (chain, hash) then looked as cheap by
        # (chain, block) as by the primary key (by (chain, to) likewise, since that index is
        # gone: migration 10), and PostgreSQL took the smaller index and
        # filtered every stored row of the chain by hash, per ref. After a new database's
        # start-up sample stored ~250 rows, planning 8,104 refs and the first leases took
        # 1.64 s of statement time instead of 0.86 s (autovacuum analyzes a minute later
        # at best). Analyzed once it has rows, the statistics say that the chain is most
        # of it, and the primary key is the probe's from then on.
        with self._tx() as cur:
            cur.execute(_NEVER_ANALYZED)
            if cur.fetchone() is not None:
                cur.execute("ANALYZE transactions")

    def _removal_lock(self, cur: Any) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (REMOVAL_LOCK,))

    def _gap_keys(self, cur: Any, chain_id: int, contract: str) -> Iterator[RefKey]:
        conn = self._live()
        # A named (server-side) cursor streams the keys inside the planning transaction.
        # The refs are walked in hash order (the primary key's), then sorted by key: walked
        # by key, each ref's transaction was probed in random hash order, and once the
        # chain's transactions outgrow the shared buffers most probes read a page again
        # (1M refs over 4 contracts, 780,000 stored, 217,000 missing: 455,000 pages read
        # instead of 32,000 for a 600,000-ref contract; 15 s instead of 7.7).
        with conn.cursor(name=f"gap_keys_{int(time.time() * 1e6)}") as named:
            named.itersize = 20_000
            named.execute(
                self._sql(
                    f"SELECT k, tx_hash FROM (SELECT {KEY_SQL} AS k, r.tx_hash FROM refs r "
                    f"WHERE {self._GAP_WHERE} ORDER BY r.tx_hash OFFSET 0) g ORDER BY k, tx_hash"
                ),
                (chain_id, contract),
            )
            for k, h in named:
                yield (int(k), h)
