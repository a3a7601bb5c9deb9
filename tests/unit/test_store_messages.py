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
