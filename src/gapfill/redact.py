"""Keep secrets in URLs out of every message.

RPC URLs often carry an API key in the path (``/v2/<key>``) or the query
(``?apikey=...``); database URLs carry passwords. Anything that prints or logs a
URL goes through :func:`redact_url`, and :func:`redact_text` scrubs known
secrets out of free text such as driver error messages.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus, urlsplit, urlunsplit

MASK = "***"

# Query values that look like keys: long runs of letters/digits/-/_ .
_KEYLIKE_SEGMENT = re.compile(r"^[A-Za-z0-9_\-]{16,}$")
# The only path segments of an RPC URL shown as they are: versions and a few words no
# provider uses as a key. Any other segment may be a key, whatever its length
# (``/v2/SECRETKEY123``), so it is masked.
_PLAIN_SEGMENT = re.compile(r"^(|v\d+(\.\d+)?|rpc|api|jsonrpc|http|https|ws|ext|evm)$", re.IGNORECASE)
# A masked path segment is also scrubbed out of free text when at least this long:
# shorter ones ("eth", "bsc") would mangle ordinary words; the whole path is scrubbed too.
_MIN_SCRUBBED_SEGMENT = 6
# What after a path would make it a longer one (a sentence's full stop would not).
_PATH_GOES_ON = r"(?![A-Za-z0-9_~%\-])"
# libpq keyword/value connection strings: ``password=...``.
_DSN_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
# A host name or address, with an optional port (a one-word host only with one: `anvil:8545`):
# what a URL without a scheme may show.
_HOST = re.compile(
    r"^((localhost|\[[0-9a-fA-F:.]+\]|(\d{1,3}\.){3}\d{1,3}|([a-zA-Z0-9-]+\.)+[a-zA-Z]{2,})(:\d{1,5})?"
    r"|[a-zA-Z][a-zA-Z0-9-]*:\d{1,5})$"
)
# A scheme written wrong before a host: `http:/host`, `http//host`, `http:host`.
_MISTYPED_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)(:/*|/+)(.+)$", re.DOTALL)
# What a value that is not a URL at all may show: a short lowercase word ("notaurl"). Keys
# have digits, capitals or length; such a value is hidden whole.
_PLAIN_WORD = re.compile(r"^[a-z][a-z._\-]{0,14}$")
_SECRET_QUERY_NAMES = re.compile(r"(key|token|secret|auth|pass|pwd|sig)", re.IGNORECASE)


def is_keyword_dsn(url: str) -> bool:
    """A libpq ``key=value`` connection string rather than a URL."""
    return "://" not in url and "=" in url


def _is_db(scheme: str) -> bool:
    """A database URL's path is a database name, not a secret."""
    return scheme.lower().startswith(("postgres", "sqlite"))


def _masked_segments(path: str) -> list[str]:
    return [s for s in path.split("/") if not _PLAIN_SEGMENT.match(s)]


def redact_url(url: str) -> str:
    """Return ``url`` with its password, path segments (but versions) and secret query values masked.

    A string that is not a URL but a libpq ``key=value`` connection string keeps its
    keywords, with the password masked. One with a missing or mistyped scheme
    (``localhost:8545``) is shown as :func:`redact_endpoint` shows it.
    """
    if is_keyword_dsn(url):
        return _DSN_PASSWORD.sub(lambda m: m.group(1) + MASK, url)
    if ":" not in url:  # a bare file path (a mistyped --db): nothing secret in it
        return url
    if "://" not in url and not _is_db(url.partition(":")[0]):
        return redact_endpoint(url)
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    netloc = parts.netloc
    is_db = _is_db(parts.scheme)
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        if ":" in userinfo:
            netloc = f"{user}:{MASK}@{hostport}"
        elif not is_db:  # https://KEY@host: a bare userinfo on an RPC URL is a key
            netloc = f"{MASK}@{hostport}"
    segments = [
        MASK if not is_db and not _PLAIN_SEGMENT.match(s) else s for s in parts.path.split("/")
    ]
    path = "/".join(segments)
    query = "&".join(_redact_query_piece(piece, is_db) for piece in parts.query.split("&")) \
        if parts.query else ""
    if not netloc and url[len(parts.scheme) + 1 :].startswith("//"):
        # urlunsplit drops an empty authority: sqlite:///a.db would come back as sqlite:/a.db
        # and every message quoting the URL would show a form that does not work.
        return f"{parts.scheme}://{path}" + (f"?{query}" if query else "")
    return urlunsplit((parts.scheme, netloc, path, query, ""))


def _query_secrets(piece: str, is_db: bool) -> tuple[bool, bool]:
    """Of one ``name=value`` (or bare ``token``) of a query: whether its name, and whether
    its value, may be a secret. On an RPC URL a bare token is a key pasted as the query
    (``?KEY``), and so is a key-like name."""
    name, eq, value = piece.partition("=")
    name, value = unquote_plus(name), unquote_plus(value)
    if not eq:
        return (not is_db and bool(name)), False
    name_secret = not is_db and bool(_KEYLIKE_SEGMENT.match(name))
    value_secret = bool(value) and bool(_SECRET_QUERY_NAMES.search(name) or _KEYLIKE_SEGMENT.match(value))
    return name_secret, value_secret


def _redact_query_piece(piece: str, is_db: bool) -> str:
    name_secret, value_secret = _query_secrets(piece, is_db)
    if name_secret:
        return MASK if "=" not in piece else f"{MASK}={MASK}"
    if value_secret:
        return f"{piece.partition('=')[0]}={MASK}"
    return piece


def _host_of(rest: str) -> str:
    """The ``host:port`` that ``rest`` (a URL after its scheme) starts with."""
    authority = re.split(r"[/?#\s]", rest, maxsplit=1)[0]
    return authority.rpartition("@")[2]  # user:password@ or KEY@ before a host


def _split_scheme(url: str) -> tuple[str, str] | None:
    """A URL without ``scheme://`` but with a host, as (what stands for its scheme, the
    rest from the host on): ``("", "localhost:8545")``, ``("http:/", "localhost:8545")``;
    None when no host can be told."""
    if _HOST.match(_host_of(url)):
        return "", url
    m = _MISTYPED_SCHEME.match(url)
    if m and _HOST.match(_host_of(m.group(3))):
        return m.group(1) + m.group(2), m.group(3)
    return None


def _redact_rest(rest: str) -> str:
    """``host:port/path?query`` redacted as the same after ``http://`` would be."""
    return redact_url("http://" + rest).removeprefix("http://")


def redact_endpoint(url: str) -> str:
    """An RPC or explorer URL as a message may show it: scheme, host and port as written,
    the rest as :func:`redact_url` shows it. Not being an http(s) URL is the usual reason to
    show one: without a host to tell (a key pasted alone, say), only a short lowercase word
    is shown, anything else is hidden whole."""
    if "://" in url:
        return redact_url(url)
    split = _split_scheme(url)
    if split is not None:
        return split[0] + _redact_rest(split[1])
    return url if _PLAIN_WORD.match(url) else MASK


def not_http_problem(url: str) -> str:
    """What is wrong with ``url``, which is not an http(s) URL, and how to write it, in a
    sentence's words (``'localhost:8545' has no scheme: write it as http://localhost:8545``)."""
    shown = redact_endpoint(url)
    scheme, sep, after = url.partition("://")
    split = _split_scheme(url) if not sep else (scheme + sep, after) if _HOST.match(_host_of(after)) else None
    if split is None:
        if sep:
            return f"{shown!r} is not an http(s) URL: write it as http(s)://host:port/path"
        hidden = " (hidden: it may hold a key)" if shown == MASK else ""
        return f"{shown!r}{hidden} is not a URL: write it as http(s)://host:port/path"
    written, rest = split
    # The scheme meant, if it shows; else a node on this machine or network is served over
    # http, a provider's over https.
    host = urlsplit("http://" + rest).hostname or ""
    local = "." not in host or host.replace(".", "").isdigit() or ":" in host
    meant = written.lower()
    if meant.startswith(("https", "wss")):
        scheme = "https"
    else:
        scheme = "http" if local or meant.startswith(("http", "ws")) else "https"
    fixed = f"{scheme}://{_redact_rest(rest)}"
    if not written:
        return f"{shown!r} has no scheme: write it as {fixed}"
    return f"{shown!r} is not an http(s) URL: write it as {fixed}"


def secrets_of(url: str) -> list[str]:
    """The substrings of ``url`` that :func:`redact_url` would hide (path segments too
    short to scrub out of free text on their own are left out: see :func:`redact_text`)."""
    found: list[str] = []
    if is_keyword_dsn(url):
        return [m.group(2).strip("'") for m in _DSN_PASSWORD.finditer(url)]
    if ":" not in url:
        return []
    if "://" not in url and not _is_db(url.partition(":")[0]):
        split = _split_scheme(url)
        if split is None:
            return [] if _PLAIN_WORD.match(url) else [url]
        return secrets_of("http://" + split[1])
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    if parts.password:
        found.append(parts.password)
    is_db = _is_db(parts.scheme)
    for piece in parts.query.split("&") if parts.query else ():
        name_secret, value_secret = _query_secrets(piece, is_db)
        name, _, value = (unquote_plus(x) for x in piece.partition("="))
        if name_secret:
            found.append(name)
            if value and len(value) >= _MIN_SCRUBBED_SEGMENT:
                found.append(value)
        elif value_secret:
            found.append(value)
    if is_db:
        return found
    if "@" in parts.netloc and ":" not in parts.netloc.rpartition("@")[0]:
        found.append(parts.netloc.rpartition("@")[0])
    found.extend(s for s in _masked_segments(parts.path) if len(s) >= _MIN_SCRUBBED_SEGMENT)
    return found


def redact_text(text: str, *urls: str) -> str:
    """Replace every secret of ``urls`` (and the raw URLs and RPC paths themselves) inside ``text``.

    A node's own error message may quote the request path (``/v2/KEY``) without the
    host: the path is replaced whole, whatever its segments' length.
    """
    for url in urls:
        if not url:
            continue
        text = text.replace(url, redact_url(url))
        try:
            parts = urlsplit(url)
        except ValueError:
            parts = None
        if parts is not None and "://" in url and not _is_db(parts.scheme) and _masked_segments(parts.path):
            shown = urlsplit(redact_url(url)).path.rstrip("/")
            # Only the path itself, not one that goes on: `/db` is in "5432/dbname".
            whole = re.escape(parts.path.rstrip("/")) + _PATH_GOES_ON
            text = re.sub(whole, shown.replace("\\", "\\\\"), text)
        for secret in secrets_of(url):
            if len(secret) >= 3:
                text = text.replace(secret, MASK)
    return text
