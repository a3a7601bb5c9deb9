"""What a failed SQLite write, or a PostgreSQL URL that does not connect, says to do."""

from __future__ import annotations

import sqlite3

import psycopg
import pytest

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
    (psycopg.errors.QueryCanceled("canceling statement due to statement timeout"),
     "PostgreSQL error on postgresql://u:***@db.example:6432/app: canceling statement due to "
     "statement timeout"),
])  # fmt: skip
def test_postgres_errors_say_what_went_wrong(exc: psycopg.Error, says: str) -> None:
    text = str(translate(exc, URL))
    assert says in text and "secret" not in text


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
     f"(sslrootcert=system) signed (SSL error: certificate verify failed); {_FIX}"),
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
