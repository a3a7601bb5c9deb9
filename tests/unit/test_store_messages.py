"""What a failed SQLite write says to do."""

from __future__ import annotations

import sqlite3

from gapfill.store.sqlite import _hint


def test_sqlite_write_errors_say_what_to_do() -> None:
    assert "free space on that disk" in _hint(sqlite3.OperationalError("database or disk is full"))
    assert "read-only" in _hint(sqlite3.OperationalError("attempt to write a readonly database"))
    assert _hint(sqlite3.OperationalError("no such table: x")) == ""
