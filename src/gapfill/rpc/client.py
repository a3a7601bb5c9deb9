"""The JSON-RPC client: batching, id matching, rate budget, retries and failover.

A :meth:`RpcClient.call_many` request is cut into JSON-RPC batches no larger than
the chosen endpoint's current cap; each batch is a task that waits for a slot
(``max_in_flight``) and for its calls' tokens, posts, matches the reply by id and
settles every item on its own. Items that failed for a reason that may pass are
sent again, after a full-jitter backoff, preferably to another endpoint, as a new
batch of their own; the other items of the batch are already done.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

import orjson

from gapfill.errors import ConfigError, NodeUnavailable, RpcError
from gapfill.quantity import QuantityError, quantity
from gapfill.redact import redact_text, redact_url
from gapfill.rpc.classify import (
    MAX_HONOURED_WAIT_S,
    Fault,
    Verdict,
    classify_bad_body,
    classify_error,
    classify_exception,
    classify_http,
    node_failing,
)
from gapfill.rpc.config import Call, EndpointConfig, RpcSettings, checks
from gapfill.rpc.endpoint import Endpoint, EndpointStats
from gapfill.rpc.errors import CallError
from gapfill.rpc.slots import PRIORITY, PrioritySlots
from gapfill.rpc.tls import aiohttp
from gapfill.rpc.transport import AiohttpTransport, HttpReply, Transport
from gapfill.rpc.waits import Waits
from gapfill.wording import counted

logger = logging.getLogger(__name__)

_PENDING: Any = object()
_BLOCK_RECEIPTS = "eth_getBlockReceipts"
#: Seconds per request assumed while no endpoint has been measured: it weighs queued
#: requests against rate-limit waits (endpoints alike share requests evenly whatever it is).
UNMEASURED_LATENCY_S = 0.1


#: Called (in the caller's context) each time an HTTP exchange of a ``call_many``
#: answered at least one call. The engine sets it per batch, so a lease is renewed
#: only while *that batch* gets answers, not merely while its worker does.
ANSWERED: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "gapfill_rpc_answered", default=None
)


#: Where a result came from: the endpoint's position (in the order given) and the
#: request's number among those sent to it. Two results with one ``Via`` were answered in
#: one request, by one node (or one backend of a load balancer); on one endpoint, a lower
#: number was sent earlier.
Via = tuple[int, int]


_AVOID_NONE: frozenset[int] = frozenset()


@dataclass(slots=True)
class _Item:
    call: Call
    failures: int = 0  # attempts spent on transient failures
    #: Null answers to a ``null_retry`` call: "not found" takes ``attempts`` of them, never
    #: a mix with failures (a lagging node that also fails now and then is no proof).
    nulls: int = 0
    rate_limits: int = 0
    sent: bool = False
    #: Endpoints to avoid for this call; immutable, so the usual empty one is shared.
    avoid: frozenset[int] = _AVOID_NONE
    #: Where its result came from (see :data:`Via`).
    via: Via | None = None
    #: Start-up checks try a node that answers HTTP 5xx more than ``RpcSettings.attempts``
    #: times, so a flaky node is not refused for good on three unlucky answers. An
    #: unreachable or silent node still fails after ``attempts``.
    patient: bool = False


#: How many times ``RpcSettings.attempts`` a start-up check may try a failing node.
_PATIENCE = 2

#: The start-up check's outcome for an endpoint still silent when another had answered.
_LATE = object()


def _may_pass(error: CallError) -> bool:
    """Whether a start-up check that failed so may pass if tried again: every try failed
    with HTTP 5xx (or 408, 425, 429), a timeout, a refused or reset connection, a garbled
    body; not when the node refused the call or the endpoint answered HTTP 4xx or 501 (a
    web page's 404, a refused API key, a web server that takes no POST, a quota spent)."""
    code = error.code
    return error.kind == "transient" and error.fix is None and (
        code is None or not 400 <= code < 600 or node_failing(code) or code in (408, 425, 429))


def _as_id(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            return None
    return None


def _whole_batch_error(decoded: Any, first_id: int) -> Verdict | None:
    """The error a batch's reply gives for the batch as a whole, if it does: an error object
    alone, or a list of one error without an id or (geth's "batch too large" past its
    ``--rpc.batch-request-limit``) carrying the first call's id, a batch-size or rate limit.
    Read call by call, the calls it leaves out were each "no answer", a failure spending one
    of their attempts, and the batch size learned was one less than sent. Anything but a
    rate limit or a passing fault means "not like this": some providers refuse batches, or
    big ones, with an invalid-request error, so split."""
    if isinstance(decoded, list) and len(decoded) == 1 and isinstance(decoded[0], dict):
        entry = decoded[0]
        if entry.get("error") is None:
            return None
        answer_id = _as_id(entry.get("id"))
        if answer_id == first_id:  # the first call's own error, or the batch's?
            verdict = classify_error(entry["error"])
            whole = verdict.fault in (Fault.BATCH_TOO_LARGE, Fault.RATE_LIMITED)
            return verdict if whole else None
        if answer_id is not None:
            return None
        decoded = entry
    if not isinstance(decoded, dict) or decoded.get("error") is None:
        return None
    verdict = classify_error(decoded["error"])
    if verdict.fault in (Fault.PERMANENT, Fault.UNSUPPORTED):
        verdict = Verdict(Fault.BATCH_TOO_LARGE, verdict.message, verdict.code)
    return verdict


class RpcClient:
    """Async JSON-RPC client over one or more endpoints; use as ``async with``.

    One keep-alive HTTP session per client (a worker process makes one client).
    ``transport`` replaces the HTTP layer (tests). ``chain_said``: another client of the
    same run has said (at INFO) the chain id its probe found; this one logs it at DEBUG, so
    that ``-v`` says it once.
    """

    def __init__(
        self,
        endpoints: Sequence[EndpointConfig],
        settings: RpcSettings = RpcSettings(),  # noqa: B008 - frozen, safe to share
        *,
        expected_chain_id: int | None = None,
        transport: Transport | None = None,
        chain_said: bool = False,
    ) -> None:
        if not endpoints:
            raise ConfigError("no RPC endpoint configured; pass --rpc-url or set ETH_RPC_URL")
        if settings.attempts < 1 or settings.max_in_flight < 1:
            raise ConfigError("RPC attempts and max_in_flight must be at least 1")
        self._settings = settings
        self._expected_chain_id = expected_chain_id
        # -v says the chain once per run: a client made after another of the same run said
        # it (the sample's, a worker process's) logs it at DEBUG only.
        self._chain_log = logging.DEBUG if chain_said else logging.INFO
        self._urls = [e.url for e in endpoints]
        self._endpoints: list[Endpoint] = []
        seen: dict[str, int] = {}
        for index, config in enumerate(endpoints):
            key = redact_url(config.url)
            seen[key] = seen.get(key, 0) + 1
            if seen[key] > 1:
                key = f"{key}#{seen[key]}"
            self._endpoints.append(Endpoint(index, config, settings, key))
        self._transport: Transport = transport or AiohttpTransport(settings)
        # Metered calls: the earlier batch's requests first (see gapfill.rpc.slots); in
        # arrival order until then, and from an endpoint's first learned rate on.
        self._slots = PrioritySlots(
            settings.max_in_flight, prioritized=any(e.rps is not None for e in endpoints)
        )
        self._next_id = 1  # the next JSON-RPC request id
        self._chain_id: int | None = None
        self._probe_lock = asyncio.Lock()
        self._rng = random.Random()
        #: When some endpoint last sent an HTTP reply (any status: the node is there), and
        #: the last request that got none (refused, reset, timed out), redacted.
        self.last_reply_at = time.monotonic()
        self.last_transport_error = ""
        self._waits = Waits()
        #: Hears, once per endpoint, one that refused the API key while another could take
        #: its calls: it is set aside for the client's life (asking again cannot pass).
        self.tell: Callable[[str], None] | None = None
        #: Called with the sentence (redacted) each time a call fails because the endpoint
        #: refused the API key and no other could take it, or because no usable endpoint
        #: serves its method: a caller that makes many calls (a worker) stops at once rather
        #: than fail every one of them.
        self.on_refused: Callable[[str], None] | None = None

    @property
    def check(self) -> str:
        """What a message about the endpoints together tells the user to check: where their
        URLs came from (``--rpc-url``, ``ETH_RPC_URL`` or the config file's key)."""
        return checks(e.config for e in self._endpoints)

    @property
    def silent(self) -> str:
        """What a message about a call that got no reply within the read timeout adds: what
        to check, and the option (or config key) that sets the timeout."""
        return (f"the node does not answer: check that it is not stuck or overloaded, or raise "
                f"{self._settings.timeout_check}")  # fmt: skip

    async def __aenter__(self) -> RpcClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP session and the budget files."""
        await self._transport.aclose()
        for endpoint in self._endpoints:
            endpoint.close()

    # -- public calls ----------------------------------------------------------------------

    async def call(self, method: str, params: list[Any], *, null_retry: bool = False) -> Any:
        """One call; raises :class:`gapfill.errors.RpcError` when it has no result."""
        [out] = await self.call_many([Call(method, params, null_retry)])
        if isinstance(out, CallError):
            raise self._as_rpc_error(method, out)
        return out

    async def call_many(self, calls: Sequence[Call]) -> list[Any | CallError]:
        """Results (or :class:`CallError`) in the order of ``calls``."""
        return (await self._call_items(calls))[0]

    async def call_many_via(self, calls: Sequence[Call]) -> list[tuple[Any | CallError, Via | None]]:
        """As :meth:`call_many`, each result with where it came from (:data:`Via`; None for
        a :class:`CallError`): calls sent side by side usually travel in one request, but a
        cap on the batch size, a retry or an endpoint without one of the methods parts them."""
        results, items = await self._call_items(calls)
        return [(out, None if isinstance(out, CallError) else item.via)
                for out, item in zip(results, items, strict=True)]  # fmt: skip

    async def _call_items(self, calls: Sequence[Call]) -> tuple[list[Any], list[_Item]]:
        """The results of ``calls`` in their order, and their items (where each came from)."""
        items = [_Item(call) for call in calls]
        results: list[Any] = [_PENDING] * len(items)
        if items:
            await self._drive(list(range(len(items))), items, results, None)
        return results, items

    async def lowest_head(self) -> int:
        """The lowest ``eth_blockNumber`` of the usable endpoints (each asked once, at once):
        a block at or below it is one every endpoint has reached, whichever answers for it.
        One whose answer fails is left out (its calls fail, and go to the others), unless
        every one's does: then the first failure is raised."""
        usable = [e for e in self._endpoints if e.usable()]
        outs = await asyncio.gather(*(self._call_pinned(e, "eth_blockNumber", []) for e in usable))
        heads: dict[Endpoint, int] = {}
        for endpoint, out in zip(usable, outs, strict=True):
            with contextlib.suppress(QuantityError):
                heads[endpoint] = quantity(out, "eth_blockNumber")  # "10" is no head 16 either
        if not heads:
            failed = next((out for out in outs if isinstance(out, CallError)), None)
            if failed is not None:
                raise self._as_rpc_error("eth_blockNumber", failed)
            said = repr(str(outs[0])[:60]) if outs else "nothing (no usable endpoint)"
            raise RpcError(f"the node answered eth_blockNumber with {said}: check {self.check}")
        top, low = max(heads.values()), min(heads.values())
        for endpoint, head in heads.items():
            if head < top:
                logger.info("RPC endpoint %s is %s behind the others (at block %d)", endpoint.shown,
                            counted(top - head, "block"), head)  # fmt: skip
        return low

    def request_cap(self) -> int:
        """The most calls one request carries now, on whichever usable endpoint it goes to:
        the smallest cap (``max_batch``, one second of an ``rps``, or what refusals taught)."""
        return min((e.cap() for e in self._endpoints if e.usable()), default=1)

    def queued(self, priority: int) -> bool:
        """Whether requests of :data:`~gapfill.rpc.slots.PRIORITY` ``priority`` wait for
        their turn behind those of a lower one (only once calls are metered: before, they
        wait in arrival order, not long)."""
        return self._slots.prioritized and self._slots.queued(priority)

    def held_back(self, priority: int) -> bool:
        """Whether requests of :data:`~gapfill.rpc.slots.PRIORITY` ``priority`` wait by the
        client's own choice (its rate budget's tokens, a ``Retry-After`` pause, the backoff
        after a rate-limited or null answer), or wait for a slot while a request holding one
        waits so: held back on purpose, not stuck (:mod:`gapfill.rpc.waits`)."""
        waits = self._waits
        return waits.held(priority) or (waits.in_slot > 0 and self._slots.queued(priority))

    def silent_s(self) -> float:
        """Seconds spent trying to reach a node since some endpoint last replied: a request
        in flight, or waiting to be sent again after one that got no reply. Waits of the
        client's own choosing, and having nothing to send, do not count."""
        return self._waits.silent_s()

    def stats(self) -> dict[str, EndpointStats]:
        """Counters per endpoint, keyed by redacted URL."""
        return {e.key: e.stats() for e in self._endpoints}

    # -- probe -----------------------------------------------------------------------------

    async def probe(self, tell: Callable[[str], None] | None = None) -> int:
        """Check every endpoint's chain id (once).

        Unreachable endpoints are set aside for good with a warning, unless none is
        reachable; so is one still silent ``probe_grace_s`` after another endpoint answered
        (a hung endpoint must not hold the run for its every timeout). A chain id other
        than the expected one (or a disagreement between endpoints) raises
        :class:`gapfill.errors.RpcError`. ``tell`` hears, in one sentence each, the
        endpoints set aside and, once, that no answer came in ``slow_probe_notice_s``: a
        node that accepts connections but never answers is given up only after every
        attempt timed out, and the user should not stare at a silent terminal meanwhile.
        """
        async with self._probe_lock:
            if self._chain_id is not None:
                return self._chain_id
            outcomes = await self._ask_chain_ids(tell)
            reachable: list[tuple[Endpoint, int]] = []
            failed: list[tuple[Endpoint, str]] = []
            may_pass = False  # some endpoint failed only for a reason that may pass
            for endpoint, out in zip(self._endpoints, outcomes, strict=True):
                if out is _LATE:
                    failed.append((endpoint, f"the RPC node at {endpoint.shown} did not answer "
                                             f"eth_chainId within {self._settings.probe_grace_s:g} s "
                                             "of another endpoint's answer"))  # fmt: skip
                    continue
                if isinstance(out, CallError):
                    may_pass = may_pass or _may_pass(out)
                    message = self._as_rpc_error("eth_chainId", out).args[0]
                    if out.code is not None and node_failing(out.code):  # the node (or its gateway)
                        message += ("; the node is failing: try again later, or point "
                                    f"{endpoint.config.check} at another node")
                    elif "no response within" in message:  # up (it accepted), but silent
                        message += f"; {self.silent}"
                    elif out.fix is None and "check " not in message:  # an HTML page, HTTP 404 ...
                        message += (f"; check that {endpoint.config.check} is the JSON-RPC "
                                    "endpoint of an Ethereum node")
                    failed.append((endpoint, message))
                    continue
                chain_id = _as_id(out)
                if chain_id is None:
                    failed.append((endpoint, f"the RPC node at {endpoint.shown} answered "
                                             f"eth_chainId with {str(out)[:60]!r}"))
                    continue
                if chain_id < 1:
                    failed.append((endpoint, f"the RPC node at {endpoint.shown} reports chain id "
                                             f"{chain_id}, which is not a chain id: check "
                                             f"{endpoint.config.check}, "
                                             "or pass --chain-id N"))
                    continue
                endpoint.chain_id = chain_id
                reachable.append((endpoint, chain_id))
            if not reachable:
                raise (NodeUnavailable if may_pass else RpcError)(failed[0][1])
            for endpoint, message in failed:
                endpoint.disabled_reason = message
                logger.warning("RPC endpoint %s left out: %s", endpoint.shown, message)
                if tell is not None:
                    tell(f"left out for this run: {message}")
            expected = self._expected_chain_id
            for endpoint, chain_id in reachable:
                if expected is not None and chain_id != expected:
                    raise RpcError(
                        f"the RPC node at {endpoint.shown} serves chain {chain_id}, "
                        f"expected {expected}: check {endpoint.config.check}"
                    )
            first, first_id = reachable[0]
            for endpoint, chain_id in reachable[1:]:
                if chain_id != first_id:
                    raise RpcError(
                        f"the RPC nodes disagree: {first.shown} serves chain {first_id} but "
                        f"{endpoint.shown} serves chain {chain_id}; check {endpoint.config.check}"
                    )
            self._chain_id = first_id
            logger.log(self._chain_log, "chain id %d: RPC endpoint(s) %s kept for the run%s", first_id,
                        ", ".join(e.shown for e, _ in reachable),
                        f", {len(failed)} left out" if failed else "")  # fmt: skip
            return first_id

    def left_out(self) -> tuple[int, ...]:
        """After :meth:`probe`: the positions (in the order given) of the endpoints it left
        out for the run. A caller that builds more clients for the same run (worker
        processes) builds them without these, so none of them waits for them again."""
        return tuple(e.index for e in self._endpoints if e.disabled_reason is not None)

    async def _ask_chain_ids(self, tell: Callable[[str], None] | None) -> list[Any]:
        """Each endpoint's answer to ``eth_chainId`` (or its :class:`CallError`), in order."""
        loop = asyncio.get_running_loop()
        tasks = {e.index: asyncio.create_task(self._call_pinned(e, "eth_chainId", []))
                 for e in self._endpoints}  # fmt: skip
        outcomes: dict[int, Any] = {}
        notice = None
        if tell is not None:
            notice = loop.call_later(self._settings.slow_probe_notice_s, self._say_slow, tell, tasks)
        grace = self._settings.probe_grace_s
        deadline: float | None = None  # set once some endpoint gave a chain id
        try:
            while len(outcomes) < len(tasks):
                pending = [t for i, t in tasks.items() if i not in outcomes]
                timeout = None if deadline is None else max(0.0, deadline - loop.time())
                done, _ = await asyncio.wait(pending, timeout=timeout,
                                             return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                if not done:
                    break
                for i, t in tasks.items():
                    if t in done:
                        outcomes[i] = t.result()
                        if deadline is None and (_as_id(outcomes[i]) or 0) >= 1:
                            deadline = loop.time() + grace
        finally:
            if notice is not None:
                notice.cancel()
            late = [t for i, t in tasks.items() if i not in outcomes]
            for t in late:
                t.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        return [outcomes.get(e.index, _LATE) for e in self._endpoints]

    def _say_slow(self, tell: Callable[[str], None], tasks: dict[int, asyncio.Task[Any]]) -> None:
        s = self._settings
        now = time.monotonic()
        waiting = [e for e in self._endpoints if not tasks[e.index].done()]
        paused = [e for e in waiting if e.paused_until > now]
        if paused:  # nothing was sent: the provider's own pause, not the node, holds the check
            e = max(paused, key=lambda e: e.paused_until)
            by = " (left by an earlier run or another gapfill process)" if e.sends == 0 else ""
            tell(f"waiting for the RPC node ({', '.join(e.shown for e in paused)}): paused by the "
                 f"provider's Retry-After for {e.paused_until - now:.0f} s more{by}")
            return
        budgeted = [e for e in waiting if e.budget_until > now]
        if budgeted:  # not sent yet: this host's --rps budget, spent ahead of it, holds the check
            e = max(budgeted, key=lambda e: e.budget_until)
            left = e.budget_until - now
            tell(f"waiting for this host's rate budget, not for the RPC node "
                 f"({', '.join(e.shown for e in budgeted)}): its {e.config.rps or 0:g} calls/s are "
                 "shared by every gapfill process of this host, and another process (or an earlier "
                 f"run) has spent them ahead of this one: the check goes in {left:.0f} s")  # fmt: skip
            return
        shown = ", ".join(e.shown for e in waiting)
        tries = f"{s.attempts} tries" if s.attempts > 1 else "1 try"
        tell(f"waiting for the RPC node ({shown}): no answer to eth_chainId after "
             f"{s.slow_probe_notice_s:g} s; it gets {tries} of {s.read_timeout_s:g} s each "
             f"({s.timeout_check})")  # fmt: skip

    async def probe_block_receipts(self, block_number: int) -> bool:
        """Whether some usable endpoint has ``eth_getBlockReceipts``, asked (once per
        endpoint) for a block the caller needs anyway: only a plan that may fetch whole
        blocks asks, and never for 'latest', whose receipts are megabytes on mainnet."""
        served = await self.supports(_BLOCK_RECEIPTS, [hex(block_number)])
        # Each worker process of a run asks (the first that needs it); its coordinator
        # writes the answer once (`once`: see gapfill.engine.run.log_here).
        logger.info("%s %s: %s", _BLOCK_RECEIPTS, "served" if served else "not served",
                    "blocks with many refs are fetched whole" if served
                    else "every transaction is fetched on its own", extra={"once": True})  # fmt: skip
        return served

    def supports_block_receipts(self) -> bool:
        """After :meth:`probe_block_receipts`: True when some usable endpoint has
        ``eth_getBlockReceipts``."""
        return any(e.usable() and _BLOCK_RECEIPTS in e.supported for e in self._endpoints)

    async def supports(self, method: str, params: list[Any]) -> bool:
        """Whether some usable endpoint serves ``method`` (tried once with ``params``, cached)."""
        return await self._answers(method, params) is True

    async def _answers(self, method: str, params: list[Any]) -> bool | None:
        """True if some usable endpoint serves ``method``; False if every one refused it;
        None if none said yes but some could not tell (their answers failed)."""
        usable = [e for e in self._endpoints if e.usable()]
        answers = await asyncio.gather(*(self._endpoint_supports(e, method, params) for e in usable))
        if any(a is True for a in answers):
            return True
        return None if any(a is None for a in answers) else False

    async def require(self, methods: Sequence[str], params: list[Any], why: str) -> None:
        """Raise :class:`RpcError` if every usable endpoint refuses one of ``methods`` (each
        tried once with ``params``): one sentence up front instead of every call failing
        later. A node whose answers fail (a flaky provider) is not taken for one without
        the method: the run goes on, and its calls are retried as usual."""
        served = await asyncio.gather(*(self._answers(m, params) for m in methods))
        missing = [m for m, ok in zip(methods, served, strict=True) if ok is False]
        if missing:
            raise RpcError(self._not_served(missing, f", which {why}").message)

    def _not_served(self, methods: Sequence[str], why: str = "") -> CallError:
        """The failure of a call whose method no usable endpoint serves (said as the
        start-up check says it, ``why`` after the methods): not ``permanent``, as the node
        is at fault, not the call."""
        shown = ", ".join(e.shown for e in self._endpoints if e.usable())
        return CallError.refused(f"the RPC node ({shown}) does not serve {' or '.join(methods)}{why}",
                                 f"point {self.check} at another node")  # fmt: skip

    def _none_serves(self, method: str, said: str = "") -> CallError:
        """A call's failure mid-run when no usable endpoint serves ``method`` (``said``: the
        last one's answer, if this call heard it): :attr:`on_refused` hears it, so that a
        worker stops with the sentence (its refs left in the gap) rather than fail every
        call."""
        error = self._not_served([method], f" (asked twice, it answered: {said})" if said else "")
        if self.on_refused is not None:
            self.on_refused(error.message)
        return error

    async def _endpoint_supports(
        self, endpoint: Endpoint, method: str, params: list[Any]
    ) -> bool | None:
        """True or False as the endpoint answered; None when its answer failed. "Method not
        found" is believed when a second request says it too, as for a run's calls (see
        :meth:`_believed`): a load balancer's one bad backend says it of methods it serves."""
        if method in endpoint.supported:
            return True
        if method in endpoint.unsupported:
            return False
        out = await self._call_pinned(endpoint, method, params)
        if isinstance(out, CallError):
            if method in endpoint.unsupported:
                return False
            if out.kind == "permanent":  # e.g. invalid params: the method exists
                endpoint.supported.add(method)
                return True
            logger.warning(
                "could not tell whether %s serves %s: %s", endpoint.shown, method, out.message
            )
            return None
        endpoint.supported.add(method)
        return True

    async def _call_pinned(self, endpoint: Endpoint, method: str, params: list[Any]) -> Any:
        items = [_Item(Call(method, params), patient=True)]
        results: list[Any] = [_PENDING]
        await self._drive([0], items, results, endpoint)
        return results[0]

    # -- scheduling ------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        return redact_text(text, *self._urls)

    def _as_rpc_error(self, method: str, error: CallError) -> RpcError:
        if error.message.startswith("could not reach"):
            return RpcError(error.message)
        if error.kind == "not_found":
            return RpcError(f"{method} returned no result: {error.message}")
        return error.failed(f"{method} failed")

    def _pick(
        self, method: str | None, avoid: frozenset[int], pin: Endpoint | None, calls: int
    ) -> tuple[Endpoint, float] | None:
        """The endpoint for the next batch of (about) ``calls`` calls, and how long to wait
        before sending it: the one expected to answer first, counting the batches already
        handed to each, its measured latency and its rate limit. A slow endpoint beside a
        fast one gets only what the fast one could not answer sooner."""
        now = time.monotonic()
        if pin is not None:
            return pin, max(0.0, pin.available_at() - now)
        candidates = [
            e for e in self._endpoints
            if e.usable() and not (method is not None and method in e.unsupported)
        ]
        if not candidates:
            return None
        up = [e for e in candidates if e.available_at() <= now]
        if up:
            preferred = [e for e in up if e.index not in avoid] or up
            estimates = {e.index: e.latency_estimate(now) for e in preferred}
            # An endpoint not yet measured is taken to be as fast as the fastest one
            # measured, so it is tried; with none measured, a typical provider's.
            known = [s for s in estimates.values() if s is not None]
            stand_in = min(known) if known else UNMEASURED_LATENCY_S
            return min(preferred, key=lambda e: (
                e.load_score(calls, estimates[e.index] or stand_in, now), e.assigned_requests,
                e.index)), 0.0
        soonest = min(candidates, key=lambda e: e.available_at())
        return soonest, soonest.available_at() - now

    async def _drive(
        self, indices: list[int], items: list[_Item], results: list[Any], pin: Endpoint | None
    ) -> None:
        restricted: set[str] = set()
        for endpoint in self._endpoints:
            restricted |= endpoint.unsupported
        groups: dict[tuple[frozenset[int], str | None], list[int]] = {}
        if not restricted and not any(items[i].avoid for i in indices):
            groups[(_AVOID_NONE, None)] = indices  # the usual case: a call_many's first send
        else:
            for i in indices:
                name = items[i].call.method
                key = (items[i].avoid, name if name in restricted else None)
                groups.setdefault(key, []).append(i)
        async with asyncio.TaskGroup() as tasks:
            for (avoid, method), group in groups.items():
                remaining = group
                while remaining:
                    choice = self._pick(method, avoid, pin, len(remaining))
                    if choice is None:  # ``method`` is set: only a method set aside leaves none
                        error = self._none_serves(items[remaining[0]].call.method)
                        for i in remaining:
                            results[i] = error
                        break
                    endpoint, wait = choice
                    chunk, remaining = remaining[: endpoint.cap()], remaining[endpoint.cap():]
                    endpoint.assigned_calls += len(chunk)
                    endpoint.assigned_requests += 1
                    tasks.create_task(self._dispatch(endpoint, wait, chunk, items, results, pin))

    async def _dispatch(
        self,
        endpoint: Endpoint,
        wait: float,
        chunk: list[int],
        items: list[_Item],
        results: list[Any],
        pin: Endpoint | None,
    ) -> None:
        before = [(items[i].nulls, items[i].failures) for i in chunk]
        try:
            if wait > 0:  # every endpoint is set aside or paused: wait for the first to come back
                # A pause (Retry-After) is the client's choice; the breaker's set-aside
                # (failed requests) is trying to reach a node that does not answer well.
                paused = endpoint.paused_until >= endpoint.down_until
                with self._held() if paused else self._waits.trying():
                    await asyncio.sleep(wait)
            again = await self._exchange(endpoint, chunk, items, results, pin)
        finally:
            endpoint.assigned_calls -= len(chunk)
            endpoint.assigned_requests -= 1
        if len(again) < len(chunk):
            hook = ANSWERED.get()
            if hook is not None:
                hook()
        if not again:
            return
        retried = set(again)
        # The items asked again because they answered null this time (not because they failed).
        nulled = max((items[i].nulls for i, (nulls, _) in zip(chunk, before, strict=True)
                      if i in retried and items[i].nulls > nulls), default=0)  # fmt: skip
        # Some failed (no reply, a 5xx, ...): the backoff is part of trying to reach a node.
        # Only rate-limited or null answers (or a batch too large): the client's choice.
        failed = any(items[i].failures > failures for i, (_, failures) in zip(chunk, before, strict=True)
                     if i in retried)  # fmt: skip
        delay = self._retry_delay(again, items, nulled)
        if logger.isEnabledFor(logging.DEBUG):
            why = ("null answers" if nulled else "rate limited" if any(items[i].rate_limits for i in again)
                   else "failed or too large a batch")  # fmt: skip
            logger.debug("%d call(s) from %s sent again in %.2f s: %s", len(again), endpoint.shown, delay,
                         why)  # fmt: skip
        if delay > 0:
            with self._waits.trying() if failed else self._held():
                await asyncio.sleep(delay)
        await self._drive(again, items, results, pin)

    def _held(self) -> contextlib.AbstractContextManager[None]:
        """A wait of the client's own choosing, of the request in this context."""
        return self._waits.by_choice(PRIORITY.get())

    def _held_in_slot(self) -> contextlib.AbstractContextManager[None]:
        """The same, while the request holds one of the client's slots."""
        return self._waits.by_choice(PRIORITY.get(), in_slot=True)

    def _retry_delay(self, again: list[int], items: list[_Item], nulled: int) -> float:
        """How long to wait before sending ``again``: full jitter over the tries spent, and,
        when some of them answered null (``nulled``: the most nulls among those), at least
        ``null_backoff_s`` doubled per null, so a lagging node gets time to catch up."""
        s = self._settings
        delay = 0.0
        spent = max(items[i].failures + items[i].nulls + items[i].rate_limits for i in again)
        if spent:
            delay = self._rng.uniform(0.0, min(s.backoff_max_s, s.backoff_base_s * 2 ** (spent - 1)))
        if nulled:
            delay = max(delay, min(s.null_backoff_max_s, s.null_backoff_s * 2 ** (nulled - 1)))
        return delay

    # -- one HTTP exchange -------------------------------------------------------------------

    async def _exchange(
        self,
        endpoint: Endpoint,
        chunk: list[int],
        items: list[_Item],
        results: list[Any],
        pin: Endpoint | None,
    ) -> list[int]:
        """Send one batch; settle what can be settled; return the items to send again."""
        # The chunk's ids are consecutive: id first + k is the chunk's k-th call.
        first = self._next_id
        self._next_id = first + len(chunk)
        by_id = dict(zip(range(first, self._next_id), chunk))  # noqa: B905 - same length
        calls = [items[i].call for i in chunk]
        payload: list[dict[str, Any]] = [
            {"jsonrpc": "2.0", "id": request_id, "method": call.method, "params": call.params}
            for request_id, call in zip(range(first, self._next_id), calls)  # noqa: B905
        ]
        single = len(payload) == 1
        body = orjson.dumps(payload[0] if single else payload)
        reply: HttpReply | None = None
        failure: Verdict | None = None
        # A start-up check (``pin``: one call per endpoint) takes no slot: with one slot (a
        # sequential client), a hung endpoint's check held it until its every try timed out,
        # and the other endpoints' checks waited behind it, so the probe could not leave
        # the hung one out ``probe_grace_s`` after another answered.
        slot: contextlib.AbstractAsyncContextManager[Any] = (
            self._slots if pin is None else contextlib.nullcontext()
        )
        async with slot:
            if len(chunk) > endpoint.cap():
                # The cap shrank while this batch waited for a slot: split it first.
                return list(chunk)
            await endpoint.acquire(len(chunk), self._held_in_slot if pin is None else self._held)
            if len(chunk) > endpoint.cap():
                # It shrank while this batch waited for its tokens (a rate learned from
                # 429s): sent as it is, it would only be refused again.
                endpoint.refund(len(chunk))
                await endpoint.release()
                return list(chunk)
            for i in chunk:
                if items[i].sent:
                    endpoint.retries += 1
                items[i].sent = True
            started = time.monotonic()
            timed_out = False
            sequence = endpoint.sends  # see Endpoint.doubted
            endpoint.sends += 1
            self._waits.start_trying()
            try:
                reply = await self._transport.post(endpoint.url, body)
                self.last_reply_at = time.monotonic()
                self._waits.replied()
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                failure = classify_exception(exc, read_timeout_s=self._settings.read_timeout_s)
                self.last_transport_error = f"{endpoint.shown}: {self._redact(failure.message)}"
                timed_out = isinstance(exc, aiohttp.ServerTimeoutError | TimeoutError)
            finally:
                self._waits.stop_trying()
                await endpoint.release()
            latency = time.monotonic() - started
        if reply is not None or not (failure and failure.unreachable):  # it reached the node
            endpoint.record_request(len(chunk), len(body), len(reply.body) if reply else 0, latency)
        if logger.isEnabledFor(logging.DEBUG):  # one record per HTTP request, not per call
            logger.debug("POST %s: %d call(s) (%s ...), %d B sent, %s in %.3f s", endpoint.shown, len(chunk),
                         items[chunk[0]].call.method, len(body),
                         f"HTTP {reply.status}, {len(reply.body)} B" if reply is not None
                         else f"no reply ({self._redact(failure.message) if failure else '?'})",
                         latency)  # fmt: skip
        if reply is None:
            assert failure is not None
            if timed_out:  # a refused connection or a 5xx says nothing of its speed
                endpoint.observe_latency(latency, start_up=pin is not None)
            return self._fail_request(endpoint, chunk, items, results, failure, pin)
        failure = classify_http(reply.status, reply.headers, reply.body)
        if failure is not None:
            return self._fail_request(endpoint, chunk, items, results, failure, pin)
        endpoint.observe_latency(latency, start_up=pin is not None)
        try:
            decoded = orjson.loads(reply.body)
        except orjson.JSONDecodeError:
            return self._fail_request(
                endpoint, chunk, items, results, classify_bad_body(reply.body), pin
            )
        whole = None if single else _whole_batch_error(decoded, payload[0]["id"])
        if whole is not None:
            return self._fail_request(endpoint, chunk, items, results, whole, pin)
        if isinstance(decoded, dict):
            if single and _as_id(decoded.get("id")) is None and decoded.get("error") is not None:
                decoded = {**decoded, "id": payload[0]["id"]}
            decoded = [decoded]
        if not isinstance(decoded, list):
            return self._fail_request(
                endpoint, chunk, items, results,
                Verdict(Fault.TRANSIENT, "the reply is JSON but not a JSON-RPC response"), pin,
            )
        answers: dict[int, dict[str, Any]] = {}
        duplicates = 0
        for entry in decoded:
            if type(entry) is not dict:  # parsed JSON: a plain dict, or no answer
                continue
            answer_id = entry.get("id")
            if type(answer_id) is not int:  # the ids sent; a node may echo them as text
                answer_id = _as_id(answer_id)
            if answer_id is None or answer_id not in by_id:
                continue
            if answer_id in answers:
                duplicates += 1  # first answer wins; a repeat is a provider bug
                continue
            answers[answer_id] = entry
        if duplicates:
            logger.debug("%s repeated %d ids in one reply", endpoint.shown, duplicates)
        return self._settle_reply(endpoint, by_id, answers, items, results, pin, sequence)

    def _settle_reply(
        self,
        endpoint: Endpoint,
        by_id: dict[int, int],
        answers: dict[int, dict[str, Any]],
        items: list[_Item],
        results: list[Any],
        pin: Endpoint | None,
        sequence: int,
    ) -> list[int]:
        """Settle a reply's answers; ``sequence``: the request's number among those sent to
        ``endpoint`` (see :attr:`Endpoint.doubted`). Return the items to send again."""
        again: list[int] = []
        answered = 0
        rate_limited: list[Verdict] = []
        too_large: list[int] = []
        unanswered: list[int] = []
        supported = endpoint.supported
        via = (endpoint.index, sequence)  # one tuple for the reply's every result
        for request_id, i in by_id.items():
            entry = answers.get(request_id)
            item = items[i]
            if entry is None:
                unanswered.append(i)  # settled once it is known whether any was too large
                continue
            if entry.get("error") is not None:
                verdict = classify_error(entry["error"])
                if verdict.fault is Fault.UNSUPPORTED:
                    verdict = self._believed(endpoint, item.call.method, verdict, sequence)
                elif verdict.fault is Fault.PERMANENT:  # e.g. invalid params: the method exists
                    supported.add(item.call.method)
            elif "result" in entry:
                answered += 1
                supported.add(item.call.method)
                result = entry["result"]
                if result is None and item.call.null_retry:
                    item.nulls += 1
                    item.avoid = item.avoid | {endpoint.index}
                    if item.nulls >= self._settings.attempts:
                        results[i] = CallError("not_found", f"still null after {item.nulls} answers")
                    else:
                        again.append(i)
                else:
                    results[i] = result
                    item.via = via
                continue
            else:
                verdict = Verdict(Fault.TRANSIENT, "malformed answer: neither result nor error")
            if verdict.fault is Fault.RATE_LIMITED:
                rate_limited.append(verdict)
            else:
                endpoint.errors += 1
            if verdict.fault is Fault.RATE_LIMITED:
                pass
            elif verdict.fault is Fault.BATCH_TOO_LARGE:
                too_large.append(i)
                continue
            elif verdict.fault is Fault.PERMANENT:
                answered += 1
            if self._settle_item(endpoint, i, item, verdict, results, pin):
                again.append(i)
        if too_large:
            # A reply that refused calls as too large and left others out left them out
            # for the same reason: they are sent again in the smaller batches too.
            too_large += unanswered
            unanswered = []
        for i in unanswered:
            endpoint.errors += 1
            verdict = Verdict(Fault.TRANSIENT, "the batch reply had no answer for this call")
            if self._settle_item(endpoint, i, items[i], verdict, results, pin):
                again.append(i)
        if too_large:
            sent = len(by_id)
            # Only the calls answered were accepted (too_large holds those left out too).
            endpoint.shrink_batch(sent, accepted=sent - len(too_large) or None)
            if sent == 1:
                endpoint.record_failure("a batch of one call was refused as too large")
                for i in too_large:
                    if self._settle_item(
                        endpoint, i, items[i],
                        Verdict(Fault.TRANSIENT, "refused even a batch of one call"), results, pin,
                    ):
                        again.append(i)
            else:
                again.extend(too_large)
        if rate_limited:
            hint = max((v.retry_after_s or 0.0 for v in rate_limited), default=0.0)
            endpoint.record_accepted(len(by_id) - len(rate_limited))
            self._rate_limited(endpoint, hint or None, len(rate_limited), len(by_id))
        elif answered:
            endpoint.record_success(len(by_id))
        return again

    def _believed(self, endpoint: Endpoint, method: str, verdict: Verdict, sequence: int) -> Verdict:
        """A call's "method not found" (-32601, -32004, "not supported") as it is taken. One
        answer proves little behind a load balancer, whose one bad backend may say it of a
        method the others serve, and believing it set the method aside for the client's
        life: every later call of it failed unsent. From an endpoint that has answered the
        method it is a failure that may pass (sent again, elsewhere if it can be); from one
        that never has, it is believed (UNSUPPORTED) once a request sent after the first
        such answer arrived says it again, and until then it may pass too. A request already
        in flight then is no second look: two sent at the same moment may both have met the
        same bad backend. ``sequence``: this request's number (see :attr:`Endpoint.doubted`)."""
        if method in endpoint.supported:
            return replace(verdict, fault=Fault.TRANSIENT)
        first = endpoint.doubted.setdefault(method, endpoint.sends)
        if sequence >= first:
            return verdict
        return replace(verdict, fault=Fault.TRANSIENT)

    def _fail_request(
        self,
        endpoint: Endpoint,
        chunk: list[int],
        items: list[_Item],
        results: list[Any],
        verdict: Verdict,
        pin: Endpoint | None,
    ) -> list[int]:
        """The whole request failed: one verdict for every item of the batch."""
        verdict = replace(verdict, message=self._redact(verdict.message))
        if verdict.fault is Fault.BATCH_TOO_LARGE and len(chunk) > 1:
            endpoint.shrink_batch(len(chunk), message=verdict.message)
            return list(chunk)
        if verdict.fault is Fault.RATE_LIMITED:
            self._rate_limited(endpoint, verdict.retry_after_s, 1, len(chunk))
        else:
            endpoint.record_failure(verdict.message)
            if verdict.auth_refused and pin is None:
                self._set_aside_refusing(endpoint, verdict)
            if verdict.fault is not Fault.TRANSIENT:
                # An HTTP-level refusal (401, 404, ...) is about the endpoint, not the
                # calls: let another endpoint try them.
                verdict = replace(verdict, fault=Fault.TRANSIENT)
        logger.debug("request to %s failed: %s", endpoint.shown, verdict.message)
        return [
            i for i in chunk if self._settle_item(endpoint, i, items[i], verdict, results, pin)
        ]

    def _rate_limited(
        self, endpoint: Endpoint, retry_after_s: float | None, count: int, calls: int
    ) -> None:
        endpoint.record_rate_limited(retry_after_s, count=count, refused_calls=calls)
        if endpoint.rate_rps() is not None:
            # It learned a rate: its calls are metered from now on, and a worker's batches
            # in flight, served in arrival order, would share it evenly and finish late
            # together; the earlier batch's requests go first instead.
            self._slots.by_priority()

    def _refusal(self, endpoint: Endpoint, verdict: Verdict) -> CallError:
        return CallError.refused(
            f"the RPC node at {endpoint.shown} refused the request (HTTP {verdict.code})",
            f"check the API key in {endpoint.config.check}", verdict.code,
        )  # fmt: skip

    def _quota_spent(self, endpoint: Endpoint, hint_s: float) -> CallError:
        """A rate limit whose wait hint is above :data:`MAX_HONOURED_WAIT_S`: the provider's
        quota (a day's, a month's) is spent; another endpoint, if any, takes the calls."""
        later = f"about {hint_s / 3600:.0f} h" if hint_s >= 5400 else f"about {hint_s / 60:.0f} min"
        return CallError.refused(
            f"the provider at {endpoint.shown} asks to wait {hint_s:.0f} s (Retry-After): its quota is spent",
            f"run again in {later}, or add another endpoint to {endpoint.config.check}", 429,
        )  # fmt: skip

    def _set_aside_refusing(self, endpoint: Endpoint, verdict: Verdict) -> None:
        """An endpoint refused the API key: with another usable one left, it takes no more
        calls (asking again cannot pass), said once. The last one is kept: its calls fail
        with the sentence (and :attr:`on_refused` hears it) instead of "no endpoint"."""
        if not endpoint.usable() or not any(e is not endpoint and e.usable() for e in self._endpoints):
            return
        endpoint.disabled_reason = self._refusal(endpoint, verdict).message
        logger.warning("RPC endpoint %s set aside: %s", endpoint.shown, endpoint.disabled_reason,
                       extra={"once": True})  # each worker's client finds it out: said once
        if self.tell is not None:
            self.tell(f"set aside for this run: {endpoint.disabled_reason}; the other endpoints "
                      "take its calls")  # fmt: skip

    def _elsewhere(self, endpoint: Endpoint, item: _Item) -> bool:
        """Whether an endpoint other than ``endpoint`` may serve ``item``'s call."""
        return any(e is not endpoint and e.usable() and item.call.method not in e.unsupported
                   for e in self._endpoints)  # fmt: skip

    def _settle_item(
        self,
        endpoint: Endpoint,
        i: int,
        item: _Item,
        verdict: Verdict,
        results: list[Any],
        pin: Endpoint | None,
    ) -> bool:
        """Record one failed item; True when it should be sent again."""
        message = self._redact(verdict.message)
        fault = verdict.fault
        if fault is Fault.RATE_LIMITED:
            item.rate_limits += 1
            item.avoid = item.avoid | {endpoint.index}
            hint = verdict.retry_after_s or 0.0
            if hint > MAX_HONOURED_WAIT_S and (pin is not None or not self._elsewhere(endpoint, item)):
                # A quota spent, not a pause: waited out 600 s a try, it took hours, silently.
                results[i] = self._quota_spent(endpoint, hint)
                if pin is None and self.on_refused is not None:
                    self.on_refused(results[i].message)
                return False
            if item.rate_limits >= self._settings.rate_limit_attempts:
                results[i] = CallError(
                    "transient",
                    f"{endpoint.shown} kept rate limiting after {item.rate_limits} tries: {message}",
                    verdict.code,
                )
                return False
            return True
        if fault in (Fault.TRANSIENT, Fault.BATCH_TOO_LARGE):
            item.failures += 1
            item.avoid = item.avoid | {endpoint.index}
            limit = self._settings.attempts
            if item.patient and verdict.code is not None and node_failing(verdict.code):
                limit *= _PATIENCE
            if verdict.auth_refused and (pin is not None or not self._elsewhere(endpoint, item)):
                # A refused key does not pass by asking again: said at once.
                refusal = self._refusal(endpoint, verdict)
                results[i] = refusal
                if pin is None and self.on_refused is not None:
                    self.on_refused(refusal.message)
                return False
            if item.failures >= limit:
                if verdict.unreachable:
                    text = (f"could not reach the RPC node at {endpoint.shown}: {message}; "
                            f"check {endpoint.config.check}")
                else:
                    text = f"{message} (at {endpoint.shown}, after {counted(item.failures, 'attempt')})"
                results[i] = CallError("transient", text, verdict.code)
                return False
            return True
        if fault is Fault.UNSUPPORTED:
            method = item.call.method
            if pin is None and method not in endpoint.unsupported:  # said twice (see _believed)
                # Each worker of a run finds it out: its coordinator says it once.
                logger.warning("RPC endpoint %s does not serve %s: %s", endpoint.shown, method, message,
                               extra={"once": True})  # fmt: skip
            endpoint.unsupported.add(method)
            endpoint.supported.discard(method)
            if pin is None:  # its calls go to the others, if any
                if self._elsewhere(endpoint, item):
                    return True
                results[i] = self._none_serves(method, message)
                return False
        results[i] = CallError("permanent", message, verdict.code)
        return False

