"""Storage: schema, migrations and the two backends behind one interface.

``open_store(url)`` picks the backend from the URL scheme:

* ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db`` (the default,
  ``sqlite:///gapfill.db`` in the working directory);
* ``postgresql://user:password@host:port/dbname`` (also ``postgres://``).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from gapfill.errors import ConfigError, StoreError
from gapfill.importing import ImportsWithoutGc
from gapfill.redact import db_url_after_scheme, is_keyword_dsn, redact_db_url
from gapfill.store.base import (
    DB_CHECK,
    BatchCounts,
    FinishedPlan,
    GivenBack,
    Leased,
    LeaseEvent,
    PlanInfo,
    Pruned,
    RefsAdded,
    RunInfo,
    Store,
    owner_name,
    run_owner,
)

DEFAULT_DB_URL = "sqlite:///gapfill.db"
#: A '%' that starts no %XX escape: libpq refuses the URL it is in.
_BARE_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")

__all__ = [
    "DB_CHECK",
    "DEFAULT_DB_URL",
    "BatchCounts",
    "FinishedPlan",
    "GivenBack",
    "LeaseEvent",
    "Leased",
    "PlanInfo",
    "Pruned",
    "RefsAdded",
    "RunInfo",
    "Store",
    "open_store",
    "owner_name",
    "run_owner",
]


def open_store(
    url: str | None = None, *, migrate: bool = True, read_only: bool = False,
    notice: Callable[[str], None] | None = None, check: str = DB_CHECK, app: str = "",
) -> Store:
    """Open the database at ``url`` and (by default) bring its schema up to date.

    ``read_only``: for commands that only read. The database is opened so that a read-only
    file or role can (SQLite: read-only), and its schema is not created: a database without
    one is an error. One whose schema is behind is opened as usual and brought up to date.
    ``notice`` hears what the store waits for (another process's lock on SQLite, another
    session's on PostgreSQL). ``app`` names the command in the PostgreSQL session's
    ``application_name`` (``gapfill <app> (pid N)``), which another's lock wait names.
    ``check`` names where ``url`` came from in the messages that say to fix it: the
    option, the environment variable or the config file's key.
    """
    url = url or DEFAULT_DB_URL
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    store: Store
    if scheme == "sqlite":
        with ImportsWithoutGc():
            from gapfill.store.sqlite import SqliteStore

        store = SqliteStore(url, read_only=read_only, check=check)
    elif scheme in ("postgresql", "postgres") and url[len(scheme) + 1 :].startswith("//"):
        from urllib.parse import urlsplit

        with ImportsWithoutGc():  # psycopg: ~90 modules, 0.3 of PostgreSQL's start-up before a run
            from gapfill.store.postgres import PostgresStore

        error: ValueError | None = None
        try:
            urlsplit(url).port  # noqa: B018 (raises on a malformed host or port)
        except ValueError as exc:
            error = exc
        after = url.partition("://")[2]
        netloc = re.split(r"[/?#]", after, maxsplit=1)[0]  # the authority, as urlsplit cuts it
        before_query = re.split(r"[?#]", after, maxsplit=1)[0]
        # u:ab@cd?sslmode=x@host/db: libpq's password "ab", host "cd" and sslmode
        # "x@host/db", or the password "ab@cd?sslmode=x" the user may have meant.
        beyond = after[len(netloc):]
        credentials, at, _ = netloc.partition("@")
        either = bool(at) and ":" in credentials and beyond.startswith(("?", "#")) and "@" in beyond
        if (
            netloc.count("@") > 1
            or (error is not None and "@" not in netloc and "@" in after)
            or "@" in before_query[len(netloc):]  # u:Wr@ng/Pw@host: the host would be "ng"
            or either
        ):
            # libpq splits user:password@host at the first '@' (and the URL's authority ends
            # at a '/', '?' or '#'): the rest of the password would become the host, the
            # port or a parameter, and appear in the error message.
            password = after.rpartition("@")[0].partition(":")[2]
            found = [c for c in "@/?#" if c in password] or ["@"]
            query = " (or its query an '@')" if either and beyond.startswith("?") else ""
            raise ConfigError(
                f"the password in {check} contains {' and '.join(map(repr, found))}{query}: "
                f"write it as {' and '.join(f'%{ord(c):02X}' for c in found)} in the URL"
            )
        userinfo = netloc.rpartition("@")[0]
        if _BARE_PERCENT.search(userinfo):
            # libpq refuses it as "invalid percent-encoded token", with no word of what to do.
            part = "password" if _BARE_PERCENT.search(userinfo.partition(":")[2]) else "user name"
            raise ConfigError(f"the {part} in {check} contains '%': write it as %25 in the URL")
        if error is not None:  # its text quotes the host or the port, not the password
            raise ConfigError(
                f"the PostgreSQL URL is malformed ({error}): write it as "
                f"postgresql://user:password@host:5432/dbname in {check}"
            )

        store = PostgresStore(url, check=check, app=app)
    else:
        if is_keyword_dsn(url):  # its password masked
            raise ConfigError(
                f"{redact_db_url(url)!r} is not a database URL: write {check} as "
                "postgresql://user:password@host:5432/dbname (or sqlite:///path/to/file.db)"
            )
        if "://" not in url and (scheme in ("postgresql", "postgres") or "@" in url):
            # postgres:pw@host/db, user:pw@host:5432/db: libpq would quote it whole,
            # password and all, as a connection string missing its '='.
            raise ConfigError(
                f"{redact_db_url(url)!r} is not a PostgreSQL URL: write it as "
                f"postgresql://{db_url_after_scheme(url)} in {check}"
            )
        if ":" not in url:  # a bare path, as `--db gapfill.db`: not a scheme it names
            raise ConfigError(
                f"{redact_db_url(url)!r} is not a database URL: write it as sqlite:///{redact_db_url(url)} "
                f"in {check} for a "
                "SQLite file (or postgresql://user@host:5432/dbname)"
            )
        shown = scheme if "://" in url else redact_db_url(url)
        raise ConfigError(
            f"unsupported database URL scheme {shown!r} in {check}: use sqlite:///path/to/file.db "
            "or postgresql://user@host:5432/dbname"
        )
    store.notice = notice
    try:
        if not (migrate or read_only):
            return store
        # Read first: a database already up to date needs no write lock, nor a role that may
        # create tables.
        version = store.schema_found = store.schema_version()
        if version is None and read_only:
            # A URL from the environment or a config file may not be the one the user meant.
            typed = check in ("--db", DB_CHECK)
            raise StoreError(
                f"the database {store.display_url}{'' if typed else f' (from {check})'} has no "
                "gapfill schema yet: start it with `gapfill init` or `gapfill contract add ADDRESS`"
                + ("" if typed else f", or fix {check} if it is not the database you meant")
            )
        if version is not None and version >= store.latest_version():
            return store
        if read_only:
            store.close()
            return open_store(url, notice=notice, check=check, app=app)
        store.migrate()
    except BaseException:
        store.close()
        raise
    return store
