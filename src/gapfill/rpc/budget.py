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
import os
import struct
import tempfile
import time
from collections.abc import Iterator
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
            # Refill at the current (possibly cut) rate; a full bucket stops growing.
            state.tokens = min(
                self.capacity, state.tokens + (now - state.refilled_at) * self.rps * state.factor
            )
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
        """Take ``calls`` tokens now; return how many seconds to sleep before sending."""
        with self._locked() as state:
            now = state.refilled_at
            state.tokens -= calls
            rate = self.rps * state.factor
            wait = 0.0 if state.tokens >= 0 else -state.tokens / rate
            return max(wait, state.paused_until - now)

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


class LearnedBudget:
    """An in-process bucket for an endpoint without a configured rate that said 429.

    The rate starts at half of what was being sent when the first 429 came, is
    halved on each further 429 (at most once a second) and grows by 3 % per
    successful request; it lives only as long as the client.
    """

    def __init__(self, rps: float) -> None:
        self.rps = max(rps, 1.0)
        self.tokens = 0.0
        self.at = time.monotonic()
        self.cut_at = self.at

    def _refill(self) -> float:
        now = time.monotonic()
        self.tokens = min(self.rps * 0.5, self.tokens + (now - self.at) * self.rps)
        self.at = now
        return now

    def reserve(self, calls: int) -> float:
        self._refill()
        self.tokens -= calls
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rps

    def cut(self) -> None:
        now = self._refill()
        if now - self.cut_at >= _CUT_INTERVAL_S:
            self.rps = max(1.0, self.rps * 0.5)
            self.cut_at = now
            self.tokens = min(self.tokens, 0.0)

    def refund(self, calls: int) -> None:
        """Give back tokens reserved for a request that was not sent."""
        self._refill()
        self.tokens = min(self.rps * 0.5, self.tokens + calls)

    def grow(self) -> None:
        self.rps *= 1.03
