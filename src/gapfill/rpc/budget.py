"""A token bucket that every gapfill process of one host draws from.

Providers limit calls per second per API key, not per process, so four workers
each spending "200 rps" would be answered 429 three times out of four. The bucket
lives in a 48-byte file per endpoint (named by a hash of the URL, so no secret
reaches the file system) and every read-modify-write happens under ``fcntl.flock``.
A draw is a *reservation*: the caller takes its tokens at once, possibly driving
the balance below zero, and sleeps until the debt is paid. Callers are therefore
served in order, nothing polls, and N processes together never exceed ``rps``.

A second small file per endpoint (``.cap``) remembers the batch size it refused, so
that the next process starts below it. The bucket file also holds the AIMD factor
(so a 429 seen by one worker slows all of them) and a "paused until" time (so a
``Retry-After`` is honoured host-wide).
Times are ``time.monotonic()``, which on Linux is one clock for the whole host.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import os
import struct
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from gapfill.errors import ConfigError

_LAYOUT = struct.Struct("<dddddd")  # tokens, refilled_at, factor, cut_at, paused_until, spare
_MIN_FACTOR = 0.05
_INCREASE_STEP = 0.02  # of the configured rate, per successful request
_CUT_INTERVAL_S = 1.0  # one multiplicative cut per interval however many 429s arrive


#: Where the host's shared state per endpoint lives unless ``RpcSettings.budget_dir`` says.
BUDGET_DIR_ENV = "GAPFILL_BUDGET_DIR"
#: How long a batch size an endpoint refused is remembered (a provider may raise its limit).
LEARNED_CAP_TTL_S = 24 * 3600.0


def default_budget_dir() -> str:
    """``GAPFILL_BUDGET_DIR``, else a folder of this user's: ``$XDG_RUNTIME_DIR/gapfill-budgets``
    or ``gapfill-budgets-<uid>`` in the temporary folder. One folder for every user of the
    host was created by the first (mode 755), and the others could not write their buckets."""
    configured = os.environ.get(BUDGET_DIR_ENV)
    if configured:
        return configured
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        return os.path.join(runtime, "gapfill-budgets")
    return os.path.join(tempfile.gettempdir(), f"gapfill-budgets-{os.getuid()}")


def budget_path(url: str, budget_dir: str | None = None, suffix: str = "bucket") -> str:
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:24]
    return os.path.join(budget_dir or default_budget_dir(), f"{digest}.{suffix}")


def read_learned_cap(url: str, budget_dir: str | None = None) -> tuple[int, int] | None:
    """The batch size last used at ``url`` after it refused a batch as too large, and the
    smallest size it refused: (cap, refused), if learned in the last ``LEARNED_CAP_TTL_S``
    by any gapfill process of this host. Each run's worker processes would otherwise
    learn it again, one refused batch (or several, halving) each."""
    try:
        with open(budget_path(url, budget_dir, "cap"), encoding="ascii") as f:
            cap, refused, at = f.read().split()
        learned = (int(cap), int(refused))
        age = time.time() - float(at)
        if not -60.0 <= age <= LEARNED_CAP_TTL_S or not 1 <= learned[0] < learned[1]:
            return None
        return learned
    except (OSError, ValueError):  # none yet, or unreadable: learn it again
        return None


def write_learned_cap(url: str, cap: int, refused: int, budget_dir: str | None = None) -> None:
    """Remember what :func:`read_learned_cap` reads (best effort: written whole or not)."""
    path = budget_path(url, budget_dir, "cap")
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".cap-")
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(f"{cap} {refused} {time.time():.3f}\n")
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError, UnboundLocalError):
            os.unlink(tmp)


@dataclass(slots=True)
class _State:
    tokens: float
    refilled_at: float
    factor: float
    cut_at: float
    paused_until: float


class SharedBudget:
    """Host-wide token bucket for one endpoint, counting calls.

    ``rps`` is the configured rate; the bucket holds at most ``burst_s`` seconds of
    it (never more than one second) and never less than one batch, ``min_capacity``.
    """

    def __init__(
        self,
        url: str,
        rps: float,
        *,
        budget_dir: str | None = None,
        burst_s: float = 0.5,
        min_capacity: float = 1.0,
    ) -> None:
        if rps <= 0:
            raise ValueError("rps must be positive")
        self.rps = rps
        self.capacity = max(min(burst_s, 1.0) * rps, min(min_capacity, rps), 1.0)
        self.path = budget_path(url, budget_dir)
        self._fd: int | None = None
        #: The shared AIMD factor as last seen by this process.
        self.last_factor = 1.0
        self._open()  # a folder it cannot use is said now, not by the first call of a run

    def _open(self) -> int:
        if self._fd is None:
            folder = os.path.dirname(self.path)
            try:
                os.makedirs(folder, mode=0o700, exist_ok=True)
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                raise ConfigError(
                    f"cannot keep the rate budget in {folder} ({exc.strerror or exc}): set "
                    f"{BUDGET_DIR_ENV} to a folder this user can write to"
                ) from exc
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[_State]:
        fd = self._open()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            now = time.monotonic()
            raw = os.pread(fd, _LAYOUT.size, 0)
            if len(raw) == _LAYOUT.size:
                tokens, refilled_at, factor, cut_at, paused_until, _ = _LAYOUT.unpack(raw)
                # A file left by an earlier boot (the clock restarted) or a corrupt one.
                if not (0.0 < refilled_at <= now) or not (0.0 < factor <= 1.0):
                    tokens, refilled_at, factor, cut_at, paused_until = (
                        self.capacity, now, 1.0, 0.0, 0.0)
                if paused_until > now + 3600:
                    paused_until = 0.0
            else:
                tokens, refilled_at, factor, cut_at, paused_until = self.capacity, now, 1.0, 0.0, 0.0
            state = _State(tokens, refilled_at, factor, cut_at, paused_until)
            # Refill at the current (possibly cut) rate; a full bucket stops growing. Nothing
            # refills during a pause: the calls reserved meanwhile go at the rate after it.
            since = max(state.refilled_at, min(state.paused_until, now))
            state.tokens = min(self.capacity, state.tokens + (now - since) * self.rps * state.factor)
            state.refilled_at = now
            yield state
            self.last_factor = state.factor
            os.pwrite(
                fd,
                _LAYOUT.pack(state.tokens, state.refilled_at, state.factor, state.cut_at,
                             state.paused_until, 0.0),
                0,
            )
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def reserve(self, calls: int) -> float:
        """Take ``calls`` tokens now; return how many seconds to sleep before sending: the
        rest of a ``Retry-After`` pause, then the debt at the rate after it. (The larger of
        the two sent every call reserved during a pause at its end, in one burst.)"""
        with self._locked() as state:
            now = state.refilled_at
            state.tokens -= calls
            rate = self.rps * state.factor
            wait = 0.0 if state.tokens >= 0 else -state.tokens / rate
            return max(0.0, state.paused_until - now) + wait

    def refund(self, calls: int) -> None:
        """Give back tokens reserved for a request that was never sent (cancelled)."""
        with self._locked() as state:
            state.tokens = min(self.capacity, state.tokens + calls)

    def on_rate_limited(self, retry_after_s: float | None) -> float:
        """Cut the shared rate (at most once a second) and honour a wait hint; returns the factor."""
        with self._locked() as state:
            now = state.refilled_at
            if now - state.cut_at >= _CUT_INTERVAL_S:
                state.factor = max(_MIN_FACTOR, state.factor * 0.5)
                state.cut_at = now
                # The provider's bucket is empty: start ours empty too.
                state.tokens = min(state.tokens, 0.0)
            if retry_after_s:
                state.paused_until = max(state.paused_until, now + retry_after_s)
            return state.factor

    def on_success(self) -> None:
        with self._locked() as state:
            if state.factor < 1.0:
                state.factor = min(1.0, state.factor + _INCREASE_STEP)

    def paused_for(self) -> float:
        with self._locked() as state:
            return max(0.0, state.paused_until - state.refilled_at)

    def factor(self) -> float:
        with self._locked() as state:
            return state.factor


#: A learned rate's growth per second spent waiting for its tokens: fast until refused
#: after growing, and below half the rate last refused (the first estimate, or a cut after
#: nothing was accepted, may be far below the limit); slowly otherwise.
_PROBE_GROWTH = 0.5
_PROBE_BELOW = 0.5
_STEADY_GROWTH = 0.03
#: Over how many seconds the calls a provider accepted measure its rate.
ACCEPTED_WINDOW_S = 2.0
#: A 429 while the client was not using its whole rate (a burst, a shared key) cuts it to
#: this share; any cut takes at least 1 - _CUT_MOST.
_CUT_LEAST = 0.8
#: No cut goes below this share: the client's own lulls (a batch's last calls, a refused
#: request's backoff) count as calls the provider did not accept.
_CUT_DEEPEST = 0.5
_CUT_MOST = 0.9


class AcceptedCalls:
    """Calls a provider answered (not refused), by when: what it accepts per second while
    it refuses some is its limit. Counting calls *sent* instead counted the refused ones,
    all sent at once at the start: "about 402 calls/s" for a 50 calls/s provider."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._at: deque[tuple[float, int]] = deque()
        self.since = clock()  # when counting began: the window is never longer

    def add(self, calls: int) -> None:
        now = self._clock()
        self._at.append((now, calls))
        while self._at and self._at[0][0] < now - ACCEPTED_WINDOW_S:
            self._at.popleft()

    def rate(self) -> float:
        """Calls accepted per second over the last ``ACCEPTED_WINDOW_S``, at least one
        second: a provider whose bucket holds a second accepts a second's calls at once."""
        now = self._clock()
        span = min(ACCEPTED_WINDOW_S, max(1.0, now - self.since))
        return sum(n for at, n in self._at if at >= now - span) / span


class LearnedBudget:
    """An in-process bucket for an endpoint without a configured rate that said 429.

    The first rate is what the provider accepted per second (see :class:`AcceptedCalls`),
    or half the refused request when it accepted less. While the client waits for its
    tokens the rate grows (by half per second until a 429 comes after it grew, or while
    below half the rate last refused; 3 % per second otherwise), and each further 429 (at
    most one cut a second) sets it to what the provider accepted meanwhile, between half
    and nine tenths of the rate: so it settles just under the limit, refused now and then,
    instead of halving far below it. It lives only as long as the client.
    """

    def __init__(
        self,
        rps: float,
        accepted: AcceptedCalls,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self.rps = max(rps, 1.0)
        self.accepted = accepted
        self.tokens = 0.0
        self.at = clock()
        self.cut_at = self.at
        self.cuts = 0
        #: The rate last refused: far below it the rate grows fast again.
        self.refused_rps = math.inf
        self._set_rps = self.rps  # as first set or last cut: refusals at it teach nothing new
        self._bound_at = -1e9  # when a reserve last had to wait: the rate is what limits
        self._grown_at = self.at
        #: The end of a ``Retry-After`` pause (the endpoint's): nothing refills before it.
        self.paused_until = 0.0

    def _refill(self) -> float:
        now = self._clock()
        since = max(self.at, min(self.paused_until, now))
        self.tokens = min(self.rps * 0.5, self.tokens + (now - since) * self.rps)
        self.at = now
        return now

    def reserve(self, calls: int) -> float:
        """Take ``calls`` tokens; return the seconds to wait: the rest of a pause, then
        the debt at the rate."""
        now = self._refill()
        self.tokens -= calls
        pause = max(0.0, self.paused_until - now)
        if self.tokens < 0:
            self._bound_at = now
            return pause - self.tokens / self.rps
        return pause

    def cut(self) -> bool:
        """A 429: set the rate to what the provider accepted. False if cut less than a
        second ago (the refusals of one overshoot)."""
        now = self._refill()
        if self.rps > self._set_rps:  # grown since set: no faster growth past this rate
            self.refused_rps = min(self.refused_rps, self.rps)
        if now - self.cut_at < _CUT_INTERVAL_S:
            return False
        # Sending all its rate allowed, the provider took what it accepted: that is its limit.
        bound = now - self._bound_at <= _CUT_INTERVAL_S
        accepted = self.accepted.rate() if bound else self.rps * _CUT_LEAST
        refused = self.rps
        self.rps = max(1.0, self.rps * _CUT_DEEPEST, min(self.rps * _CUT_MOST, accepted))
        # Cut to what it accepted, the rate is near the limit: grow slowly. Cut without it
        # having accepted anything (batches above its bucket), find the limit fast again.
        self.refused_rps = refused if accepted < 1.0 else min(refused, self.rps / _PROBE_BELOW)
        self._set_rps = self.rps
        self.cut_at = now
        self._grown_at = now
        self.cuts += 1
        self.tokens = min(self.tokens, 0.0)
        return True

    def refund(self, calls: int) -> None:
        """Give back tokens reserved for a request that was not sent."""
        self._refill()
        self.tokens = min(self.rps * 0.5, self.tokens + calls)

    def grow(self) -> None:
        """A request succeeded: grow with the time spent bound by the rate (a client that
        does not use its rate learns nothing about the limit from it)."""
        now = self._clock()
        elapsed = min(1.0, now - self._grown_at)
        self._grown_at = now
        if now - self._bound_at <= 1.0 and elapsed > 0:
            fast = self.rps < self.refused_rps * _PROBE_BELOW
            self.rps *= 1.0 + (_PROBE_GROWTH if fast else _STEADY_GROWTH) * elapsed
