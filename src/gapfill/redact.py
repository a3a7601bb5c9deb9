"""Keep secrets in URLs out of every message.

RPC URLs often carry an API key in the path (``/v2/<key>``) or the query
(``?apikey=...``); explorer APIs in the query only (see :class:`ExplorerUrl`); database
URLs carry passwords. Anything that prints or logs a
URL goes through :func:`redact_url`, and :func:`redact_text` scrubs known
secrets out of free text such as driver error messages, however it encodes them.
"""

from __future__ import annotations

import re
from functools import lru_cache
from urllib.parse import unquote, unquote_plus, urlsplit, urlunsplit

from gapfill.importing import lazy_pattern

MASK = "***"
# A secret is scrubbed out of free text when at least this long: a shorter one would mask
# pieces of ordinary words, and the masks would spell it out.
_MIN_SCRUBBED = 3
# Characters no URL encoder escapes: any other may show percent-encoded.
_UNRESERVED = lazy_pattern(r"[A-Za-z0-9._~\-]")

# Query values that look like keys: long runs of letters/digits/-/_ .
_KEYLIKE_SEGMENT = lazy_pattern(r"^[A-Za-z0-9_\-]{16,}$")
# A JSON web token: base64url parts between dots (its header and claims at least 8 each).
_JWT = lazy_pattern(r"^[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*$")
# A path segment that looks like a key wherever it stands: as long, with letters and digits
# (a file or directory name has a dot, or is words).
_KEY_SEGMENT = lazy_pattern(r"^(?=.*\d)(?=.*[A-Za-z])[A-Za-z0-9_\-]{16,}$")
# The only path segments of an RPC URL shown as they are: versions and a few words no
# provider uses as a key. Any other segment may be a key, whatever its length
# (``/v2/SECRETKEY123``), so it is masked.
_PLAIN_SEGMENT = lazy_pattern(r"^(|v\d+(\.\d+)?|rpc|api|jsonrpc|http|https|ws|ext|evm)$", re.IGNORECASE)
# A masked path segment is also scrubbed out of free text when at least this long:
# shorter ones ("eth", "bsc") would mangle ordinary words; the whole path is scrubbed too.
_MIN_SCRUBBED_SEGMENT = 6
# What after a path would make it a longer one (a sentence's full stop would not).
_PATH_GOES_ON = r"(?![A-Za-z0-9_~%\-])"
# libpq keyword/value connection strings: the secrets they may hold, passwords (sslpassword
# too), SCRAM keys and an OAuth client secret.
_DSN_PASSWORD = lazy_pattern(
    r"((?:password|scram_client_key|scram_server_key|oauth_client_secret)\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)",
    re.IGNORECASE,
)
# A host name or address, with an optional port (a one-word host only with one: `anvil:8545`):
# what a URL without a scheme may show.
_HOST = lazy_pattern(
    r"^((localhost|\[[0-9a-fA-F:.]+\]|(\d{1,3}\.){3}\d{1,3}|([a-zA-Z0-9-]+\.)+[a-zA-Z]{2,})(:\d{1,5})?"
    r"|[a-zA-Z][a-zA-Z0-9-]*:\d{1,5})$"
)
# A scheme written wrong before a host: `http:/host`, `http//host`, `http:host`.
_MISTYPED_SCHEME = lazy_pattern(r"^([A-Za-z][A-Za-z0-9+.\-]*)(:/*|/+)(.+)$", re.DOTALL)
# What a value that is not a URL at all may show: a short lowercase word ("notaurl"). Keys
# have digits, capitals or length; such a value is hidden whole.
_PLAIN_WORD = lazy_pattern(r"^[a-z][a-z._\-]{0,14}$")
_SECRET_QUERY_NAMES = lazy_pattern(r"(key|token|secret|auth|pass|pwd|sig|jwt)", re.IGNORECASE)
_DB_SECRET_QUERY_NAMES = lazy_pattern(r"(pass|pwd|secret|token|scram_)", re.IGNORECASE)
# Where a database URL's query starts: a '?' before one of libpq's parameters (the only
# names it takes there). A '?' before anything else may be in a password, and an '@' after
# it may end one: one of a newer libpq's parameters then masks more, never less.
_DB_QUERY = lazy_pattern(
    r"\?(?=(application_name|channel_binding|client_encoding|connect_timeout|dbname"
    r"|fallback_application_name|gssdelegation|gssencmode|gsslib|host|hostaddr|keepalives"
    r"|keepalives_count|keepalives_idle|keepalives_interval|krbsrvname|load_balance_hosts"
    r"|max_protocol_version|min_protocol_version|oauth_client_id|oauth_client_secret|oauth_issuer"
    r"|oauth_scope|options|passfile|password|port|replication|require_auth|requirepeer"
    r"|scram_client_key|scram_server_key|service|ssl_max_protocol_version|ssl_min_protocol_version"
    r"|sslcert|sslcertmode|sslcompression|sslcrl|sslcrldir|sslkey|sslkeylogfile|sslmode"
    r"|sslnegotiation|sslpassword|sslrootcert|sslsni|target_session_attrs|tcp_user_timeout|user)=)"
)


class DbUrl(str):
    """A database URL (``--db``), marked so that redaction reads it as one whatever its
    shape: written without a scheme (``user:pw@host:5432/db``), its path is still a
    database name to show and the part after the user's ``:`` still a password to hide."""

    __slots__ = ()


class Secret(str):
    """A secret given alone, not in a URL (an explorer's API key): hidden wherever it
    appears in text, whatever its shape."""

    __slots__ = ()


# What a database URL's host and port look like, after what stands for its scheme.
_HOST_PORT = lazy_pattern(r"^([A-Za-z][A-Za-z0-9+.\-]*:/*)?[A-Za-z0-9.\-\[\]]*:\d+$")
# A libpq ``key=value`` connection string starts with a keyword and its '='.
_KEYWORD_DSN = lazy_pattern(r"^\s*[A-Za-z_]+\s*=")
# What stands for a scheme before a database URL's user: `scheme://`, or one written wrong.
_DB_SCHEME = lazy_pattern(r"^([A-Za-z][A-Za-z0-9+.\-]*://|(postgres(ql)?|sqlite)(:/*|/+))", re.IGNORECASE)


def is_keyword_dsn(url: str) -> bool:
    """A libpq ``key=value`` connection string rather than a URL (one whose query holds
    ``=``, ``postgres:pw@host/db?sslmode=require``, is not one)."""
    return "://" not in url and bool(_KEYWORD_DSN.match(url))


def _is_db(scheme: str) -> bool:
    """A database URL's path is a database name, not a secret."""
    return scheme.lower().startswith(("postgres", "sqlite"))


def _is_db_url(url: str) -> bool:
    """Whether ``url`` is to be read as a database URL: marked one, a libpq connection
    string, or one that names a database scheme, even written wrong (``postgres:pw@host``)."""
    return isinstance(url, DbUrl) or is_keyword_dsn(url) or (_is_db(url) and bool(_DB_SCHEME.match(url)))


class ExplorerUrl(str):
    """An explorer API's URL (``--explorer-url``), marked so that redaction shows its path.

    Etherscan-compatible APIs (Etherscan, Blockscout, Routescan) take their key in the
    query (``apikey=``), masked as on any URL, never in the path, whose segments are
    versions and words (``/v2/api``, ``/v2/network/mainnet/evm/1/etherscan/api``). Masked
    as an RPC URL's path, they hid the very typo an explorer's 404 came from (``/v2/apj``
    showed as ``/v2/***``). A segment that may be a key pasted in the wrong place or a
    self-hosted proxy's token is still masked: 16 characters or more, or 8 or more mixing
    letters and digits (``/k/Xy7pQ2rT9sLm4/api`` showed whole); an RPC URL's path keeps
    its own rule."""

    __slots__ = ()


# An explorer URL's path segment this long may be a key pasted there: masked (see ExplorerUrl);
# so may a shorter one mixing letters and digits (a proxy's token), but not a version ("v2").
_EXPLORER_KEY_SEGMENT_LEN = 16
_EXPLORER_TOKEN_SEGMENT = lazy_pattern(r"^(?=.*\d)(?=.*[A-Za-z]).{8,}$")


def _segment_masked(segment: str, explorer: bool) -> bool:
    """Whether a path segment may be a key: on an explorer URL one as long as a key, on an
    RPC URL any but a version or a few words (see ``_PLAIN_SEGMENT``)."""
    if explorer:
        return len(segment) >= _EXPLORER_KEY_SEGMENT_LEN or bool(_EXPLORER_TOKEN_SEGMENT.match(segment))
    return not _PLAIN_SEGMENT.match(segment)


def _masked_segments(path: str, explorer: bool = False) -> list[str]:
    return [s for s in path.split("/") if _segment_masked(s, explorer)]


def _db_query_at(url: str) -> int:
    """Where a database URL's query starts (its length when it has none). A '?' before a
    libpq parameter with an '@' after it may be in a password, which is then masked up to
    that '@'. libpq reads ``u:ab?sslmode=x@host`` as user ``u``, password ``ab?sslmode=x``
    (not so when a host and port and a '/' come first: ``h:5432/db?options=a@b``); it reads
    ``u:ab@cd?sslmode=x@host/db`` as password ``ab``, host ``cd``, sslmode ``x@host/db``,
    but the user may have meant password ``ab@cd?sslmode=x`` (not so when a '/' follows the
    host: ``u:pw@h/db?options=a@b``)."""
    for m in _DB_QUERY.finditer(url):
        before, after = url[: m.start()], url[m.start() :]
        userinfo, at, host = before.partition("@")
        first, slash, _ = before.partition("/")
        if at:
            in_password = ":" in userinfo and "/" not in host
        else:
            in_password = ":" in before and not (slash and _HOST_PORT.match(first))
        if not (in_password and "@" in after):
            return m.start()
    return len(url)


def _db_scheme(head: str) -> str:
    """What stands for the scheme at the start of a database URL (before its query): ``""``
    when there is none. In ``postgres:pw@host`` it is the user's name, not a scheme: a
    password must not show as a user."""
    m = _DB_SCHEME.match(head)
    user, at, _ = head[m.end() :].partition("@") if m else ("", "", "")
    if m is None or (m.group(0).endswith(":") and at and ":" not in user):
        return ""
    return m.group(0)


def _redact_db(url: str) -> tuple[str, list[str]]:
    """A database URL with its password masked, and the secrets masked, whatever its shape:
    ``scheme://user:pw@host/db``, without its ``//`` (``postgres:user:pw@host/db``), without
    a scheme (``user:pw@host:5432/db``), a libpq connection string. Its user, host, port and
    database name show: they are how the user recognises it."""
    if is_keyword_dsn(url):
        passwords = [m.group(2).strip("'") for m in _DSN_PASSWORD.finditer(url)]
        return _DSN_PASSWORD.sub(lambda m: m.group(1) + MASK, url), passwords
    scheme = _db_scheme(url[: _db_query_at(url)])
    body = url[len(scheme) :]
    # The password ends at the last '@' before the query: it may hold an '@', '/', '?' or
    # '#' libpq would cut at. An '@' in the query (``?options=-c%20x=a:b@c``) is the query's.
    query_at = _db_query_at(body)
    userinfo, at, rest = body[:query_at].rpartition("@")
    user, colon, password = userinfo.partition(":")
    found: list[str] = []
    if at and colon and password and not scheme.lower().startswith("sqlite"):
        # Its pieces too: libpq quotes the one it read as a host or a port.
        # A piece that reads as a parameter (``ab?sslmode=KEY@``): its value too, as libpq
        # quotes one it cannot take ("invalid sslmode value").
        pieces = re.split(r"[@/?#:&]", password)
        found += [password, *pieces, *(p.partition("=")[2] for p in pieces)]
        scheme += f"{user}:{MASK}@"
        rest += body[query_at:]
    else:
        rest = body
    head, q, query = rest.partition("?")
    shown_query, in_query = _redact_query(query, is_db=True)
    return scheme + head + q + shown_query, found + in_query


def _redact_loose(url: str) -> tuple[str, list[str]]:
    """A string without a colon or a host to tell (a file path, ``host/path?KEY``,
    ``KEY@host``) with what looks like a key masked: the part before an ``@`` in front of
    the first ``/``, a query as on an RPC URL, and path segments of 16 or more letters and
    digits. The rest shows: a path is how the user recognises it."""
    head, q, query = url.partition("?")
    shown_query, found = _redact_query(query, is_db=False)
    first, slash, path = head.partition("/")
    userinfo, at, host = first.rpartition("@")
    if at and userinfo:
        found.append(userinfo)
    segments = []
    for segment in (host + slash + path).split("/"):
        if _KEY_SEGMENT.match(segment):  # a key pasted alone too
            found.append(segment)
            segment = MASK
        segments.append(segment)
    return (f"{MASK}@" if at and userinfo else at) + "/".join(segments) + q + shown_query, found


def redact_db_url(url: str) -> str:
    """A database URL (``--db``) as a message may show it: its password masked, whatever
    its shape, and its user, host, port, database name and file path as written."""
    return _redact_db(url)[0]


def db_url_after_scheme(url: str) -> str:
    """A database URL as :func:`redact_db_url` shows it, without what stands for its scheme
    (``postgres:/``, ``postgres:``, nothing): what goes after ``postgresql://``."""
    shown = redact_db_url(url)
    return shown[len(_db_scheme(shown[: _db_query_at(shown)])) :]


def _port_of(authority: str) -> str | None:
    """What stands as the port of ``authority`` (``user:pw@host:port``): None when it has none."""
    hostport = authority.rpartition("@")[2]
    if hostport.startswith("["):  # [::1]:8545
        after = hostport.partition("]")[2]
        return after[1:] if after.startswith(":") else None
    return hostport.rpartition(":")[2] if ":" in hostport else None


def _may_be_host(authority: str) -> bool:
    """Whether ``authority`` (without a port) may be the host of a URL that has an '@'
    further on: a name or an address, not one a host cannot be (empty, with a character no
    host name holds) or a key (no dot, 16 or more letters and digits)."""
    if authority.startswith("["):
        return True
    return bool(re.fullmatch(r"[A-Za-z0-9.\-_~%]+", authority)) and not (
        "." not in authority and _KEY_SEGMENT.match(authority)
    )


def _well_formed(url: str) -> tuple[str, str | None, bool]:
    """``url`` (``scheme://...``) as :func:`urllib.parse.urlsplit` reads it right, what its
    authority holds as a port that is none (a secret: a library may quote it as the port),
    and whether that was taken out of the URL returned (to be shown masked).

    A '/', '?' or '#' written as is in a password ends the authority there, and urlsplit
    reads the password's start as a port (``http://user:pa?ss@host``: host ``user``, port
    ``pa``, query ``ss@host``), which a message then showed. A port that is not all digits
    is no port: with an '@' further on, it is the start of a password that runs to the
    last '@', whose '/', '?' and '#' are then percent-encoded (an '@' in the query too,
    ``http://u:p?w@host/x?to=a@b``, masks more, never less); without one, it is masked and
    taken out. An empty port with an '@' further on is a password's start too: one that
    starts with the '/', '?' or '#' (``http://user:?pw@host``, which showed whole). So is
    a host that cannot be one (see :func:`_may_be_host`) with an '@' further on: a key
    before the '@' holding one of them (``https://KEY?x@host``), or a password holding an
    '@' then one of them (``https://u:p@?w@host``). A URL with a port of digits, or a host
    that may be one, is read as written: ``http://host:8545/x?to=a@b`` keeps its host."""
    scheme, sep, rest = url.partition("://")
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    port = _port_of(authority)
    at = rest.rfind("@")
    before, _, host = authority.rpartition("@")
    if port is None and at > len(authority) and not _may_be_host(host):
        # A key before the '@' (``https://KEY?x@host``) read as the host, or a password
        # holding an '@' then a '?' (``https://u:p@?w@host``) read as none: it runs to the
        # last '@' too, and what was read as the host is a secret a library may quote. A
        # key's ':' and '@' encoded too: one (``?x=a:b@c``) must not start a password
        # after a user's name shown.
        userinfo = re.sub(r"[/?#]" if ":" in before else r"[/?#:@]",
                          lambda m: f"%{ord(m.group()):02X}", rest[:at])  # fmt: skip
        return scheme + sep + userinfo + rest[at:], host, False
    if port is None or port.isdigit() or not (port or at > len(authority)):
        return url, None, False
    if at > len(authority):
        userinfo = re.sub(r"[/?#]", lambda m: f"%{ord(m.group()):02X}", rest[:at])
        return scheme + sep + userinfo + rest[at:], port, False
    return scheme + sep + authority[: -len(port)] + rest[len(authority) :], port, True


# What a host and port read after a password that ran to the last '@' may be shown as: when
# that '@' was in the query (``...?to=a@b&apikey=KEY``), what follows it is the query's.
_HOST_AFTER_AT = lazy_pattern(r"^(\[[0-9A-Za-z:.%]+\]|[A-Za-z0-9.\-_~%]*)(:\d*)?$")


def misplaced_in_password(url: str) -> list[str]:
    """The characters (of '/', '?', '#') that the password of ``url`` (``scheme://...``)
    holds unencoded, each once, as :func:`_well_formed` reads it: a URL must write them
    ``%2F``, ``%3F``, ``%23``."""
    fixed, _, taken_out = _well_formed(url)
    if fixed == url or taken_out:
        return []
    userinfo = url.partition("://")[2].rpartition("@")[0]
    return [c for c in "/?#" if c in userinfo]


def misplaced_problem(url: str, named: str, check: str) -> str | None:
    """What is wrong with ``url`` (``scheme://...``) when its password holds an unencoded
    '/', '?' or '#', and how to write it, in a sentence's words naming it ``named`` ("RPC
    URL") and where it came from ``check``; None when it holds none."""
    misplaced = misplaced_in_password(url)
    if not misplaced:
        return None
    authority = re.split(r"[/?#]", url.partition("://")[2], maxsplit=1)[0]
    what = "password" if ":" in authority else "key before the '@'"
    return (f"the {what} in {named} {redact_url(url)!r} contains {' and '.join(map(repr, misplaced))}: "
            f"write {'it' if len(misplaced) == 1 else 'them'} as "
            f"{' and '.join(f'%{ord(c):02X}' for c in misplaced)} in {check}")


def redact_url(url: str) -> str:
    """Return ``url`` with its password, path segments (but versions; of an
    :class:`ExplorerUrl` only those as long as a key) and secret query values masked.

    A database URL (a :class:`DbUrl`, a libpq ``key=value`` connection string, or one with
    a database scheme) is shown as :func:`redact_db_url` shows it. One with a missing or
    mistyped scheme (``localhost:8545``) is shown as :func:`redact_endpoint` shows it; one
    without a colon or a host as :func:`_redact_loose` does.
    """
    if _is_db_url(url):
        return redact_db_url(url)
    if "://" not in url:
        if ":" not in url and _split_scheme(url) is None:
            return _redact_loose(url)[0]
        return redact_endpoint(url)
    explorer = isinstance(url, ExplorerUrl)
    url, misread, taken_out = _well_formed(url)
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    netloc = parts.netloc + (MASK if taken_out else "")
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        if misread is not None and not _HOST_AFTER_AT.match(hostport):
            hostport = MASK
        user = userinfo.split(":", 1)[0]
        # https://KEY@host: a bare userinfo on an RPC URL is a key
        netloc = f"{user}:{MASK}@{hostport}" if ":" in userinfo else f"{MASK}@{hostport}"
    path = "/".join(MASK if _segment_masked(s, explorer) else s for s in parts.path.split("/"))
    return urlunsplit((parts.scheme, netloc, path, _redact_query(parts.query, is_db=False)[0], ""))


def _query_secrets(piece: str, is_db: bool) -> tuple[bool, bool]:
    """Of one ``name=value`` (or bare ``token``) of a query: whether its name, and whether
    its value, may be a secret. On an RPC URL a bare token is a key pasted as the query
    (``?KEY``), and so is a key-like name."""
    name, eq, value = piece.partition("=")
    name, value = unquote_plus(name), unquote_plus(value)
    if not eq:
        return (not is_db and bool(name)), False
    # A name holding an '@' is none: a password's rest after a start read as the port
    # (``http://user:12?pw@host/x?apikey=K``, a port of digits is one).
    name_secret = not is_db and (bool(_KEYLIKE_SEGMENT.match(name)) or "@" in name)
    # A database URL's only secret parameters are passwords (sslkey=, sslcert= are paths).
    names = _DB_SECRET_QUERY_NAMES if is_db else _SECRET_QUERY_NAMES
    value_secret = bool(value) and bool(names.search(name) or _KEYLIKE_SEGMENT.match(value)
                                        or (not is_db and _JWT.match(value)))
    return name_secret, value_secret


def _redact_query(query: str, is_db: bool) -> tuple[str, list[str]]:
    """A URL's query (after its ``?``) with its secret names and values masked, and the
    secrets (a masked name's value only when long enough to scrub out of free text)."""
    shown: list[str] = []
    found: list[str] = []
    for piece in query.split("&") if query else ():
        name_secret, value_secret = _query_secrets(piece, is_db)
        name, eq, value = (unquote_plus(x) for x in piece.partition("="))
        if name_secret:
            shown.append(f"{MASK}={MASK}" if eq else MASK)
            found += [name, value] if len(value) >= _MIN_SCRUBBED_SEGMENT else [name]
        elif value_secret:
            shown.append(f"{piece.partition('=')[0]}={MASK}")
            found.append(value)
        else:
            shown.append(piece)
    return "&".join(shown), found


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


def _redact_rest(rest: str, explorer: bool = False) -> str:
    """``host:port/path?query`` redacted as the same after ``http://`` would be (an
    explorer's as an explorer URL)."""
    url = "http://" + rest
    return redact_url(ExplorerUrl(url) if explorer else url).removeprefix("http://")


def redact_endpoint(url: str) -> str:
    """An RPC or explorer URL as a message may show it: scheme, host and port as written,
    the rest as :func:`redact_url` shows it. Not being an http(s) URL is the usual reason to
    show one: without a host to tell (a key pasted alone, say), only a short lowercase word
    is shown, anything else is hidden whole."""
    if "://" in url:
        return redact_url(url)
    split = _split_scheme(url)
    if split is not None:
        return split[0] + _redact_rest(split[1], isinstance(url, ExplorerUrl))
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
    fixed = f"{scheme}://{_redact_rest(rest, isinstance(url, ExplorerUrl))}"
    if not written:
        return f"{shown!r} has no scheme: write it as {fixed}"
    return f"{shown!r} is not an http(s) URL: write it as {fixed}"


def secrets_of(url: str) -> list[str]:
    """The substrings of ``url`` that :func:`redact_url` would hide (path segments too
    short to scrub out of free text on their own are left out: see :func:`redact_text`)."""
    if _is_db_url(url):
        return _redact_db(url)[1]
    if "://" not in url:
        split = _split_scheme(url)
        if split is not None:
            rest = "http://" + split[1]
            return secrets_of(ExplorerUrl(rest) if isinstance(url, ExplorerUrl) else rest)
        if ":" not in url:
            return _redact_loose(url)[1]
        return [] if _PLAIN_WORD.match(url) else [url]
    explorer = isinstance(url, ExplorerUrl)
    url, misread, _ = _well_formed(url)
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    found = [parts.password] if parts.password else []
    found += [misread] if misread else []
    found += _redact_query(parts.query, is_db=False)[1]
    if "@" in parts.netloc and ":" not in parts.netloc.rpartition("@")[0]:
        found.append(parts.netloc.rpartition("@")[0])
    hostport = parts.netloc.rpartition("@")[2]
    if misread is not None and "@" in parts.netloc and not _HOST_AFTER_AT.match(hostport):
        found += [hostport, *(p.partition("=")[2] for p in hostport.split("&") if "=" in p)]
    found.extend(s for s in _masked_segments(parts.path, explorer) if len(s) >= _MIN_SCRUBBED_SEGMENT)
    return found


def _written_any_way(text: str) -> str:
    """A pattern for ``text`` however a message may write it: each character as is or
    percent-encoded (either case of hex), a space also as ``+``. A node quotes the request
    path as its HTTP client encoded it (``Key^1`` as ``Key%5E1``), a driver the password it
    decoded (``p%40ss`` as ``p@ss``)."""
    pattern = []
    for c in text:
        if _UNRESERVED.match(c):
            pattern.append(re.escape(c))
            continue
        ways = [re.escape(c), "(?i:" + "".join(f"%{b:02X}" for b in c.encode()) + ")"]
        pattern.append("(?:" + "|".join(ways + ([r"\+"] if c == " " else [])) + ")")
    return "".join(pattern)


@lru_cache(maxsize=256)
def _secret_pattern(secret: str) -> re.Pattern[str] | None:
    """A pattern for ``secret`` in any encoding, as given or decoded (a URL holds it
    percent-encoded, a query's ``+`` is a space); None when every form of it is too short
    to scrub out of free text."""
    forms = {secret, unquote(secret), unquote_plus(secret)}
    kept = sorted((f for f in forms if len(f) >= _MIN_SCRUBBED), key=len, reverse=True)
    return re.compile("|".join(map(_written_any_way, kept))) if kept else None


def _scrub(text: str, secret: str) -> str:
    """``text`` with ``secret`` masked wherever it shows, in any encoding."""
    pattern = _secret_pattern(secret)
    return pattern.sub(MASK, text) if pattern else text


@lru_cache(maxsize=256, typed=True)
def _request_targets(url: str) -> tuple[tuple[re.Pattern[str], str], ...]:
    """What a node may quote of the RPC URL ``url`` where it shows a secret, in any
    encoding, and how it is to be shown: the request target (path and query), then the
    path alone. Only the whole, not one that goes on: `/db` is in "5432/dbname"."""
    try:
        parts, shown = urlsplit(_well_formed(url)[0]), urlsplit(redact_url(url))
    except ValueError:
        return ()
    pairs = [(parts.path.rstrip("/"), shown.path.rstrip("/"))]
    if parts.query:
        pairs.insert(0, (f"{parts.path}?{parts.query}", f"{shown.path}?{shown.query}"))
    return tuple((re.compile(_written_any_way(raw) + _PATH_GOES_ON), said)
                 for raw, said in pairs if raw != said)  # fmt: skip


def redact_text(text: str, *urls: str) -> str:
    """Replace every secret of ``urls`` (and the raw URLs and RPC paths themselves) inside ``text``,
    in any encoding (see :func:`_written_any_way`); a :class:`Secret` among them is replaced whole.

    A node's own error message may quote the request target (``/v2/KEY?apikey=K``) or its
    path without the host: each is replaced whole, as :func:`redact_url` shows it, whatever
    the length of its secrets. Elsewhere a secret shorter than 3 characters is left: masking
    every "ab" would mangle words and point at the secret.
    """
    for url in urls:
        if not url:
            continue
        if isinstance(url, Secret):
            text = _scrub(text, url)
            continue
        text = text.replace(url, redact_url(url))
        if "://" in url and not _is_db_url(url):
            for target, shown in _request_targets(url):
                text = target.sub(shown.replace("\\", "\\\\"), text)
        for secret in secrets_of(url):
            text = _scrub(text, secret)
    return text
