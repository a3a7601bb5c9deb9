"""What may be shown of a URL: never a key or a password, whatever its length or shape."""

from __future__ import annotations

import re
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest
from fixtures_http import loopback

from gapfill.redact import DbUrl, Secret, redact_text, redact_url


def test_a_path_is_scrubbed_where_it_stands_whole_not_inside_a_longer_word() -> None:
    # `--db mysql://u:P@h/db` masked "/db" in the sentence's own example: ".../***name".
    from gapfill.cli import Ctx
    from gapfill.errors import ConfigError
    from gapfill.settings import FileConfig
    from gapfill.store import open_store

    ctx = Ctx("mysql://u:P@h/db", (), None, FileConfig(), 0)
    with pytest.raises(ConfigError) as err:
        open_store(ctx.db_url)
    assert redact_text(str(err.value), *ctx.secrets()) == (
        "unsupported database URL scheme 'mysql' in --db / GAPFILL_DB: use sqlite:///path/to/file.db "
        "or postgresql://user@host:5432/dbname"
    )
    url = "http://127.0.0.1:9/v2/KEY"
    assert redact_text("not found: /v2/KEY. Retry /v2/KEY/x or /v2/KEY?id=1", url) == (
        "not found: /v2/***. Retry /v2/***/x or /v2/***?id=1"
    )


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://127.0.0.1:9/v2/SECRETKEY123", "http://127.0.0.1:9/v2/***"),  # short keys too
        ("https://eth-mainnet.g.alchemy.com/v2/abcDEF123", "https://eth-mainnet.g.alchemy.com/v2/***"),
        ("https://rpc.ankr.com/eth/0123456789abcdef", "https://rpc.ankr.com/***/***"),
        ("https://x.quiknode.pro/deadbeef/", "https://x.quiknode.pro/***/"),
        ("http://127.0.0.1:8545", "http://127.0.0.1:8545"),
        ("https://KEY@node.example/rpc", "https://***@node.example/rpc"),
        ("https://node.example/?apikey=abc&chain=1", "https://node.example/?apikey=***&chain=1"),
        # A JSON web token (dots between its parts), under its name or another.
        ("https://node.example/?jwt=eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl&chain=1",
         "https://node.example/?jwt=***&chain=1"),
        ("https://node.example/?t=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl",
         "https://node.example/?t=***"),
        ("postgresql://u:hunter2@db.example/gapfill", "postgresql://u:***@db.example/gapfill"),
        ("host=127.0.0.1 password=hunter2 dbname=x", "host=127.0.0.1 password=*** dbname=x"),
        ("host=h password='a b' dbname=x", "host=h password=*** dbname=x"),
        ("/tmp/gapfill.db", "/tmp/gapfill.db"),
        # An empty authority stays: sqlite:/a.db is not a URL the store reads.
        ("sqlite:///a.db", "sqlite:///a.db"),
        ("sqlite:////abs/a.db", "sqlite:////abs/a.db"),
        ("sqlite://", "sqlite://"),
        ("postgresql:///db?host=/tmp&password=pw", "postgresql:///db?host=/tmp&password=***"),
        # libpq's other secrets: SCRAM keys (base64), an OAuth client secret.
        ("postgresql://u@h/db?scram_client_key=Q2xp%2BZW50&scram_server_key=U2Vy",
         "postgresql://u@h/db?scram_client_key=***&scram_server_key=***"),
        ("host=h scram_client_key=Q2xpZW50 scram_server_key='U2Vy dmVy' oauth_client_secret=s3 dbname=x",
         "host=h scram_client_key=*** scram_server_key=*** oauth_client_secret=*** dbname=x"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_a_node_quoting_the_request_path_does_not_leak_a_short_key() -> None:
    url = "http://127.0.0.1:9/v2/SECRETKEY123"
    text = "method not available at /v2/SECRETKEY123 (host 127.0.0.1)"
    assert redact_text(text, url) == "method not available at /v2/*** (host 127.0.0.1)"
    assert "SECRETKEY123" not in redact_text(f"key SECRETKEY123 rejected by {url}", url)


def test_short_path_words_are_not_scrubbed_out_of_ordinary_text() -> None:
    url = "https://rpc.example/eth/0123456789abcdef"
    text = "eth_getLogs failed at /eth/0123456789abcdef"
    assert redact_text(text, url) == "eth_getLogs failed at /***/***"
    assert redact_text("password=hunter2 refused", "host=h password=hunter2") == "password=*** refused"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # Without a scheme, what follows the host is masked as in a whole URL.
        ("eth.example.com/v2/RPCSECRET", "eth.example.com/v2/***"),
        ("mainnet.infura.io/v3/0123456789abcdef0123456789abcdef", "mainnet.infura.io/v3/***"),
        ("not a url RPCSECRET", "***"),
        ("RPCSECRETRPCSECRET", "***"),
        ("0123456789abcdef0123456789abcdef", "***"),  # a key pasted alone
        ("localhost:8545", "localhost:8545"),
        ("anvil:8545", "anvil:8545"),
        ("notaurl", "notaurl"),  # a short lowercase word holds no key
        ("alice:hunter2@eth.example.com/rpc", "alice:***@eth.example.com/rpc"),
        ("e8f1c3a9b2d4@eth.example.com/v2", "***@eth.example.com/v2"),
        ("eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl", "***"),
        ("127.0.0.1:8545/KEY", "127.0.0.1:8545/***"),
        ("HTTPS://eth.example.com/v2/RPCSECRET", "https://eth.example.com/v2/***"),
        # A mistyped scheme shows as written, so that the typo can be seen.
        ("http:/localhost:8545", "http:/localhost:8545"),
        ("http//127.0.0.1:8545/v2/RPCSECRET", "http//127.0.0.1:8545/v2/***"),
        ("ftp://x.example/KEY", "ftp://x.example/***"),
        ("https:/node.example/?apikey=RPCSECRET", "https:/node.example/?apikey=***"),
    ],
)
def test_redact_endpoint(url: str, shown: str) -> None:
    from gapfill.redact import redact_endpoint

    assert redact_endpoint(url) == shown


def test_endpoint_urls_without_a_scheme_are_refused_without_their_key() -> None:
    from gapfill.discover.explorer import ExplorerConfig
    from gapfill.errors import ConfigError
    from gapfill.rpc.config import EndpointConfig

    for make in (EndpointConfig, ExplorerConfig):
        with pytest.raises(ConfigError) as err:
            make("eth.example.com/v2/RPCSECRET0123456789")
        assert "RPCSECRET" not in str(err.value) and "eth.example.com/v2/***" in str(err.value)
    # An explorer's path shows, a short segment too (its key is in the query): the fix quoted
    # has the path as written, a typo in it included.
    with pytest.raises(ConfigError) as err:
        ExplorerConfig("api.example.com/v2/apj?apikey=K3Y")
    shown = "api.example.com/v2/apj?apikey=***"
    assert str(err.value).startswith(f"explorer URL {shown!r} has no scheme: write it as https://{shown}")
    assert EndpointConfig("HTTP://127.0.0.1:8545").url == "HTTP://127.0.0.1:8545"  # not refused


def test_a_message_quoting_a_sqlite_url_keeps_it_as_written() -> None:
    msg = "cannot read the SQLite URL 'sqlite://': write it as sqlite:///path/to/file.db"
    assert redact_text(msg, "sqlite://") == msg


def test_a_comma_separated_rpc_url_is_redacted_url_by_url() -> None:
    # Taken whole, the second URL's host read as a secret path segment of the first, and
    # "the RPC node at http://***/ serves chain 999" hid which endpoint was wrong.
    from gapfill.cli import Ctx
    from gapfill.settings import FileConfig

    ctx = Ctx("sqlite:///x.db", ("http://127.0.0.1:18645/,http://127.0.0.1:18646/v3/SECRETKEY123",),
              None, FileConfig(), 0)  # fmt: skip
    said = redact_text("the RPC node at http://127.0.0.1:18645/ serves chain 999, expected 31337; "
                       "http://127.0.0.1:18646/v3/SECRETKEY123 timed out", *ctx.secrets())  # fmt: skip
    assert said == ("the RPC node at http://127.0.0.1:18645/ serves chain 999, expected 31337; "
                    "http://127.0.0.1:18646/v3/*** timed out")  # fmt: skip


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("localhost:8545", "RPC URL 'localhost:8545' has no scheme: write it as http://localhost:8545"),
        ("127.0.0.1:8545", "RPC URL '127.0.0.1:8545' has no scheme: write it as http://127.0.0.1:8545"),
        ("notaurl", "RPC URL 'notaurl' is not a URL: write it as http(s)://host:port/path"),
        ("http:/localhost:8545", "RPC URL 'http:/localhost:8545' is not an http(s) URL: write it as "
                                 "http://localhost:8545"),
        ("htp://localhost:8545", "RPC URL 'htp://localhost:8545' is not an http(s) URL: write it as "
                                 "http://localhost:8545"),
        ("eth-mainnet.g.alchemy.com/v2/abcDEF123", "RPC URL 'eth-mainnet.g.alchemy.com/v2/***' has no "
                                                   "scheme: write it as https://eth-mainnet.g.alchemy.com/v2/***"),
        ("RPCSECRETRPCSECRET", "RPC URL '***' (hidden: it may hold a key) is not a URL: write it as "
                               "http(s)://host:port/path"),
    ],
)  # fmt: skip
def test_a_malformed_rpc_url_is_named_well_enough_to_fix(url: str, said: str) -> None:
    # It said "RPC URL '***'" or "'localhost:***'" (the error's own redaction masked the
    # port as a path), hiding the typo when there was no key in it to hide.
    from gapfill.cli import Ctx
    from gapfill.errors import ConfigError
    from gapfill.settings import FileConfig

    ctx = Ctx("sqlite:///x.db", (url,), None, FileConfig(), 0)
    with pytest.raises(ConfigError) as err:
        ctx.endpoints()
    shown = redact_text(str(err.value), *ctx.secrets())  # as the CLI's error line is made
    assert shown == f"{said}; check --rpc-url or ETH_RPC_URL"


_KEY = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        (f"https://mainnet.infura.io/v3/{_KEY}", _KEY),
        (f"mainnet.infura.io/v3/{_KEY}", _KEY),
        (f"http:/mainnet.infura.io/v3/{_KEY}", _KEY),
        ("https://eth-mainnet.g.alchemy.com/v2/abcDEF123", "abcDEF123"),
        ("eth-mainnet.g.alchemy.com:443/v2/abcDEF123", "abcDEF123"),
        ("https://api.node.example/rpc?apikey=RPCSECRET", "RPCSECRET"),
        ("api.node.example/rpc?apikey=RPCSECRET", "RPCSECRET"),
        ("https://alice:hunter22@node.example/rpc", "hunter22"),
        ("alice:hunter22@node.example/rpc", "hunter22"),
        ("htp://alice:hunter22@node.example/rpc", "hunter22"),
        (_KEY, _KEY),
        # QA: a key pasted as the query, bare, was printed as written.
        ("http://127.0.0.1:1/?SECRET14", "SECRET14"),
        ("https://node.example/rpc?chain=1&SECRET14&x=2", "SECRET14"),
        (f"https://node.example/rpc?{_KEY}=1", _KEY),
    ],
)
def test_a_key_in_an_rpc_url_is_never_shown_however_it_is_written(url: str, secret: str) -> None:
    from gapfill.cli import Ctx
    from gapfill.errors import ConfigError
    from gapfill.redact import redact_endpoint
    from gapfill.settings import FileConfig

    assert secret not in redact_endpoint(url)
    assert secret not in redact_url(url)
    assert redact_text(f"{url} refused {secret}", url) == f"{redact_url(url)} refused ***"
    ctx = Ctx("sqlite:///x.db", (url,), None, FileConfig(), 0)
    try:
        ctx.endpoints()
    except ConfigError as exc:
        assert secret not in redact_text(str(exc), *ctx.secrets())


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # Without a colon: a key before an '@', a query pasted bare, a key-like segment go;
        # a file path or a host shows as written (it may be a --db file).
        ("mykey@host", "***@host"),
        ("host/path?key", "host/path?***"),
        ("host/path?apikey=RPCSECRET&chain=1", "host/path?apikey=***&chain=1"),
        ("data/0123456789abcdef0123456789abcdef/x", "data/***/x"),
        ("e8f1c3a9b2d4@eth.example.com/v2", "***@eth.example.com/v2"),
        ("node.example.com/rpc?apikey=RPCSECRET", "node.example.com/rpc?apikey=***"),
        ("some/path/my_gapfill_database.db", "some/path/my_gapfill_database.db"),
        ("backups/gapfill.db", "backups/gapfill.db"),
        ("node.example.com", "node.example.com"),
        ("localhost", "localhost"),
    ],
)
def test_a_string_without_a_colon_masks_what_looks_like_a_key(url: str, shown: str) -> None:
    # Such strings were returned untouched, keys and all.
    assert redact_url(url) == shown


_PW = "s3cretPW"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"postgres:{_PW}@host/db", "postgres:***@host/db"),
        (f"postgresql:user:{_PW}@host/db", "postgresql:user:***@host/db"),
        (f"postgres:/user:{_PW}@host/db", "postgres:/user:***@host/db"),
        (f"postgres//user:{_PW}@host/db", "postgres//user:***@host/db"),
        (f"postgresql://user:{_PW}@host", "postgresql://user:***@host"),
        (f"user:{_PW}@host:5432/gapfill_db", "user:***@host:5432/gapfill_db"),
        (f"user:{_PW}@host/db?sslmode=require", "user:***@host/db?sslmode=require"),
        (f"host=h password={_PW} dbname=x", "host=h password=*** dbname=x"),
        (f"postgresql://u@h/db?sslmode=require&password={_PW}", "postgresql://u@h/db?sslmode=require&password=***"),
        (f"postgres:{_PW}@host/db?password={_PW}", "postgres:***@host/db?password=***"),
        (f"host:5432/db?password={_PW}", "host:5432/db?password=***"),
        (f"postgresql://u:pa/{_PW}@h/db", "postgresql://u:***@h/db"),
        (f"postgresql://u:pa?{_PW}@h/db", "postgresql://u:***@h/db"),
        # An '@' in the query is the query's: the host, database and query were masked with
        # the password ("postgresql://u:***@c"), or the query's "a:b@" taken for credentials.
        (f"postgresql://u:{_PW}@h/db?options=-c%20x=a:b@c", "postgresql://u:***@h/db?options=-c%20x=a:b@c"),
        ("postgresql://u@h/db?options=a:b@c", "postgresql://u@h/db?options=a:b@c"),
        (f"postgresql://u:pa?{_PW}@h/db?application_name=x@y", "postgresql://u:***@h/db?application_name=x@y"),
        (f"postgresql://u:{_PW}@h/db?sslmode=require&password={_PW}@x",
         "postgresql://u:***@h/db?sslmode=require&password=***"),
        # A '?' and a libpq parameter's name in the password, an '@' after: libpq reads the
        # userinfo up to the '@'; the query was taken to start at the '?', and the rest of
        # the password shown ("postgresql://u:ab?sslmode=s3cretPW@h/db").
        (f"postgresql://u:ab?sslmode={_PW}@h/db", "postgresql://u:***@h/db"),
        (f"postgresql://u:ab?password={_PW}@h/db?sslmode=require", "postgresql://u:***@h/db?sslmode=require"),
        (f"postgres:ab?host={_PW}@h/db", "postgres:***@h/db"),
        (f"u:a#b/c?user={_PW}@h:5432/db", "u:***@h:5432/db"),
        ("postgresql://h:5432/db?options=a@b", "postgresql://h:5432/db?options=a@b"),
        # An '@' before and after a '?' and a libpq parameter's name: libpq reads password
        # "ab", host "cd" and a parameter "...@h/db", but the password may be all up to the
        # last '@', and "cd" and the parameter were shown ("postgresql://u:***@cd?sslmode=...").
        (f"postgresql://u:ab@cd?sslmode={_PW}@h/db", "postgresql://u:***@h/db"),
        (f"postgresql://u:ab@{_PW}?application_name=x@h:5432/db", "postgresql://u:***@h:5432/db"),
        (f"postgres:ab@{_PW}?host=x@h/db", "postgres:***@h/db"),
        (f"u:ab@{_PW}:6432?port=x@h:5432/db", "u:***@h:5432/db"),
        ("postgresql://u@cd?application_name=x@y", "postgresql://u@cd?application_name=x@y"),  # no password
        ("postgresql://bob@db.example:6432/app", "postgresql://bob@db.example:6432/app"),
        ("sqlite:///data/gapfill.db", "sqlite:///data/gapfill.db"),
        ("data/gapfill.db", "data/gapfill.db"),
    ],
)  # fmt: skip
def test_a_database_password_is_masked_however_the_url_is_written(url: str, shown: str) -> None:
    # `postgres:pw@host/db` and the like were shown with their password, and scheme-less
    # ones had their database name masked as if it were an RPC key.
    from gapfill.cli import Ctx
    from gapfill.redact import DbUrl, redact_db_url
    from gapfill.settings import FileConfig

    assert redact_db_url(url) == shown
    assert redact_url(DbUrl(url)) == shown
    ctx = Ctx(url, (), None, FileConfig(), 0)
    said = redact_text(f"cannot use {url}: {_PW} refused", *ctx.secrets())
    assert said == f"cannot use {shown}: {'***' if _PW in url else _PW} refused"


@pytest.mark.parametrize(
    ("url", "said"),
    [
        (f"postgres:{_PW}@127.0.0.1/db", "'postgres:***@127.0.0.1/db' is not a PostgreSQL URL: write it "
                                         "as postgresql://postgres:***@127.0.0.1/db in --db / GAPFILL_DB"),
        (f"postgresql:user:{_PW}@h/db", "'postgresql:user:***@h/db' is not a PostgreSQL URL: write it as "
                                        "postgresql://user:***@h/db in --db / GAPFILL_DB"),
        (f"user:{_PW}@h:5432/gapfill_db", "'user:***@h:5432/gapfill_db' is not a PostgreSQL URL: write it "
                                          "as postgresql://user:***@h:5432/gapfill_db in --db / GAPFILL_DB"),
        ("postgres:localhost:5432/db", "'postgres:localhost:5432/db' is not a PostgreSQL URL: write it as "
                                       "postgresql://localhost:5432/db in --db / GAPFILL_DB"),
        (f"postgresql://u:pa/{_PW}@h/db", "the password in --db / GAPFILL_DB contains '/': write it as %2F "
                                          "in the URL"),
        (f"postgresql://u:p?s@{_PW}@h/db", "the password in --db / GAPFILL_DB contains '@' and '?': write it "
                                          "as %40 and %3F in the URL"),
        # The authority ends at the first '/': libpq would take "Wr@ng" for user, password and
        # host, and say "could not connect to ... at ng", a piece of the password.
        ("postgresql://u:Wr@ng/Pw77@127.0.0.1/postgres", "the password in --db / GAPFILL_DB contains '@' "
                                                         "and '/': write it as %40 and %2F in the URL"),
        ("postgresql://u:12/34@h/db", "the password in --db / GAPFILL_DB contains '/': write it as %2F in "
                                      "the URL"),
        # libpq read the password as "ab", the host as "cd" and quoted the rest as sslmode's.
        (f"postgresql://u:ab@cd?sslmode={_PW}@h/db",
         "the password in --db / GAPFILL_DB contains '@' and '?' (or its query an '@'): write it as %40 and "
         "%3F in the URL"),
        (f"postgresql://u:ab@cd#{_PW}@h/db",
         "the password in --db / GAPFILL_DB contains '@' and '#': write it as %40 and %23 in the URL"),
        # libpq said "invalid percent-encoded token" and nothing of what to do.
        (f"postgresql://u:SEC%RET{_PW}@h/db", "the password in --db / GAPFILL_DB contains '%': write it "
                                             "as %25 in the URL"),
        (f"postgresql://u%:{_PW}@h/db", "the user name in --db / GAPFILL_DB contains '%': write it as %25 "
                                        "in the URL"),
        # A bare path was said as an "unsupported database URL scheme 'gapfill.db'".
        ("gapfill.db", "'gapfill.db' is not a database URL: write it as sqlite:///gapfill.db in --db / "
                       "GAPFILL_DB for a SQLite file (or postgresql://user@host:5432/dbname)"),
        (f"h:5432/db?password={_PW}", "unsupported database URL scheme 'h:5432/db?password=***' in --db / "
                                      "GAPFILL_DB: use sqlite:///path/to/file.db or "
                                      "postgresql://user@host:5432/dbname"),
    ],
)  # fmt: skip
def test_a_malformed_database_url_is_refused_without_its_password(url: str, said: str) -> None:
    # libpq quoted `postgres:pw@host/db` whole ("missing '=' after ..."), password and all.
    from gapfill.cli import Ctx
    from gapfill.errors import ConfigError
    from gapfill.settings import FileConfig
    from gapfill.store import open_store

    ctx = Ctx(url, (), None, FileConfig(), 0)
    with pytest.raises(ConfigError) as err:
        open_store(url)
    assert str(err.value) == said
    assert redact_text(str(err.value), *ctx.secrets()) == said


@pytest.mark.parametrize(
    "db",
    [
        "postgresql://postgres:ab?sslmode=NASTYpw1@127.0.0.1:1/db",
        "postgresql://postgres:ab?password=NASTYpw1@127.0.0.1:1/db?sslmode=disable",
        "postgres:ab?host=NASTYpw1@127.0.0.1:1/db",
        "postgresql://postgres:a#NASTYpw1@127.0.0.1:1/db",
        "postgresql://postgres:a/NASTYpw1@127.0.0.1:1/db",
        "postgresql://postgres:a@NASTYpw1@127.0.0.1:1/db",
        "postgresql://postgres@127.0.0.1:1/db?password=NASTYpw1",
        "host=127.0.0.1 port=1 password=NASTYpw1 dbname=db",
    ],
)
@pytest.mark.parametrize(
    "rpc",
    [
        "http://127.0.0.1:1/?apikey=NASTYkey2",
        "http://127.0.0.1:1/v3/NASTYkey2",
        "http://user:NASTYkey2@127.0.0.1:1/",
    ],
)
@pytest.mark.parametrize("command", [["status"], ["runs"], ["enrich"], ["discover"]])
def test_no_command_shows_a_password_or_key_at_any_verbosity(db: str, rpc: str, command: list[str]) -> None:
    # Each fails (no server at port 1): its sentence and its -vv log lines name neither secret.
    from click.testing import CliRunner

    from gapfill.cli import cli

    result = CliRunner().invoke(cli, ["-vv", "--config", "", "--db", db, "--rpc-url", rpc, *command])
    said = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code != 0
    assert "NASTY" not in said, said


@pytest.mark.parametrize(
    ("text", "url", "said"),
    [
        # A node quotes the request path as aiohttp encoded it.
        ("no route for POST /v2/Key%5ECaret%7CPipe1", "http://h/v2/Key^Caret|Pipe1",
         "no route for POST /v2/***"),
        ("no route for POST /v2/%d0%ba%d0%bb%d1%8e%d1%8712345", "http://h/v2/ключ12345",
         "no route for POST /v2/***"),
        # ... and a query half re-encoded (%2F decoded, %2B kept), or a key quoted alone.
        ("no route for POST /?apikey=Key%2BPlus/slash1", "http://h/?apikey=Key%2BPlus%2Fslash1",
         "no route for POST /?apikey=***"),
        ("key Key%2BPlus%2Fslash1 refused", "http://h/?apikey=Key%2BPlus%2Fslash1", "key *** refused"),
        ("key Key+With+Space1 refused", "http://h/?apikey=Key%20With%20Space1", "key *** refused"),
        # A driver quotes the password it decoded, or a key given alone shows encoded.
        ("password p@ss:w0rd refused", DbUrl("postgresql://u:p%40ss%3Aw0rd@h/db"), "password *** refused"),
        ("apikey=Key%2bWith+Space1", Secret("Key+With Space1"), "apikey=***"),
    ],
)  # fmt: skip
def test_a_secret_is_scrubbed_however_a_message_encodes_it(text: str, url: str, said: str) -> None:
    # Only the form given was scrubbed: "no route for POST /v2/Key%5ECaret%7CPipe1".
    assert redact_text(text, url) == said


@pytest.fixture
def echoing_node() -> Iterator[str]:
    """A loopback "node" that answers every request 404, quoting its request target as
    received (percent-encoded by the client), as many gateways do; yields its base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = f"no route for POST {self.path}".encode()
            self.send_response(404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    with loopback(Handler) as url:
        yield url


@pytest.mark.parametrize(
    ("path", "pieces"),
    [
        ("/v2/Key^Caret|Pipe1", ["Caret", "Pipe1"]),
        ("/v2/ключ12345", ["12345", "%D0%BA"]),
        ("/?apikey=Key%2BPlus%2Fslash1", ["Plus", "slash1"]),
        # A key too short to scrub out of free text, where the node quotes it in its target.
        ("/rpc?apikey=k7&chain=1", ["k7"]),
    ],
)
def test_a_node_quoting_the_request_target_shows_no_key(echoing_node: str, sqlite_url: str, path: str,
                                                        pieces: list[str]) -> None:  # fmt: skip
    # It said "HTTP 404 no route for POST /v2/Key%5ECaret%7CPipe1" (at .../v2/***).
    from click.testing import CliRunner

    from gapfill.cli import cli

    url = echoing_node + path
    result = CliRunner().invoke(cli, ["--config", "", "--db", sqlite_url, "--rpc-url", url, "contract", "add",
                                      "0x" + "ab" * 20])  # fmt: skip
    said = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code != 0 and "HTTP 404 no route for POST /" in said, said
    assert not [p for p in pieces if p in said], said


@pytest.mark.parametrize(
    "db",
    [
        "postgresql://postgres:Secret@127.0.0.1:1?sslmode=Word1@127.0.0.1:1/db",
        "postgresql://postgres:Secret@127.0.0.1:1?port=Word1@127.0.0.1:1/db",
        "postgresql://postgres:Secret@127.0.0.1:1?application_name=Word1@127.0.0.1:1/db",
    ],
)
def test_a_password_libpq_would_cut_at_an_at_before_its_query_never_shows(db: str) -> None:
    # libpq read "Secret" as the password and the rest as a parameter, which it quoted:
    # 'invalid integer value "Word1@127.0.0.1:1/db" for connection option "port"'.
    from click.testing import CliRunner

    from gapfill.cli import cli

    result = CliRunner().invoke(cli, ["-vv", "--config", "", "--db", db, "status"])
    said = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code != 0
    assert "Secret" not in said and "Word1" not in said, said
    assert "contains '@' and '?' (or its query an '@'): write it as %40 and %3F" in said, said


def test_a_password_cut_at_an_at_before_its_query_never_shows_from_a_real_server(pg_url: str) -> None:
    # The server took "Secret" (trust) and gapfill said "the database postgresql://postgres:***@
    # 127.0.0.1:5432?application_name=Word1@127.0.0.1:5432/... has no gapfill schema yet".
    from urllib.parse import urlsplit

    from click.testing import CliRunner

    from gapfill.cli import cli

    where = urlsplit(pg_url)
    host = where.netloc.rpartition("@")[2]
    db = f"postgresql://postgres:Secret@{host}?application_name=Word1@{host}{where.path}"
    result = CliRunner().invoke(cli, ["--config", "", "--db", db, "status"])
    said = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code != 0
    assert "Secret" not in said and "Word1" not in said, said


@pytest.mark.parametrize(
    ("text", "url", "said"),
    [
        # A key too short to scrub out of free text, where a node quotes the request target.
        ("no route for POST /rpc?apikey=k7&chain=1", "http://h/rpc?apikey=k7&chain=1",
         "no route for POST /rpc?apikey=***&chain=1"),
        ("no route for POST /?k7", "http://h/?k7", "no route for POST /?***"),
        ("no route for POST /v2/k%5E", "http://h/v2/k^", "no route for POST /v2/***"),
        # Elsewhere it stays: masking every "to" mangles the words, and the masks spell it out.
        ("connection to server failed", DbUrl("postgresql://u:to@h/db"), "connection to server failed"),
        ("connection to server failed", Secret("to"), "connection to server failed"),
    ],
)  # fmt: skip
def test_a_short_secret_is_masked_where_its_url_shows(text: str, url: str, said: str) -> None:
    assert redact_text(text, url) == said


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:Qz@h/db", "postgresql://u:Q@h:5432/db?sslmode=require", "postgres:Qz@h/db",
        "postgresql:u:Qz@h/db", "u:Qz@h:5432/db", "postgresql://u@h/db?password=Qz",
        "host=h password=Qz dbname=x", "postgresql://u:Qz@/db?host=/tmp", "postgresql://u:Q%40@h/db",
        "https://u:Qz@h.example/rpc", "https://Qz@h.example/rpc", "https://h.example/v2/Qz",
        "https://h.example/rpc?apikey=Qz", "https://h.example/rpc?Qz", "h.example/v2/Qz", "Qz@h.example/rpc",
    ],
)  # fmt: skip
def test_a_short_secret_never_shows_in_its_url(url: str) -> None:
    from gapfill.redact import DbUrl, redact_endpoint

    assert "Q" not in redact_url(url)
    if url.startswith("http") or "." in url.partition("/")[0]:
        assert "Q" not in redact_endpoint(url)
    assert "Q" not in redact_text(f"cannot use {url}", DbUrl(url) if "h.example" not in url else url)


@pytest.mark.parametrize(
    ("url", "shown", "chars"),
    [
        # A '?', '#' or '/' as is in a password: urlsplit read the password's start as the
        # port, and "http://user:Qaa?***", "http://user:Qaa", "http://user:Qaa/***/***" showed it.
        ("http://user:Qaa?Qss@host/v3/KEY", "http://user:***@host/v3/***", "'?': write it as %3F"),
        ("http://user:Qaa#Qss@host/x", "http://user:***@host/***", "'#': write it as %23"),
        ("http://user:Qaa/Qss@host/x", "http://user:***@host/***", "'/': write it as %2F"),
        ("https://:Qaa?Q/s@node.example:8545/rpc", "https://:***@node.example:8545/rpc",
         "'/' and '?': write them as %2F and %3F"),
        ("http://u:Qaa?Qs@[::1]:8545/", "http://u:***@[::1]:8545/", "'?': write it as %3F"),
        # One the password starts with: the port urlsplit read was empty, and
        # "http://user:?Qss@host/x" showed whole (the password in its query), the others
        # as "http://user:" and "http://user:/***/***", and no error said why.
        ("http://user:?Qss@host/x", "http://user:***@host/***", "'?': write it as %3F"),
        ("http://user:#Qss@host/x", "http://user:***@host/***", "'#': write it as %23"),
        ("http://user:/Qss@host/x", "http://user:***@host/***", "'/': write it as %2F"),
        ("https://:?QQ/s@node.example:8545/rpc", "https://:***@node.example:8545/rpc",
         "'/' and '?': write them as %2F and %3F"),
        # A key before the '@' (no password): urlsplit read its start as the host, and
        # "https://QQQQQQQQ12345678?***", "https://QQ$ab/***/rpc" showed it.
        ("https://QQQQQQQQ12345678?s@node.example/rpc", "https://***@node.example/rpc",
         "'?': write it as %3F"),
        ("https://QQ$ab/Qcd+ef0123==@node.example/rpc", "https://***@node.example/rpc",
         "'/': write it as %2F"),
        ("http://?QQ@[::1]:8545/", "http://***@[::1]:8545/", "'?': write it as %3F"),
        ("https://user:Q@?QQ@node.example:8545/v2/QQQQQQQQ12345678", "https://user:***@node.example:8545/v2/***",
         "'?': write it as %3F"),
        ("https://Q=#@127.0.0.1/v2/QQQQQQQQ12345678?x=a:b@c&apikey=QQQQQQ", "https://***@***",
         "'/' and '?' and '#': write them as %2F and %3F and %23"),
        # With an '@' in the query too, the password may run to it: more is masked, never less.
        ("http://u:Qaa?Qs@host:8545/rpc?to=a@b", "http://u:***@b", "'/' and '?': write them as %2F and %3F"),
        # ... and what follows that '@' is no host: it may hold the query's key.
        ("http://u:Qaa?Qs@host/rpc?to=a@b&apikey=QQQQQQQQ", "http://u:***@***",
         "'/' and '?': write them as %2F and %3F"),
    ],
)  # fmt: skip
def test_a_password_with_a_delimiter_written_as_is_never_shows(url: str, shown: str, chars: str) -> None:
    from gapfill.cli import Ctx
    from gapfill.errors import ConfigError
    from gapfill.redact import redact_endpoint, secrets_of
    from gapfill.settings import FileConfig

    assert redact_url(url) == shown
    assert redact_endpoint(url) == shown
    port = ": the port Qaa is not a number" if ":Qaa" in url else ""  # what urlsplit read as one
    assert "Q" not in redact_text(f"cannot reach {url}{port}", url), secrets_of(url)
    ctx = Ctx("sqlite:///x.db", (url,), None, FileConfig(), 0)
    with pytest.raises(ConfigError) as err:
        ctx.endpoints()
    said = redact_text(str(err.value), *ctx.secrets())  # as the CLI's error line is made
    what = "password" if re.match(r"https?://[^/?#]*:", url) else "key before the '@'"
    assert said == f"the {what} in RPC URL {shown!r} contains {chars} in --rpc-url or ETH_RPC_URL"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # A port of digits is a port: an '@' in the query is the query's.
        ("http://host:8545/path?to=a@b", "http://host:8545/***?to=a@b"),
        ("http://[::1]:8545/?to=a@b", "http://[::1]:8545/?to=a@b"),
        ("https://node.example?to=a@b", "https://node.example?to=a@b"),
        ("http://anvil/x?to=a@b", "http://anvil/***?to=a@b"),
        ("http://[::1]/?to=a@b", "http://[::1]/?to=a@b"),
        ("https://node-1.example/rpc?to=a@b&apikey=Qsecret", "https://node-1.example/rpc?to=a@b&apikey=***"),
        ("http://user:pw@host:8545/rpc", "http://user:***@host:8545/rpc"),
        # A password of digits then a '?' reads as that port: the rest, read as a query's
        # name holding an '@' (which no name does), showed ("http://user:12?QQ@node...").
        ("http://user:12?QQ@node.example:8545/v2?apikey=Qsecret", "http://user:12?***=***"),
        # A port that is not one, with no '@' after it, may be a password: masked.
        ("http://host:85x45/rpc", "http://host:***/rpc"),
        ("http://user:Qsecret/rpc", "http://user:***/rpc"),
    ],
)
def test_a_url_with_an_at_after_its_authority_keeps_its_host(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    if "Q" in url:
        assert "Q" not in redact_text(f"{url} said Qsecret", url)


def test_the_cli_never_shows_a_password_with_a_delimiter_written_as_is(tmp_path: object) -> None:
    from click.testing import CliRunner

    from gapfill.cli import cli

    db = f"sqlite:///{tmp_path}/x.db"
    runner = CliRunner()
    assert runner.invoke(cli, ["--config", "", "--db", db, "contract", "add", "0x" + "ab" * 20,
                               "--chain-id", "1"]).exit_code == 0  # fmt: skip
    for command in (["enrich"], ["discover"], ["status"]):
        for rpc in ("http://user:QQpw?QQrest@127.0.0.1:1/", "http://user:QQpw#QQrest@127.0.0.1:1/"):
            result = runner.invoke(cli, ["-vv", "--config", "", "--db", db, "--rpc-url", rpc, *command])
            assert "QQ" not in result.output, result.output
            assert "the password in RPC URL 'http://user:***@127.0.0.1:1/' contains" in result.stderr
            assert "Traceback" not in result.output, result.output


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # Explorer APIs take their key in the query: the path shows, so that a typo in it can
        # be seen (it showed as /v2/***, the very segment mistyped).
        ("http://127.0.0.1:33543/v2/apj", "http://127.0.0.1:33543/v2/apj"),
        ("https://api.example.io/wrong/api?chainid=1&apikey=WRONGKEYZZ",
         "https://api.example.io/wrong/api?chainid=1&apikey=***"),
        ("https://api.routescan.io/v2/network/mainnet/evm/43114/etherscan/api",
         "https://api.routescan.io/v2/network/mainnet/evm/43114/etherscan/api"),
        # A segment as long as a key is one pasted in the wrong place: masked still.
        ("https://api.example.io/v2/api/ABCDEFGH12345678ABCD", "https://api.example.io/v2/api/***"),
        # So is a shorter token mixing letters and digits (a self-hosted proxy's): it showed whole.
        ("http://127.0.0.1:18777/k/Xy7pQ2rT9sLm4/api", "http://127.0.0.1:18777/k/***/api"),
        ("https://u:pw@api.example.io/api", "https://u:***@api.example.io/api"),
    ],
)
def test_an_explorer_url_shows_its_path(url: str, shown: str) -> None:
    from gapfill.redact import ExplorerUrl

    assert redact_url(ExplorerUrl(url)) == shown
    # Nor is a path segment scrubbed out of a message that quotes the URL or its path.
    assert redact_text(f"at {url}: 404 for {url.partition('//')[2].partition('/')[2]}", ExplorerUrl(url)) == (
        f"at {shown}: 404 for {shown.partition('//')[2].partition('/')[2]}")
    # An RPC URL's path keeps its rule: /v3/KEY paths are real.
    assert redact_url("http://127.0.0.1:33543/v2/apj") == "http://127.0.0.1:33543/v2/***"
