"""Shared fixtures: a clean environment, and a fresh database per test on each backend.

PostgreSQL is at ``GAPFILL_TEST_PG`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``).
Each test gets its own database cloned from a migrated template, so no test
sees another's rows. Under ``CI=true`` a missing PostgreSQL fails the run
instead of skipping.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from gapfill.store import open_store

PG_ADMIN_URL = os.environ.get("GAPFILL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_ENV_VARS = ("GAPFILL_DB", "ETH_RPC_URL", "GAPFILL_CONFIG", "GAPFILL_EXPLORER_URL",
             "GAPFILL_EXPLORER_KEY", "GAPFILL_RPS")  # fmt: skip


def require(condition: bool, reason: str) -> None:
    """Skip when a service is missing; fail instead under CI=true."""
    if not condition:
        if IN_CI:
            pytest.fail(f"{reason} (CI=true: a missing service is a failure)")
        pytest.skip(reason)


@pytest.fixture(autouse=True)
def _clean_environ(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    for name in _ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    # Each test has its own host-shared RPC state (rate buckets, learned batch sizes): a
    # loopback URL another test used (the same port, later) must not carry its limits over.
    monkeypatch.setenv("GAPFILL_BUDGET_DIR", str(tmp_path_factory.mktemp("budgets")))


def _pg_url(dbname: str) -> str:
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    return f"{base}/{dbname}"


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A migrated template database, made once per session."""
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        require(False, f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}")
        raise
    name = f"gapfill_tmpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    store = open_store(_pg_url(name))
    store.close()
    try:
        yield name
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def pg_url(pg_template: str) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test."""
    name = f"gapfill_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
    try:
        yield _pg_url(name)
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'gapfill.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database URL on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'gapfill.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url
