"""What a failed SQLite write, or a PostgreSQL URL that does not connect, says to do."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import psycopg
import pytest

from gapfill.engine.events import db_retrying
from gapfill.errors import FixFirst, StoreBusy, StoreDropped, StoreError, StoreRefused
from gapfill.store.postgres import server_and_db, translate
from gapfill.store.sqlite import _hint


def test_sqlite_write_errors_say_what_to_do() -> None:
    assert "free space on that disk" in _hint(sqlite3.OperationalError("database or disk is full"))
    assert "read-only" in _hint(sqlite3.OperationalError("attempt to write a readonly database"))
    assert _hint(sqlite3.OperationalError("no such table: x")) == ""


@pytest.mark.parametrize(("url", "where", "db"), [
    ("postgresql://u:pw@db.example:6432/app", "db.example:6432", "app"),
    ("postgresql:///app?host=/run/pg", "the local socket (/run/pg, port 5432)", "app"),
    ("postgresql://127.0.0.1/?dbname=zz&port=5999", "127.0.0.1:5999", "zz"),
    ("postgresql:///", "the local socket (default directory, port 5432)", "alice"),
    ("postgresql://bob@10.0.0.1", "10.0.0.1:5432", "bob"),
])  # fmt: skip
def test_postgres_messages_name_where_libpq_connects(
    monkeypatch: pytest.MonkeyPatch, url: str, where: str, db: str
) -> None:
    # Not "localhost" for a socket or a ?host= parameter: the place libpq actually tries.
    for var in ("PGHOST", "PGPORT", "PGDATABASE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PGUSER", "alice")
    assert server_and_db(url) == (where, db)


URL = "postgresql://u:secret@db.example:6432/app"


@pytest.mark.parametrize(("exc", "says"), [
    (psycopg.OperationalError("connection refused"), "could not connect to PostgreSQL at db.example:6432"),
    (psycopg.errors.AdminShutdown("terminating connection due to administrator command"),
     "could not connect to PostgreSQL"),
    # The server raised these for a statement: it is there, and connecting is not the fix.
    (psycopg.errors.DeadlockDetected("deadlock detected"),
     "rolled the change back because a concurrent one conflicted with it (deadlock detected): "
     "nothing of it was written; run the command again"),
    (psycopg.errors.SerializationFailure("could not serialize access"), "run the command again"),
])  # fmt: skip
def test_postgres_errors_say_what_went_wrong(exc: psycopg.Error, says: str) -> None:
    text = str(translate(exc, URL))
    assert says in text and "secret" not in text


_DROPPED = psycopg.errors.AdminShutdown("terminating connection due to administrator command")


def test_a_connection_that_worked_and_dropped_does_not_blame_the_url() -> None:
    # The first connection's failure keeps "fix --db / GAPFILL_DB" (above); after one
    # worked, the URL is right: the drop, or the server not answering now, is said.
    lost = translate(_DROPPED, URL, connection="open")
    assert isinstance(lost, StoreDropped) and str(lost) == (
        "lost the connection to PostgreSQL at db.example:6432 (terminating connection due to "
        "administrator command): check that the server runs, then run the command again")
    down = translate(psycopg.OperationalError("connection refused"), URL, connection="again")
    assert str(down) == ("PostgreSQL at db.example:6432 is not answering now (connection refused): "
                         "check that the server runs, then run the command again")
    assert db_retrying(lost).text == (
        "lost the connection to PostgreSQL at db.example:6432 (terminating connection due to "
        "administrator command); retrying")
    assert db_retrying(down, "leasing a batch").text == (
        "PostgreSQL at db.example:6432 is not answering now (connection refused) while leasing a "
        "batch; retrying")
    # What is not a lost connection keeps its own words.
    assert db_retrying(StoreError("disk full"), "leasing a batch").text == (
        "database error while leasing a batch, retrying: disk full")
    assert "fix --db" in str(translate(psycopg.OperationalError("connection refused"), URL))


_TIMEOUT = psycopg.errors.QueryCanceled("canceling statement due to statement timeout")
_FULL = psycopg.errors.DiskFull('could not extend file "base/1/2": No space left on device')
_STANDBY = psycopg.errors.ReadOnlySqlTransaction("cannot execute INSERT in a read-only transaction")
_DENIED = psycopg.errors.InsufficientPrivilege("permission denied for table refs")
_LOCK_TIMEOUT = psycopg.errors.LockNotAvailable("canceling statement due to lock timeout")


@pytest.mark.parametrize(("exc", "what", "fix"), [
    (_TIMEOUT, "PostgreSQL at db.example:6432 cancelled a statement of gapfill's at its statement_timeout",
     'raise or unset statement_timeout for role "u" (ALTER ROLE "u" SET statement_timeout = 0), or in '
     "--db / GAPFILL_DB if its options set it"),
    (_LOCK_TIMEOUT, "PostgreSQL at db.example:6432 cancelled a statement of gapfill's that waited for a "
     "lock longer than its lock_timeout",
     'raise or unset lock_timeout for role "u" (ALTER ROLE "u" SET lock_timeout = 0), or in --db / '
     "GAPFILL_DB if its options set it"),
])  # fmt: skip
def test_a_timeout_met_waiting_for_another_session_may_pass_and_says_what_to_raise(
    exc: psycopg.Error, what: str, fix: str
) -> None:
    # Every worker's commit updates the run's row, and contracts share transaction rows:
    # waiting for another worker's commit is contention. As a StoreRefused it ended the run;
    # a run retries it (saying what it met), and ends with the fix only if it keeps meeting it.
    error = translate(exc, URL)
    assert isinstance(error, StoreBusy) and not isinstance(error, StoreRefused | StoreDropped)
    assert (error.what, error.fix) == (f"{what} ({exc})", fix)
    assert str(error) == f"{what} ({exc}): {fix}"
    assert db_retrying(error, "committing").text == f"{what} ({exc}) while committing; retrying"


@pytest.mark.parametrize(("exc", "what", "fix"), [
    (_FULL, 'PostgreSQL at db.example:6432 has no disk space left for database "app"',
     "free space on the database server"),
    (_STANDBY, 'PostgreSQL database "app" on db.example:6432 takes no writes',
     "point --db / GAPFILL_DB at the primary server (a hot standby is read-only) or another writable "
     "database, or turn default_transaction_read_only off for it"),
    (_DENIED, 'PostgreSQL role "u" may not write to table refs of database "app"',
     "grant it INSERT, UPDATE and DELETE on gapfill's tables, or use a role that may write, in --db / "
     "GAPFILL_DB"),
])  # fmt: skip
def test_postgres_errors_the_server_keeps_raising_say_what_to_fix_first(
    exc: psycopg.Error, what: str, fix: str
) -> None:
    # They ended at the driver's words ("PostgreSQL error on ...: ..."), or (a privilege)
    # were not a FixFirst, so discovery added "run the same command again" after a fix.
    error = translate(exc, URL)
    assert isinstance(error, StoreRefused) and isinstance(error, FixFirst)
    assert (error.what, error.fix) == (f"{what} ({exc})", fix)
    assert str(error) == f"{what} ({exc}): {fix}"


def test_a_statement_cancelled_by_someone_else_is_not_called_a_timeout() -> None:
    error = translate(psycopg.errors.QueryCanceled("canceling statement due to user request"), URL)
    assert not isinstance(error, FixFirst) and "statement_timeout" not in str(error)
    # 55P03 is also a NOWAIT lock that was not free: no timeout of the role's to raise.
    error = translate(psycopg.errors.LockNotAvailable('could not obtain lock on row in relation "x"'), URL)
    assert not isinstance(error, FixFirst) and "lock_timeout" not in str(error)


_FEWER = "close other clients, or run gapfill with fewer --workers (each worker holds a connection)"


@pytest.mark.parametrize(("said", "what", "fix"), [
    ("sorry, too many clients already",
     "PostgreSQL at db.example:6432 has no connection slot left: its max_connections are in use",
     f"{_FEWER}, or raise max_connections on the server (it takes a restart)"),
    ("remaining connection slots are reserved for non-replication superuser connections",
     "PostgreSQL at db.example:6432 has no connection slot left: its max_connections are in use",
     f"{_FEWER}, or raise max_connections on the server (it takes a restart)"),
    ('too many connections for role "u"',
     'PostgreSQL role "u" has as many sessions on db.example:6432 as its CONNECTION LIMIT allows',
     f'{_FEWER}, or raise the limit (ALTER ROLE "u" CONNECTION LIMIT -1 lifts it)'),
    ('too many connections for database "app"',
     'PostgreSQL database "app" on db.example:6432 has as many sessions as its CONNECTION LIMIT allows',
     f'{_FEWER}, or raise the limit (ALTER DATABASE "app" CONNECTION LIMIT -1 lifts it)'),
])  # fmt: skip
def test_a_server_with_no_connection_slot_left_says_which_limit_and_what_to_do(
    said: str, what: str, fix: str
) -> None:
    # libpq gives them no SQLSTATE at connect time, so they were taken for a server that is
    # not there: "could not connect ...: check that the server runs and fix --db".
    exc = psycopg.OperationalError(f"{_FAILED}FATAL:  {said}")
    first = translate(exc, URL)
    assert str(first) == f"{what} ({_FAILED}FATAL:  {said}): {fix}"
    assert not isinstance(first, FixFirst | StoreDropped)
    # Opening a connection again mid-run: other clients may leave, so a run retries it as it
    # retries a server not answering, saying which limit it waits for.
    again = translate(exc, URL, connection="again")
    assert isinstance(again, StoreDropped)
    assert again.what == f"{what} ({_FAILED}FATAL:  {said})"
    assert again.fix == f"{fix}, then run the command again"
    assert db_retrying(again, "leasing a batch").text == f"{again.what} while leasing a batch; retrying"
    # The same error raised with its SQLSTATE says the same.
    coded = psycopg.errors.TooManyConnections(said)
    assert str(translate(coded, URL)) == f"{what} ({said}): {fix}"


def test_a_server_out_of_memory_is_said_as_such_and_may_pass() -> None:
    says = ("PostgreSQL at db.example:6432 ran out of memory ({}): nothing of what failed was written; "
            "free memory on the database server (or run gapfill with fewer --workers, or lower work_mem "
            "for its role), then run the command again")  # fmt: skip
    error = translate(psycopg.errors.OutOfMemory("out of memory"), URL)
    assert str(error) == says.format("out of memory")  # a command ends with it
    assert not isinstance(error, FixFirst | StoreDropped)  # another session may free it: a run retries
    # ... saying what it met, as for a connection slot: "database error while committing,
    # retrying: ... then run the command again" contradicted itself.
    assert isinstance(error, StoreBusy)
    assert db_retrying(error, "committing").text == (
        "PostgreSQL at db.example:6432 ran out of memory (out of memory) while committing; retrying")
    at_start = psycopg.OperationalError(_FAILED + "FATAL:  out of memory")
    assert str(translate(at_start, URL)) == says.format(f"{_FAILED}FATAL:  out of memory")


@pytest.mark.parametrize("exc", [psycopg.errors.DeadlockDetected("deadlock detected"),
                                 psycopg.errors.SerializationFailure("deadlock detected")])  # fmt: skip
def test_a_change_a_concurrent_one_rolled_back_is_retried_saying_so(exc: psycopg.Error) -> None:
    # A run retrying it said "database error while committing, retrying: ...: nothing of it
    # was written; run the command again", which contradicted itself (as the out of memory did).
    error = translate(exc, URL)
    assert str(error) == ("PostgreSQL at db.example:6432 rolled the change back because a concurrent one "
                          "conflicted with it (deadlock detected): nothing of it was written; run the "
                          "command again")  # fmt: skip
    assert isinstance(error, StoreBusy)
    assert db_retrying(error, "committing").text == (
        "PostgreSQL at db.example:6432 rolled the change back because a concurrent one conflicted with it "
        "(deadlock detected) while committing; retrying")


# libpq's own words: it gives these no SQLSTATE, like a server that does not answer.
_FAILED = 'connection failed: connection to server at "db.example", port 6432 failed: '


@pytest.mark.parametrize(("url", "said", "says"), [
    (URL, 'FATAL:  role "u" does not exist',
     'PostgreSQL at db.example:6432 has no role "u": fix the user name in --db / GAPFILL_DB, or '
     "create that role (createuser u)"),
    (URL + "?sslmode=require", "server does not support SSL, but SSL was required",
     "PostgreSQL at db.example:6432 does not accept SSL, which sslmode=require in --db / GAPFILL_DB "
     "demands: set it to prefer (or disable), or enable SSL on the server"),
])  # fmt: skip
def test_a_server_that_answers_is_not_said_to_be_down(url: str, said: str, says: str) -> None:
    # Both said "could not connect ...: check that the server runs", which it does.
    assert str(translate(psycopg.OperationalError(_FAILED + said), url)) == says


_FIX = ("point sslrootcert in --db / GAPFILL_DB at the server's CA certificate, or use sslmode=require "
        "to encrypt without checking it")  # fmt: skip


@pytest.mark.parametrize(("query", "said", "says"), [
    ("sslmode=verify-full&sslrootcert=/nonexistent",
     'root certificate file "/nonexistent" does not exist\nEither provide the file, use the system\'s '
     "trusted roots with sslrootcert=system, or change sslmode to disable server certificate verification.",
     'cannot check the certificate of PostgreSQL at db.example:6432: the root certificate file '
     '"/nonexistent" (sslrootcert in --db / GAPFILL_DB) cannot be read (root certificate file '
     f'"/nonexistent" does not exist); {_FIX}'),
    ("sslmode=verify-ca", 'root certificate file "/home/u/.postgresql/root.crt" does not exist',
     'cannot check the certificate of PostgreSQL at db.example:6432: the root certificate file '
     '"/home/u/.postgresql/root.crt" (libpq\'s default, as no sslrootcert is set) cannot be read (root '
     f'certificate file "/home/u/.postgresql/root.crt" does not exist); {_FIX}'),
    ("sslmode=verify-full&sslrootcert=/etc/x.pem",
     'could not read root certificate file "/etc/x.pem": no certificate or crl found',
     'cannot check the certificate of PostgreSQL at db.example:6432: the root certificate file '
     '"/etc/x.pem" (sslrootcert in --db / GAPFILL_DB) cannot be read (could not read root certificate '
     f'file "/etc/x.pem": no certificate or crl found); {_FIX}'),
    ("sslmode=verify-ca&sslrootcert=/etc/ca.pem", "SSL error: certificate verify failed",
     'PostgreSQL at db.example:6432 presented a certificate that no CA in the root certificate file '
     '"/etc/ca.pem" (sslrootcert in --db / GAPFILL_DB) signed (SSL error: certificate verify failed); '
     f"{_FIX}"),
    ("sslmode=verify-full&sslrootcert=system", "SSL error: certificate verify failed",
     "PostgreSQL at db.example:6432 presented a certificate that no CA in the system's trusted roots "
     "(sslrootcert=system) signed (SSL error: certificate verify failed); point sslrootcert in --db / "
     "GAPFILL_DB at the server's CA certificate instead of system, or remove sslrootcert=system and use "
     "sslmode=require to encrypt without checking it"),
    ("sslmode=verify-full", 'server certificate for "db.internal" (and 2 other names) does not match '
     'host name "db.example"',
     'PostgreSQL at db.example:6432 presented a certificate for "db.internal", not for the host name '
     '"db.example" that sslmode=verify-full checks: connect to the name in its certificate, or use '
     "sslmode=verify-ca to check the certificate but not its name"),
    ("sslmode=require&sslkey=/k.pem", 'certificate present, but not private key file "/k.pem"',
     "PostgreSQL at db.example:6432 and the SSL settings in --db / GAPFILL_DB do not agree (certificate "
     'present, but not private key file "/k.pem"): check sslmode, sslrootcert, sslcert and sslkey'),
])  # fmt: skip
def test_a_certificate_problem_is_named_not_said_to_be_a_server_down(
    monkeypatch: pytest.MonkeyPatch, query: str, said: str, says: str
) -> None:
    # All said "could not connect ...: check that the server runs", which it does.
    monkeypatch.delenv("PGSSLROOTCERT", raising=False)
    text = str(translate(psycopg.OperationalError(_FAILED + said), f"{URL}?{query}"))
    assert text == says and "secret" not in text


#: Where a database URL can come from, as the CLI names it.
SOURCES = ["--db", "GAPFILL_DB", "the db key of /etc/gapfill.toml"]


@pytest.mark.parametrize("check", SOURCES)
@pytest.mark.parametrize(("exc", "query"), [
    (psycopg.OperationalError(_FAILED + 'FATAL:  role "u" does not exist'), ""),
    (psycopg.OperationalError(_FAILED + "server does not support SSL, but SSL was required"),
     "?sslmode=require"),
    (psycopg.OperationalError(_FAILED + 'root certificate file "/ca.pem" does not exist'),
     "?sslmode=verify-full&sslrootcert=/ca.pem"),
    (psycopg.OperationalError(_FAILED + "SSL error: certificate verify failed"),
     "?sslmode=verify-ca&sslrootcert=/ca.pem"),
    (psycopg.OperationalError(_FAILED + 'certificate present, but not private key file "/k.pem"'),
     "?sslkey=/k.pem"),
    (psycopg.OperationalError(_FAILED + 'FATAL:  database "app" does not exist'), ""),
    (psycopg.OperationalError(_FAILED + 'FATAL:  password authentication failed for user "u"'), ""),
    (psycopg.ProgrammingError('invalid URI query parameter: "foo"'), "?foo=1"),
    (psycopg.OperationalError(_FAILED + "Connection refused"), ""),
    (psycopg.errors.InsufficientPrivilege("permission denied for sequence batches_id_seq"), ""),
    (psycopg.errors.InsufficientPrivilege("permission denied for table refs"), ""),
    (psycopg.errors.InsufficientPrivilege("permission denied for database app"), ""),
    (psycopg.OperationalError(_FAILED + "FATAL:  -c foo requires a value"), "?options=-cfoo"),
    (psycopg.ProgrammingError('extra key/value separator "=" in URI query parameter: "options"'),
     "?options=-c%20a=b"),
])  # fmt: skip
def test_postgres_messages_name_where_the_url_came_from(exc: psycopg.Error, query: str, check: str) -> None:
    # Each said "--db / GAPFILL_DB" whatever the source: a URL from the config file's db
    # sent the user to an option and a variable they never set.
    text = str(translate(exc, URL + query, check=check))
    assert check in text and "--db / GAPFILL_DB" not in text and "secret" not in text, text


def test_the_important_postgres_messages_name_the_config_files_db() -> None:
    check = "the db key of /etc/gapfill.toml"
    said = _FAILED + 'FATAL:  password authentication failed for user "u"'
    assert str(translate(psycopg.OperationalError(said), URL, check=check)) == (
        "PostgreSQL at db.example:6432 refused the credentials in "
        "postgresql://u:***@db.example:6432/app: fix the db key of /etc/gapfill.toml")
    said = _FAILED + 'FATAL:  database "app" does not exist'
    assert str(translate(psycopg.OperationalError(said), URL, check=check)) == (
        'PostgreSQL database "app" does not exist on db.example:6432: create it (createdb app) or fix '
        "the db key of /etc/gapfill.toml")
    # Without a source, as the library's callers other than the CLI get it.
    assert str(translate(psycopg.OperationalError(said), URL)).endswith("or fix --db / GAPFILL_DB")


@pytest.mark.parametrize("check", SOURCES)
@pytest.mark.parametrize("url", [
    "postgresql://u:p@ss@h/db",  # libpq would show the password's rest as the host
    "postgresql://u:secret@h:99999/db",  # a port out of range
    "postgres:secret@h/db",  # no //
])  # fmt: skip
def test_a_malformed_postgres_url_names_where_it_came_from(url: str, check: str) -> None:
    from gapfill.errors import ConfigError
    from gapfill.store import open_store

    with pytest.raises(ConfigError) as info:
        open_store(url, check=check)
    text = str(info.value)
    assert check in text and "--db / GAPFILL_DB" not in text and "secret" not in text, text


@pytest.mark.parametrize("check", SOURCES)
def test_sqlite_messages_name_where_the_url_came_from(tmp_path: Path, check: str) -> None:
    from gapfill.errors import StoreError
    from gapfill.store import open_store

    with pytest.raises(StoreError) as info:
        open_store(f"sqlite:///{tmp_path / 'no' / 'x.db'}", check=check)
    assert str(info.value) == (f"cannot open the SQLite database {tmp_path / 'no' / 'x.db'}: folder "
                               f"{tmp_path / 'no'} does not exist; create it, or check {check}")  # fmt: skip
    assert _hint(sqlite3.OperationalError("database or disk is full"), check).startswith(
        f"; free space on that disk (or move the database and set {check} to it)")
    assert _hint(sqlite3.OperationalError("attempt to write a readonly database"), check).endswith(
        f"make it writable, or set {check} to another database")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError) as info:
        open_store(f"sqlite:///{garbage}", check=check)
    assert f"; check {check}: it must name a SQLite file" in str(info.value)


#: The server's own words for bad ?options= values, as PostgreSQL 15 gives them (checked
#: against a real server in tests/integration/test_cli_foundation.py).
@pytest.mark.parametrize(("options", "said"), [
    ("-cfoo", "-c foo requires a value"),
    ("--foo", "--foo requires a value"),
    ("foo", "invalid command-line argument for server process: foo"),
    ("-c", "invalid command-line argument for server process: -c"),
    ("-cwork_mem%3Dabc", 'invalid value for parameter "work_mem": "abc"'),
    ("-cnosuch%3D1", 'unrecognized configuration parameter "nosuch"'),
    ("-cshared_buffers%3D1MB", 'parameter "shared_buffers" cannot be changed without restarting the server'),
    ("-cdefault_transaction_read_only%3Dmaybe",
     'parameter "default_transaction_read_only" requires a Boolean value'),
    ("-cwork_mem%3D1", '1 kB is outside the valid range for parameter "work_mem" (64 .. 2147483647)'),
    ("-clog_statement%3Dall", 'permission denied to set parameter "log_statement"'),
])  # fmt: skip
def test_options_the_server_refuses_are_named_not_said_to_be_a_server_down(
    monkeypatch: pytest.MonkeyPatch, options: str, said: str
) -> None:
    # All said "could not connect ...: check that the server runs", which it does.
    monkeypatch.delenv("PGOPTIONS", raising=False)
    exc = psycopg.OperationalError(_FAILED + "FATAL:  " + said + '\nHINT:  Try "postgres --help"')
    assert str(translate(exc, f"{URL}?options={options}", check="the db key of /etc/gapfill.toml")) == (
        f"PostgreSQL at db.example:6432 refused the options= of the URL ({said}): fix them in the db key of "
        "/etc/gapfill.toml, each setting written as -c%20name%3Dvalue, or remove them")
    # Set in the environment, not in the URL: PGOPTIONS is what to fix.
    monkeypatch.setenv("PGOPTIONS", "-cfoo")
    assert str(translate(exc, URL)) == (
        f"PostgreSQL at db.example:6432 refused PGOPTIONS in the environment ({said}): fix it, each "
        "setting written as -c name=value, or unset it")
    # With no options anywhere, such a text is not taken for theirs.
    monkeypatch.delenv("PGOPTIONS")
    assert "options" not in str(translate(exc, URL))


def test_an_unescaped_equals_sign_in_options_says_how_to_write_it() -> None:
    exc = psycopg.ProgrammingError('extra key/value separator "=" in URI query parameter: "options"')
    assert str(translate(exc, f"{URL}?options=-c%20a=b", check="GAPFILL_DB")) == (
        "PostgreSQL cannot use the URL postgresql://u:***@db.example:6432/app?options=-c%20a=b (extra "
        'key/value separator "=" in URI query parameter: "options"): in the options= of GAPFILL_DB, write '
        "each '=' as %3D and each space as %20 (-c%20name%3Dvalue)")


@pytest.mark.parametrize(("query", "said", "says"), [
    # Said "could not connect ...: check that the server runs": no service file was read.
    ("service=nosuch", 'connection is bad: definition of service "nosuch" not found',
     'no service file defines the service "nosuch" that service= in --db / GAPFILL_DB names: add it to '
     "~/.pg_service.conf (or the file PGSERVICEFILE names), or remove it"),
    # Both said "check the query parameters (only libpq connection parameters ... are allowed)".
    ("bogus=1", 'invalid URI query parameter: "bogus"',
     'libpq has no connection parameter "bogus" (in --db / GAPFILL_DB): remove it, or correct its name '
     "(such as sslmode, connect_timeout, application_name)"),
    ("sslmode=bogus", 'connection is bad: invalid sslmode value: "bogus"',
     'libpq cannot take "bogus" for sslmode (in --db / GAPFILL_DB): correct it, or remove it to use the '
     "default"),
    # "set it to prefer": libpq refuses prefer beside sslrootcert=system, which alone makes
    # verify-full the default.
    ("sslrootcert=system", "server does not support SSL, but SSL was required",
     "PostgreSQL at db.example:6432 does not accept SSL, which sslrootcert=system in --db / GAPFILL_DB "
     "demands (it makes verify-full the default sslmode): remove it, or enable SSL on the server"),
    ("sslrootcert=system&sslmode=verify-full", "server does not support SSL, but SSL was required",
     "PostgreSQL at db.example:6432 does not accept SSL, which sslmode=verify-full in --db / GAPFILL_DB "
     "demands: remove sslrootcert=system and set sslmode to prefer (or disable), or enable SSL on the "
     "server"),
    # Said the SSL settings "do not agree": check sslmode, sslrootcert, sslcert and sslkey.
    ("sslrootcert=system&sslmode=require",
     'connection is bad: weak sslmode "require" may not be used with sslrootcert=system (use "verify-full")',
     "sslmode=require is too weak for sslrootcert=system in --db / GAPFILL_DB, which checks the server's "
     "certificate and name: set sslmode to verify-full, or remove sslrootcert=system"),
    # Said "could not connect ...: check that the server runs".
    ("sslnegotiation=direct", 'connection is bad: weak sslmode "prefer" may not be used with '
     'sslnegotiation=direct (use "require", "verify-ca", or "verify-full")',
     "sslmode=prefer is too weak for sslnegotiation=direct in --db / GAPFILL_DB: set sslmode to require, "
     "verify-ca, or verify-full, or remove sslnegotiation=direct"),
])  # fmt: skip
def test_a_connection_setting_libpq_refuses_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, query: str, said: str, says: str
) -> None:
    for name in ("PGSSLMODE", "PGSSLROOTCERT", "PGSERVICE", "PGSSLNEGOTIATION"):
        monkeypatch.delenv(name, raising=False)
    text = str(translate(psycopg.OperationalError(said), f"{URL}?{query}"))
    assert text == says and "secret" not in text
