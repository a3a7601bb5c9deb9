"""Range queries a node may refuse: split on refusal, grow back after successes.

``eth_getLogs`` and ``trace_filter`` take a block range, and providers cap it:
by span ("exceeds max block range 2000"), by result count ("query returned more
than 10000 results"), or by response size. :func:`scan_ranges` sends windows of
an :class:`AdaptiveWindow`'s current width through ``call_many`` (several in
flight at once) and, when a window is refused:

1. uses the provider's hint when it gives one ("Try with this block range
   [0x10, 0x3f]", geth/Alchemy/Infura style) and it starts where the window did;
2. else uses a stated cap ("max block range 2000", "up to a 2K block range");
3. else halves the window.

A window that got no reply within the read timeout is halved too (a range too heavy for
the node), but only once without an answer in between: a node that answers nothing is
down, and the scan ends saying so rather than halving down to one block.

A node behind the head answers a range past its own head as if it held nothing there
(``trace_filter``: ``[]``; ``eth_getLogs``: the logs up to its head), with no error: a
second ``--rpc-url`` still syncing, a load balancer's stale backend. So each window goes
with ``eth_getBlockByNumber(hi)`` just before it (:func:`call_reaching`), and its answer is
kept only from a node that had block ``hi`` in the same request (or an earlier one to the
same endpoint); otherwise the window is asked again, and a node that never has ``hi``
ends the scan saying so, with nothing recorded as scanned past what was proven. One extra
call per window.

After ``grow_after`` successes in a row at full width, the width doubles again
(up to ``max_blocks``), because result-count limits depend on how busy a stretch
of the chain is, not on a fixed span; a span cap the node states is one, so the
width never grows past it (each growth would be refused again).
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gapfill.errors import RpcError
from gapfill.model import Ref
from gapfill.quantity import QuantityError, quantity
from gapfill.rpc import Call, CallError, RpcClient

logger = logging.getLogger(__name__)

Interval = tuple[int, int]
#: Takes a round's windows and the refs found in them (a scan's way to hand refs over early).
OnRefs = Callable[[list[Interval], list[Ref]], Awaitable[None]]
#: Turns a scan's answers (window, result) into refs.
RefsOf = Callable[[list[tuple[Interval, Any]]], list[Ref]]

_NUM = r"(0x[0-9a-fA-F]+|\d+)"
_HINT = re.compile(rf"\[\s*{_NUM}\s*,\s*{_NUM}\s*\]")
_CAP = re.compile(
    r"(?:max(?:imum)?|up to an?|limit(?:ed)? (?:of|to)?|at most)\s*(?:block\s*range|range)?"
    r"\s*(?:of|is|:)?\s*(\d+)\s*([kK])?\s*(?:-?\s*block)?",
    re.IGNORECASE,
)
_TIMEOUT = re.compile(r"time.?out|timed out|no response within", re.IGNORECASE)
#: Answers of a window whose node could not be shown to have its last block, in a row,
#: before the scan gives up on it.
PROOF_TRIES = 3


def _int(text: str) -> int:
    return int(text, 16) if text.lower().startswith("0x") else int(text)


def block_number(value: Any, what: str) -> int:
    """A block number as a node sends it: a hex quantity, or (Otterscan) a JSON number; else
    the :class:`RpcError` that names ``what`` ("a log of 0x.. (eth_getLogs)") and the value
    (``int(v, 16)`` read a decimal "10" as block 16, and garbage raised an internal error)."""
    try:
        return quantity(value, f"the blockNumber of {what}")
    except QuantityError as exc:
        raise RpcError(f"{exc}: the node answers in a form gapfill cannot read; use another node") from None


def parse_hint(message: str, lo: int, hi: int) -> Interval | None:
    """A suggested sub-range ``[lo, y]`` of ``[lo, hi]`` in a refusal message, if usable."""
    for match in _HINT.finditer(message):
        x, y = _int(match.group(1)), _int(match.group(2))
        if x == lo and lo <= y < hi:
            return (x, y)
    return None


def parse_cap(message: str) -> int | None:
    """A block-span cap stated in a refusal message ("max block range 2000", "2K block range")."""
    if "range" not in message.lower():
        return None
    match = _CAP.search(message)
    if match is None:
        return None
    n = int(match.group(1)) * (1000 if match.group(2) else 1)
    return n if n >= 1 else None


@dataclass(slots=True)
class AdaptiveWindow:
    """The block span to ask for next; shared by every range of one scan."""

    blocks: int = 2_000
    min_blocks: int = 1
    max_blocks: int = 100_000
    grow_after: int = 3
    refusals: int = 0
    _streak: int = 0

    def refused(self, new_width: int) -> None:
        self.refusals += 1
        self._streak = 0
        self.blocks = max(self.min_blocks, min(self.blocks, new_width))

    def capped(self, cap: int) -> None:
        """A span the node says it never exceeds ("max block range 2000"): never grow past it."""
        self.max_blocks = max(self.min_blocks, min(self.max_blocks, cap))
        self.blocks = min(self.blocks, self.max_blocks)

    def succeeded(self, span: int) -> None:
        if span < self.blocks:
            return  # a short tail says nothing about whether wider windows would pass
        self._streak += 1
        if self._streak >= self.grow_after and self.blocks < self.max_blocks:
            self.blocks = min(self.max_blocks, self.blocks * 2)
            self._streak = 0


def split_refused(lo: int, hi: int, message: str) -> tuple[list[Interval], int]:
    """How to cut a refused ``[lo, hi]``: the pieces, and the width to use from now on."""
    span = hi - lo + 1
    hint = parse_hint(message, lo, hi)
    if hint is not None:
        return [hint, (hint[1] + 1, hi)], hint[1] - hint[0] + 1
    cap = parse_cap(message)
    if cap is not None and cap < span:
        return [(lo, lo + cap - 1), (lo + cap, hi)], cap
    half = span // 2
    return [(lo, lo + half - 1), (lo + half, hi)], half


def _refusal(error: CallError) -> bool:
    """Whether a failed range query is worth splitting (the node said no to the range, or
    took too long over it); see :func:`_silent` for a timeout that is an outage."""
    if error.message.startswith("could not reach"):  # "connection timed out": no node there
        return False
    return error.kind == "permanent" or bool(_TIMEOUT.search(error.message))


def _silent(error: CallError) -> bool:
    """Whether a failed call got no reply: every try waited out the read timeout. A range
    too wide for the node looks the same as an outage, until an answer (to a narrower
    range) tells them apart."""
    return "no response within" in error.message


async def call_reaching(
    client: RpcClient, calls: Sequence[Call], tops: Sequence[int], counter: list[int] | None = None
) -> list[tuple[Any | CallError, bool | None]]:
    """``calls``' results, each with whether the node that answered it had block ``tops[i]``
    (True: shown in the same request, or an earlier one to the same endpoint), never showed
    it (None: every answer for it was null: it is behind), or could not be shown to (False:
    the proof came apart from the answer, or failed): ask again."""
    # null_retry: a node a block or two short gets the client's null backoff to catch up.
    probes = [Call("eth_getBlockByNumber", [hex(top), False], null_retry=True) for top in tops]
    if counter is not None:
        counter[0] += 2 * len(calls)
    outs = await client.call_many_via([c for pair in zip(probes, calls, strict=True) for c in pair])
    shown: list[tuple[Any | CallError, bool | None]] = []
    for (block, proof), (out, via) in zip(outs[::2], outs[1::2], strict=True):
        if isinstance(block, CallError) and block.kind == "not_found":
            shown.append((out, None))
        else:
            shown.append((out, isinstance(block, dict) and proof is not None and via is not None
                           and proof[0] == via[0] and proof[1] <= via[1]))  # fmt: skip
    return shown


def behind(client: RpcClient, method: str, lo: int, hi: int) -> RpcError:
    """The error of a window whose node could not be shown to have reached its end."""
    return RpcError(f"{method} for blocks {lo}-{hi} was answered by a node that could not show block {hi} "
                    "(it is behind the head, or a backend behind a load balancer is), so they were not "
                    f"recorded as scanned: run discover again later, or point {client.check} at a "
                    "node in sync")  # fmt: skip


async def scan_ranges(
    client: RpcClient,
    ranges: list[Interval],
    make_call: Callable[[int, int], Call],
    window: AdaptiveWindow,
    *,
    parallel: int = 8,
    counter: list[int] | None = None,
    on_round: Callable[[list[tuple[Interval, Any]]], Awaitable[None]] | None = None,
) -> list[tuple[Interval, Any]]:
    """Answers for windows that together cover ``ranges`` exactly, in no particular order.
    With ``on_round``, each round's answers go to it as they come (awaited before the next
    round is sent) and none is returned: a caller can keep them before the scan ends.

    Raises :class:`gapfill.errors.RpcError` when even one block is refused, or a
    failure is not a refusal (the node is down, every retry failed). A window that got no
    reply is split only if some answer came since the last such split (the start-up checks
    count as one): a node that stopped answering had every window halved down to one block,
    each half waiting out every try (about 20 minutes at the default timeout), and the
    error then blamed that block.
    """
    pending: deque[Interval] = deque(ranges)
    done: list[tuple[Interval, Any]] = []
    heard_since_split = True
    doubts: dict[int, int] = {}  # per window's first block, its answers not shown to reach its end
    while pending:
        batch: list[Interval] = []
        while pending and len(batch) < parallel:
            lo, hi = pending.popleft()
            width = window.blocks
            if hi - lo + 1 > width:
                pending.appendleft((lo + width, hi))
                hi = lo + width - 1
            batch.append((lo, hi))
        calls = [make_call(lo, hi) for lo, hi in batch]
        shown = await call_reaching(client, calls, [hi for _, hi in batch], counter)
        retry: list[Interval] = []
        answered: list[tuple[Interval, Any]] = []
        heard = heard_since_split or not all(isinstance(out, CallError) and _silent(out) for out, _ in shown)
        split_silent = False
        for (lo, hi), call, (out, reached) in zip(batch, calls, shown, strict=True):
            if not isinstance(out, CallError):
                if not reached:
                    doubts[lo] = doubts.get(lo, 0) + 1
                    if reached is None or doubts[lo] >= PROOF_TRIES:
                        raise behind(client, call.method, lo, hi)
                    retry.append((lo, hi))
                    continue
                doubts.pop(lo, None)
                window.succeeded(hi - lo + 1)
                answered.append(((lo, hi), out))
                continue
            silent = _silent(out)
            if silent and (lo == hi or not heard):
                raise RpcError(f"{call.method} got no answer for blocks {lo}-{hi}: {out.message}; "
                               f"{client.silent}")  # fmt: skip
            split_silent = split_silent or silent
            if lo == hi or not _refusal(out):
                if out.fix is not None:  # a refused key: the fix, apart, for the CLI to say last
                    raise out.failed(f"{call.method} failed for blocks {lo}-{hi}")
                hint = "" if "check " in out.message else (
                    "; pick another discovery method with --method (logs, blocks, trace, "
                    f"explorer), or point {client.check} at another node")
                raise RpcError(f"{call.method} failed for blocks {lo}-{hi}: {out.message}{hint}")
            pieces, width = split_refused(lo, hi, out.message)
            logger.debug("%s refused blocks %d-%d (%s); now %d blocks", call.method, lo, hi,
                         out.message, width)  # fmt: skip
            window.refused(width)
            cap = parse_cap(out.message)
            if cap is not None:  # a fixed span limit: growing back past it is refused again
                window.capped(cap)
            retry.extend(pieces)
        heard_since_split = heard and not split_silent
        if on_round is None:
            done.extend(answered)
        elif answered:
            await on_round(answered)
        pending.extendleft(reversed(retry))
    return done


async def scan_for_refs(
    client: RpcClient,
    ranges: list[Interval],
    make_call: Callable[[int, int], Call],
    window: AdaptiveWindow,
    refs_of: RefsOf,
    *,
    counter: list[int] | None = None,
    on_refs: OnRefs | None = None,
) -> list[Ref]:
    """:func:`scan_ranges` turned into refs by ``refs_of``; with ``on_refs``, given to it
    round by round with the windows they cover, so that they can be committed before the
    scan ends (none returned)."""

    async def each_round(answers: list[tuple[Interval, Any]]) -> None:
        assert on_refs is not None
        await on_refs([span for span, _ in answers], refs_of(answers))

    return refs_of(await scan_ranges(client, ranges, make_call, window, counter=counter,
                                     on_round=each_round if on_refs else None))  # fmt: skip
