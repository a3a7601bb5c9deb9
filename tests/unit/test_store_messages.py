"""What a failed SQLite write, or a PostgreSQL URL that does not connect, says to do."""

from __future__ import annotations

import sqlite3

import pytest

from gapfill.store.postgres import server_and_db
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
