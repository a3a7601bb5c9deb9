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

# Path segments that look like keys: long runs of letters/digits/-/_ .
_KEYLIKE_SEGMENT = re.compile(r"^[A-Za-z0-9_\-]{16,}$")
_SECRET_QUERY_NAMES = re.compile(r"(key|token|secret|auth|pass|pwd|sig)", re.IGNORECASE)


def redact_url(url: str) -> str:
    """Return ``url`` with its password, key-like path segments and secret query values masked."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    netloc = parts.netloc
    is_db = parts.scheme.lower().startswith(("postgres", "sqlite"))
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        if ":" in userinfo:
            netloc = f"{user}:{MASK}@{hostport}"
        elif not is_db:  # https://KEY@host: a bare userinfo on an RPC URL is a key
            netloc = f"{MASK}@{hostport}"
    # A database URL's path is a database name, not a secret.
    segments = [
        MASK if not is_db and _KEYLIKE_SEGMENT.match(s) else s for s in parts.path.split("/")
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
    return urlunsplit((parts.scheme, netloc, path, query, ""))


def secrets_of(url: str) -> list[str]:
    """The substrings of ``url`` that :func:`redact_url` would hide."""
    found: list[str] = []
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    if parts.password:
        found.append(parts.password)
    if parts.scheme.lower().startswith(("postgres", "sqlite")):
        return found
    if "@" in parts.netloc and ":" not in parts.netloc.rpartition("@")[0]:
        found.append(parts.netloc.rpartition("@")[0])
    found.extend(s for s in parts.path.split("/") if _KEYLIKE_SEGMENT.match(s))
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if v and (_SECRET_QUERY_NAMES.search(k) or _KEYLIKE_SEGMENT.match(v)):
            found.append(v)
    return found


def redact_text(text: str, *urls: str) -> str:
    """Replace every secret of ``urls`` (and the raw URLs themselves) inside ``text``."""
    for url in urls:
        if not url:
            continue
        text = text.replace(url, redact_url(url))
        for secret in secrets_of(url):
            if len(secret) >= 3:
                text = text.replace(secret, MASK)
    return text
