"""Per-endpoint state: adaptive batch cap, health, rate budget, counters."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import re
import time
from collections import deque
from collections.abc import Callable

from gapfill.records import record
from gapfill.redact import redact_url
from gapfill.rpc.budget import AcceptedCalls, LearnedBudget, SharedBudget, read_learned_cap, write_learned_cap
from gapfill.rpc.classify import MAX_HONOURED_WAIT_S
from gapfill.rpc.config import EndpointConfig, RpcSettings

logger = logging.getLogger(__name__)

#: Successful requests at the current cap before trying one call more.
GROW_AFTER_SUCCESSES = 50
#: Weight of the newest request in an endpoint's latency estimate (an EWMA).
LATENCY_WEIGHT = 0.3
#: An endpoint's latency estimate halves for each this many seconds it has gone
#: unmeasured, so one that was slow once (a hiccup, a timeout) is tried again later.
LATENCY_HALF_LIFE_S = 30.0
_SET_ASIDE_FIRST_S = 1.0
#: Under a rate learned from 429s a batch holds at most this many seconds of it: the
#: learned rate is near the limit, and a batch of a full second's calls passes only when
#: the provider's bucket (about a second) is full to the last token.
LEARNED_BATCH_S = 0.5
_NAMED_LIMIT = re.compile(r"(?:limit|max(?:imum)?|at most|up to)\D{0,24}?(\d+)", re.IGNORECASE)
_SET_ASIDE_MAX_S = 30.0
#: Recent requests whose outcome decides whether failures in a row mean "down": an
#: endpoint is set aside only if most of them failed. A flaky one (a quarter or half
#: of its requests answered 5xx) fails several times in a row now and then, and
#: setting it aside each time would idle the run; retrying its calls is what works.
_OUTCOMES = 16
_DOWN_SHARE = 0.75


@record
class EndpointStats:
    """Counters of one endpoint since the client opened (``url`` is redacted)."""

    url: str
    calls: int  # calls sent (items of batches); not those whose connection failed
    requests: int  # HTTP requests sent
    retries: int  # calls sent again after a failure
    rate_limited: int  # 429 replies plus items answered with a rate-limit error
    errors: int  # failed requests plus failed items (rate limits excluded)
    bytes_out: int
    bytes_in: int
    latency_p50_s: float | None
    latency_p95_s: float | None
    latency_p99_s: float | None
    batch_cap: int  # calls per batch now (after halving / growing back)
    rate_factor: float  # share of the configured rps in use after AIMD cuts (1.0 = all)
    healthy: bool
    supports_block_receipts: bool | None


def _retry_after(seconds: float | None) -> str:
    return f" (Retry-After {seconds:g} s)" if seconds else ""


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


class Endpoint:
    """Mutable state of one configured URL inside one client (one event loop)."""

    def __init__(self, index: int, config: EndpointConfig, settings: RpcSettings, key: str):
        self.index = index
        self.config = config
        self.url = config.url
        self.key = key  # redacted, unique within the client
        self.shown = redact_url(config.url)
        self._settings = settings
        hard_cap = config.max_batch
        if config.rps is not None:
            # A provider whose bucket holds one second can never accept a bigger batch.
            hard_cap = min(hard_cap, max(1, int(config.rps)))
        self.max_cap = hard_cap
        self.batch_cap = hard_cap
        self._largest_ok = 0
        self._known_bad = hard_cap + 1
        learned = read_learned_cap(config.url, settings.budget_dir)
        if learned is not None and learned[0] < hard_cap:  # another process found the limit
            self.batch_cap = learned[0]
            self._known_bad = min(self._known_bad, learned[1])
        self._successes_at_cap = 0
        self.budget: SharedBudget | None = (
            SharedBudget(
                config.url,
                config.rps,
                budget_dir=settings.budget_dir,
                burst_s=settings.burst_s,
                min_capacity=hard_cap,
            )
            if config.rps is not None
            else None
        )
        self.rate_factor = 1.0
        # AIMD on concurrency for endpoints without a configured rate.
        self.concurrency = float(settings.max_in_flight)
        self.in_flight = 0
        self._gate = asyncio.Condition()
        #: Until when a ``Retry-After`` pause holds it back (with --rps, the shared bucket's
        #: as last seen: left by an earlier run or another process, or said to this one).
        self.paused_until = 0.0 if self.budget is None else time.monotonic() + self.budget.paused_for()
        #: Until when the shared budget's debt holds back the requests that reserved their
        #: tokens last (calls reserved ahead of them by this process or another of the host).
        self.budget_until = 0.0
        # Endpoints without a configured rate learn one from their first 429.
        self.learned: LearnedBudget | None = None
        self._accepted = AcceptedCalls()
        # Health: a breaker that sets the endpoint aside, doubling the time.
        self.consecutive_failures = 0
        self._outcomes: deque[bool] = deque(maxlen=_OUTCOMES)  # True: the request succeeded
        self.down_until = 0.0
        self._set_aside = False  # set aside since its last success
        self._set_aside_s = _SET_ASIDE_FIRST_S
        self.disabled_reason: str | None = None  # failed its probe; never used
        self.chain_id: int | None = None
        #: Methods it answered (a result, a null, or a refusal of the params): it serves them.
        self.supported: set[str] = set()
        self.unsupported: set[str] = set()
        #: Requests sent to it so far: a request's number is this count when it was sent.
        self.sends = 0
        #: Methods it said once it lacks, never having answered them: :attr:`sends` when that
        #: answer arrived. Believed when a request sent after it (numbered at least that)
        #: says it again; one in flight at the same moment may have met the same bad backend.
        self.doubted: dict[str, int] = {}
        self.assigned_calls = 0  # calls handed to this endpoint and not finished
        self.assigned_requests = 0  # batches handed to this endpoint and not finished
        # Seconds per request: an EWMA over the run's requests, else the start-up check's.
        self._latency_s: float | None = None
        self._probe_latency_s: float | None = None
        self._latency_at = 0.0
        # Counters.
        self.calls = 0
        self.requests = 0
        self.retries = 0
        self.rate_limited = 0
        self.errors = 0
        self.bytes_out = 0
        self.bytes_in = 0
        self.latencies: deque[float] = deque(maxlen=4096)

    # -- selection ---------------------------------------------------------------------

    def usable(self) -> bool:
        return self.disabled_reason is None

    def available_at(self) -> float:
        """When it may take a request: after a set-aside and a ``Retry-After`` pause (with
        --rps the shared bucket's, as last seen: see :meth:`record_rate_limited`)."""
        return max(self.down_until, self.paused_until)

    def rate_rps(self) -> float | None:
        """Calls per second this endpoint may take: configured (after AIMD cuts) or
        learned from its 429s; None when it has no known limit."""
        if self.config.rps is not None:
            return self.config.rps * self.rate_factor
        if self.learned is not None:
            return self.learned.rps
        return None

    def observe_latency(self, latency_s: float, *, start_up: bool = False) -> None:
        """A request answered (or timed out) after ``latency_s``. A start-up check's
        tiny call only stands in until the run's own requests are measured."""
        if start_up:
            self._probe_latency_s = latency_s
            return
        previous = self._latency_s
        self._latency_s = latency_s if previous is None else (
            previous + LATENCY_WEIGHT * (latency_s - previous)
        )
        self._latency_at = time.monotonic()

    def latency_estimate(self, now: float) -> float | None:
        """Seconds one request takes here, as far as known; decays while unmeasured."""
        if self._latency_s is None:
            return self._probe_latency_s
        return self._latency_s * math.pow(0.5, (now - self._latency_at) / LATENCY_HALF_LIFE_S)

    def load_score(self, calls: int, latency_s: float, now: float) -> float:
        """Roughly when a new request of ``calls`` calls sent here would be answered,
        in seconds from now: behind the requests already handed to it, run
        ``concurrency`` at a time, each taking ``latency_s`` (its estimate, or the
        caller's stand-in), plus the wait for its rate limit's tokens."""
        slots = max(1, int(self.concurrency))
        score = (self.assigned_requests // slots + 1) * latency_s
        rate = self.rate_rps()
        if rate is not None:
            score += (self.assigned_calls + calls) / max(rate, 1e-6)
        return score

    def cap(self) -> int:
        """Calls per batch now. A rate learned from 429s caps it as a configured rate
        does: a provider whose bucket holds about a second refuses every batch above its
        rate however long the client waits (it sent 100-call batches at 6 calls/s, all
        refused, and the run never moved)."""
        if self.learned is not None:
            return max(1, min(self.batch_cap, int(self.learned.rps * LEARNED_BATCH_S)))
        rps = self.config.rps
        if rps is not None and self.rate_factor < 1.0:
            # A configured rate above the provider's, cut by its 429s (rate_factor): the
            # batch follows the rate in use, or every batch of int(--rps) calls is refused.
            return max(1, min(self.batch_cap, int(rps * self.rate_factor)))
        return self.batch_cap

    # -- admission ---------------------------------------------------------------------

    async def acquire(
        self, calls: int, by_choice: Callable[[], contextlib.AbstractContextManager[None]] | None = None
    ) -> None:
        """Wait for a concurrency slot (AIMD) and for ``calls`` tokens of the shared budget.
        The wait for the tokens, or for a ``Retry-After`` pause to end, is the client's own
        choice: it runs inside ``by_choice()`` (see :mod:`gapfill.rpc.waits`)."""
        chosen = by_choice or contextlib.nullcontext
        if self.budget is None:
            async with self._gate:
                await self._gate.wait_for(lambda: self.in_flight < max(1, int(self.concurrency)))
                self.in_flight += 1
            learned = self.learned  # its tokens go back if the wait is cancelled
            # Under a learned rate: the rest of the pause, then the debt at the rate (calls
            # held by a pause all went at its end, into the provider that had said 429).
            pause = self.paused_until - time.monotonic() if learned is None else learned.reserve(calls)
            if pause > 0:
                try:
                    with chosen():
                        await asyncio.sleep(pause)
                except asyncio.CancelledError:
                    if learned is not None:
                        learned.refund(calls)
                    await self.release()
                    raise
            return
        self.in_flight += 1
        wait = self.budget.reserve(calls)
        self.rate_factor = self.budget.last_factor
        if wait > 0:
            self.budget_until = max(self.budget_until, time.monotonic() + wait)
            try:
                with chosen():
                    await asyncio.sleep(wait)
            except asyncio.CancelledError:
                self.budget.refund(calls)
                self.in_flight -= 1
                raise

    def refund(self, calls: int) -> None:
        """Give back the tokens :meth:`acquire` took for ``calls`` calls that were not sent."""
        if self.budget is not None:
            self.budget.refund(calls)
        elif self.learned is not None:
            self.learned.refund(calls)

    async def release(self) -> None:
        if self.budget is None:
            async with self._gate:
                self.in_flight -= 1
                self._gate.notify_all()
        else:
            self.in_flight -= 1

    # -- feedback ----------------------------------------------------------------------

    def record_request(self, calls: int, bytes_out: int, bytes_in: int, latency_s: float) -> None:
        self.requests += 1
        self.calls += calls
        self.bytes_out += bytes_out
        self.bytes_in += bytes_in
        self.latencies.append(latency_s)

    def record_accepted(self, calls: int) -> None:
        """``calls`` calls of a request were answered, not refused by a rate limit."""
        if self.budget is None and calls > 0:
            self._accepted.add(calls)

    def record_success(self, batch_size: int) -> None:
        """A request came back as a well-formed JSON-RPC reply."""
        if self._set_aside:
            self._set_aside = False
            logger.info("RPC endpoint %s answers again", self.shown)
        self.consecutive_failures = 0
        self._outcomes.append(True)
        self._set_aside_s = _SET_ASIDE_FIRST_S
        self._largest_ok = max(self._largest_ok, batch_size)
        self.record_accepted(batch_size)
        if batch_size >= self.batch_cap:
            self._successes_at_cap += 1
            if (
                self._successes_at_cap >= GROW_AFTER_SUCCESSES
                and self.batch_cap + 1 < self._known_bad
                and self.batch_cap < self.max_cap
            ):
                self.batch_cap += 1
                self._successes_at_cap = 0
                logger.info("RPC endpoint %s took %d batches of %d calls; batches now hold %d",
                            self.shown, GROW_AFTER_SUCCESSES, self.batch_cap - 1, self.batch_cap)  # fmt: skip
        if self.budget is not None:
            if self.rate_factor < 1.0:
                self.budget.on_success()
                self.rate_factor = self.budget.last_factor
        elif self.learned is not None:
            self.learned.grow()
        elif self.concurrency < self._settings.max_in_flight:
            self.concurrency = min(
                float(self._settings.max_in_flight), self.concurrency + 1.0 / self.concurrency
            )

    def record_failure(self, message: str) -> None:
        """A request failed as a whole (transport, 5xx, garbage body)."""
        self.errors += 1
        self.consecutive_failures += 1
        self._outcomes.append(False)
        now = time.monotonic()
        # Over at least _OUTCOMES // 2 requests: at start, three failures in a row are not
        # yet "most of its requests" (a flaky endpoint's first answers can all fail).
        failed_share = self._outcomes.count(False) / max(len(self._outcomes), _OUTCOMES // 2)
        if (
            self.consecutive_failures >= self._settings.failures_to_set_aside
            and failed_share >= _DOWN_SHARE
            # Requests sent before it was set aside and failing since do not add to the pause.
            and now >= self.down_until
        ):
            pause = self._set_aside_s * random.uniform(0.75, 1.25)
            self.down_until = now + pause
            self._set_aside = True
            self._set_aside_s = min(self._set_aside_s * 2, max(_SET_ASIDE_MAX_S, pause))
            logger.warning(
                "RPC endpoint %s set aside for %.1f s after %d failures in a row: %s",
                self.shown, pause, self.consecutive_failures, message,
            )

    def record_rate_limited(
        self, retry_after_s: float | None, count: int = 1, refused_calls: int | None = None
    ) -> None:
        """``count`` refusals (a 429, or items answered with a rate-limit error) of a request
        of ``refused_calls`` calls (``count`` when not said)."""
        refused_calls = count if refused_calls is None else refused_calls
        self.rate_limited += count
        if retry_after_s:  # a longer hint (a quota spent) sets it aside this long: see RpcClient
            retry_after_s = min(retry_after_s, MAX_HONOURED_WAIT_S)
        now = time.monotonic()
        if self.budget is not None:
            self.rate_factor = self.budget.on_rate_limited(retry_after_s)
            if retry_after_s:  # the choice of endpoint sees it: another free one takes the calls
                self.paused_until = max(self.paused_until, now + self.budget.paused_for())
            logger.info("RPC endpoint %s rate limited %d call(s)%s; now sending %.0f calls/s (%.2f of its "
                        "rate)", self.shown, count, _retry_after(retry_after_s), self.rate_rps() or 0.0,
                        self.rate_factor)  # fmt: skip
        else:
            if retry_after_s:
                self.paused_until = max(self.paused_until, now + retry_after_s)
            accepted = self._accepted.rate()
            if self.learned is None and (refused_calls > 1 or accepted >= 1.0):
                # What it accepted per second is its limit; with less than half the refused
                # request accepted (a first round of batches above its bucket), half of that.
                # One call refused before any was answered says no rate (a quota, a pause):
                # the Retry-After or the call's backoff is the answer to it.
                self.learned = LearnedBudget(max(accepted, refused_calls / 2), self._accepted)
                self.learned.paused_until = self.paused_until
                logger.info("RPC endpoint %s rate limits: it accepted %.0f calls/s and refused a "
                            "request of %d; sending %.0f calls/s", self.shown, accepted,
                            refused_calls, self.learned.rps)  # fmt: skip
            elif self.learned is not None:
                self.learned.cut()
                self.learned.paused_until = self.paused_until
            if logger.isEnabledFor(logging.INFO):
                pause = self.paused_until - now
                logger.info("RPC endpoint %s rate limited %d call(s)%s; %s, %.1f requests at a time",
                            self.shown, count, f": pausing {pause:.1f} s (Retry-After)" if pause > 0 else "",
                            f"sending {self.learned.rps:.0f} calls/s" if self.learned else "no rate learned",
                            self.concurrency)  # fmt: skip

    def shrink_batch(self, sent: int, accepted: int | None = None, message: str = "") -> None:
        """The provider refused a batch of ``sent`` calls as too large.

        ``accepted`` is how many calls of it were answered; a limit named in the
        message ("exceeds the limit of 20") is believed when it is smaller than ``sent``.
        """
        self._known_bad = min(self._known_bad, sent)
        named = _NAMED_LIMIT.search(message)
        if named and 0 < int(named.group(1)) < sent:
            new_cap = int(named.group(1))
            self._known_bad = min(self._known_bad, new_cap + 1)
        elif accepted:
            new_cap = accepted
        elif self._largest_ok and self._largest_ok < sent:
            new_cap = max(self._largest_ok, sent // 2)
        else:
            new_cap = sent // 2
        new_cap = max(1, min(new_cap, sent - 1 if sent > 1 else 1))
        if new_cap < self.batch_cap:
            logger.info(
                "RPC endpoint %s refused a batch of %d calls; batches now hold %d",
                self.shown, sent, new_cap,
            )
            self.batch_cap = new_cap
            write_learned_cap(self.url, new_cap, self._known_bad, self._settings.budget_dir)
        self._successes_at_cap = 0

    def stats(self) -> EndpointStats:
        ordered = sorted(self.latencies)
        return EndpointStats(
            url=self.key,
            calls=self.calls,
            requests=self.requests,
            retries=self.retries,
            rate_limited=self.rate_limited,
            errors=self.errors,
            bytes_out=self.bytes_out,
            bytes_in=self.bytes_in,
            latency_p50_s=_percentile(ordered, 0.50),
            latency_p95_s=_percentile(ordered, 0.95),
            latency_p99_s=_percentile(ordered, 0.99),
            batch_cap=self.batch_cap,
            rate_factor=self.rate_factor,
            healthy=self.usable() and self.down_until <= time.monotonic(),
            supports_block_receipts=(
                True if "eth_getBlockReceipts" in self.supported
                else False if "eth_getBlockReceipts" in self.unsupported else None
            ),
        )

    def close(self) -> None:
        if self.budget is not None:
            self.budget.close()
