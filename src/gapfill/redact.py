"""Keep secrets in URLs out of every message.

RPC URLs often carry an API key in the path (``/v2/<key>``) or the query
(``?apikey=...``); database URLs carry passwords. Anything that prints or logs a
URL goes through :func:`redact_url`, and :func:`redact_text` scrubs known
secrets out of free text such as driver error messages.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

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
# libpq keyword/value connection strings: ``password=...``.
_DSN_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
# A host name or address, with an optional port: what a URL without a scheme may show.
_HOST = re.compile(
    r"^(localhost|\[[0-9a-fA-F:.]+\]|(\d{1,3}\.){3}\d{1,3}|([a-zA-Z0-9-]+\.)+[a-zA-Z]{2,})(:\d{1,5})?$"
)
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
    keywords, with the password masked.
    """
    if is_keyword_dsn(url):
        return _DSN_PASSWORD.sub(lambda m: m.group(1) + MASK, url)
    if ":" not in url:  # a bare file path (a mistyped --db): nothing secret in it
        return url
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
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, MASK if _SECRET_QUERY_NAMES.search(k) or _KEYLIKE_SEGMENT.match(v) else v)
             for k, v in pairs],
            safe="*",
        )
    if not netloc and url[len(parts.scheme) + 1 :].startswith("//"):
        # urlunsplit drops an empty authority: sqlite:///a.db would come back as sqlite:/a.db
        # and every message quoting the URL would show a form that does not work.
        return f"{parts.scheme}://{path}" + (f"?{query}" if query else "")
    return urlunsplit((parts.scheme, netloc, path, query, ""))


def redact_endpoint(url: str) -> str:
    """An RPC or explorer URL as a message may show it. Not being an http(s) URL is the
    usual reason to show one, so anything else (``eth.example.com/v2/KEY``,
    ``user:password@host``, a key pasted alone) shows only its host, if it has one."""
    if url.lower().startswith(("http://", "https://")):
        return redact_url(url)
    rest = url.rpartition("@")[2]  # user:password@ or KEY@ before a host: never shown
    head = re.split(r"[/?#\s]", rest, maxsplit=1)[0]
    if not _HOST.match(head):
        return MASK
    return head if head == url else f"{head}/{MASK}"


def secrets_of(url: str) -> list[str]:
    """The substrings of ``url`` that :func:`redact_url` would hide (path segments too
    short to scrub out of free text on their own are left out: see :func:`redact_text`)."""
    found: list[str] = []
    if is_keyword_dsn(url):
        return [m.group(2).strip("'") for m in _DSN_PASSWORD.finditer(url)]
    if ":" not in url:
        return []
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    if parts.password:
        found.append(parts.password)
    if _is_db(parts.scheme):
        return found
    if "@" in parts.netloc and ":" not in parts.netloc.rpartition("@")[0]:
        found.append(parts.netloc.rpartition("@")[0])
    found.extend(s for s in _masked_segments(parts.path) if len(s) >= _MIN_SCRUBBED_SEGMENT)
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if v and (_SECRET_QUERY_NAMES.search(k) or _KEYLIKE_SEGMENT.match(v)):
            found.append(v)
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
            shown = urlsplit(redact_url(url)).path
            text = text.replace(parts.path.rstrip("/"), shown.rstrip("/"))
        for secret in secrets_of(url):
            if len(secret) >= 3:
                text = text.replace(secret, MASK)
    return text
