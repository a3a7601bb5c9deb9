"""Settings and call records of the RPC layer (frozen, units in the names)."""

from __future__ import annotations

import math
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import field
from typing import Any, Protocol

from gapfill.errors import ConfigError
from gapfill.records import record
from gapfill.redact import misplaced_problem, not_http_problem, redact_url

DEFAULT_MAX_BATCH = 50
#: What to check about an endpoint given on the command line or in the environment.
FLAG_CHECK = "--rpc-url or ETH_RPC_URL"


def file_check(path: str) -> str:
    """What to check about an endpoint a config file gave: its key, in that file."""
    return f"[[endpoints]] url in {path}"


class _Checked(Protocol):
    @property
    def check(self) -> str: ...


def checks(endpoints: Iterable[_Checked]) -> str:
    """What to check about several endpoints: where each came from, each place said once."""
    return " or ".join(dict.fromkeys(e.check for e in endpoints)) or FLAG_CHECK


class _Limited(Protocol):
    @property
    def rps(self) -> float | None: ...


def calls_metered(endpoints: Iterable[_Limited]) -> bool:
    """Whether a run's calls are metered: some endpoint has an rps limit. The planner then
    fetches a block whole from fewer shared refs (calls are the budget); ``enrich --dry-run``
    estimates by the same rule as the run it predicts."""
    return any(e.rps is not None for e in endpoints)


def metered_rate(endpoints: Sequence[_Limited]) -> float | None:
    """The calls per second all ``endpoints`` together allow, or None when one of them has
    no limit (or there are none): then the node's speed, not a budget, decides the time."""
    rates = [e.rps for e in endpoints]
    if not rates or any(r is None for r in rates):
        return None
    return sum(r for r in rates if r is not None)


@record
class EndpointConfig:
    """One JSON-RPC URL and the limits its provider grants.

    ``rps`` counts *calls* (items of a JSON-RPC batch) per second and is shared by
    every gapfill process of this host; ``None`` means unlimited. ``max_batch``
    counts calls per JSON-RPC batch.
    """

    url: str
    rps: float | None = None
    max_batch: int = DEFAULT_MAX_BATCH
    #: What a message about this endpoint tells the user to check: where its URL came from.
    check: str = field(default=FLAG_CHECK, compare=False)

    def __post_init__(self) -> None:
        if not self.url.lower().startswith(("http://", "https://")):
            raise ConfigError(
                f"RPC URL {not_http_problem(self.url)}; check {self.check}"
            )
        misplaced = misplaced_problem(self.url, "RPC URL", self.check)
        if misplaced:
            # urlsplit (and aiohttp) would read the password's start as the port, and their
            # error quoted it.
            raise ConfigError(misplaced)
        try:
            parts = urllib.parse.urlsplit(self.url)
            if not parts.hostname:
                raise ValueError("it names no host")
            parts.port  # noqa: B018 - raises ValueError when out of range
            # The resolver encodes the host so (socket.getaddrinfo); it raised UnicodeError
            # (a ValueError) out of the first request: "internal error ... report it".
            parts.hostname.encode("idna")
        except ValueError as exc:
            # Its text may quote what stands as the port ("... as 'pw'"): a password's start.
            why = "its port is not a number" if "Port could not be cast" in str(exc) else exc
            if isinstance(exc, UnicodeError):
                why = ("its host name has an empty label (as in a..b) "
                       "or one over 63 characters" if "label empty or too long" in str(exc)
                       else "its host name cannot be encoded")  # fmt: skip
            raise ConfigError(
                f"RPC URL {redact_url(self.url)!r} is not valid ({why}); check {self.check}"
            ) from None
        if self.rps is not None and not (math.isfinite(self.rps) and self.rps > 0):
            raise ConfigError(f"rps for {redact_url(self.url)} must be positive or unset")
        if self.max_batch < 1:
            raise ConfigError(f"max_batch for {redact_url(self.url)} must be at least 1")


@record
class RpcSettings:
    """Client-wide knobs; the defaults suit public providers."""

    attempts: int = 3
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0  # a stalled response is cut after this
    backoff_base_s: float = 0.2
    backoff_max_s: float = 10.0
    #: A ``null_retry`` call that answered ``null`` is asked again no sooner than this,
    #: doubling per null up to ``null_backoff_max_s``: a node whose receipts lag its
    #: transactions by a moment catches up in the same attempt. (The failure backoff's
    #: full jitter may be ~0, so alone it could spend every null back to back.)
    null_backoff_s: float = 0.25
    null_backoff_max_s: float = 2.0
    max_in_flight: int = 8  # concurrent HTTP requests per client
    budget_dir: str | None = None  # where host-shared token buckets live
    #: Rate-limited answers are expected under load and are not the caller's
    #: fault, so they have their own, larger allowance than ``attempts``.
    rate_limit_attempts: int = 12
    #: Consecutive failed requests after which an endpoint is set aside.
    failures_to_set_aside: int = 3
    #: Size of the shared bucket, in seconds of budget (at most one second).
    burst_s: float = 0.5
    #: After this long without an answer to the start-up check, :meth:`RpcClient.probe`
    #: says that it is still waiting (a stuck node takes ``attempts`` x the read timeout).
    slow_probe_notice_s: float = 10.0
    #: How long the start-up check waits for the other endpoints once one has answered;
    #: those still silent are left out of the run.
    probe_grace_s: float = 5.0
    #: Where ``read_timeout_s`` came from, as "raise ..." names it: the option, or the
    #: config file's key.
    timeout_check: str = field(default="--rpc-timeout", compare=False)


@record
class Call:
    """One JSON-RPC call; ``null_retry`` marks a ``null`` result as "not yet"."""

    method: str
    params: list[Any]
    null_retry: bool = False

    def __init__(self, method: str, params: list[Any], null_retry: bool = False) -> None:
        # Two are made per transaction enriched. The frozen dataclass's own __init__ sets each
        # field through object.__setattr__ (~1,500 instructions each); the slots' own setters
        # skip that lookup, for about half. Still frozen: assigning a field raises.
        _set_method(self, method)
        _set_params(self, params)
        _set_null_retry(self, null_retry)


# The setters of :class:`Call`'s slots (see its ``__init__``).
_set_method: Any = vars(Call)["method"].__set__
_set_params: Any = vars(Call)["params"].__set__
_set_null_retry: Any = vars(Call)["null_retry"].__set__


def parse_rpc_urls(values: Sequence[str]) -> list[str]:
    """Split repeatable and comma-separated ``--rpc-url`` values, dropping blanks and repeats."""
    urls: list[str] = []
    for value in values:
        for part in value.split(","):
            url = part.strip()
            if url and url not in urls:
                urls.append(url)
    return urls
