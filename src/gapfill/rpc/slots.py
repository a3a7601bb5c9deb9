"""Which batch's requests go first when calls are metered.

With metered calls (a rate limit: ``--rps``, a config ``rps``, or one an endpoint
learned from its 429s) a worker's requests queue for the client's slots
(``max_in_flight``), and each reserves its calls' tokens of the shared budget as it
gets one. Served in arrival order, the ``batches_in_flight`` batches of a worker share
the budget evenly, so all of them finish late together, and a stop finds none
complete. :class:`PrioritySlots` serves the requests of the batch leased first
(lowest :data:`PRIORITY`) first, in arrival order within one batch: batches complete,
and are committed, one after another, and the later ones take the tokens the earlier
ones leave over (between rounds of a batch).

Until calls are metered it serves in arrival order, as :class:`asyncio.Semaphore`
would: nothing waits long there. The client turns the priority order on
(:meth:`PrioritySlots.by_priority`) when an endpoint learns a rate, and the requests
already waiting then are ordered by their priority too. Taking a free slot costs what
a Semaphore's does (the hot path's: ``bench/slots.py``).
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
from types import TracebackType

#: The priority of the RPC requests made in this context: lower goes first. The engine
#: sets it per batch, to the batch's lease order (calls made outside a batch: 0).
PRIORITY: contextvars.ContextVar[int] = contextvars.ContextVar("gapfill_rpc_priority", default=0)


class PrioritySlots:
    """``slots`` slots, as :class:`asyncio.Semaphore`, granted to the tasks waiting for
    one first come, first served, or, once :attr:`prioritized`, lowest :data:`PRIORITY`
    first (then first come, first served)."""

    def __init__(self, slots: int, *, prioritized: bool = False) -> None:
        self._free = slots
        #: (key, arrival, priority, granted): the key is the priority once prioritized, 0 until then.
        self._waiters: list[tuple[int, int, int, asyncio.Future[None]]] = []
        self._arrival = itertools.count()
        self.prioritized = prioritized

    def by_priority(self) -> None:
        """Serve lowest :data:`PRIORITY` first from now on, the tasks waiting already too."""
        if self.prioritized:
            return
        self.prioritized = True
        self._waiters = [(p, a, p, f) for _, a, p, f in self._waiters if not f.done()]
        heapq.heapify(self._waiters)

    def waiting(self) -> int:
        """Tasks waiting for a slot."""
        return sum(1 for *_, f in self._waiters if not f.done())

    def queued(self, priority: int) -> bool:
        """Whether a task of ``priority`` waits for a slot."""
        return any(p == priority and not f.done() for _, _, p, f in self._waiters)

    async def __aenter__(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        priority = PRIORITY.get()
        key = priority if self.prioritized else 0
        heapq.heappush(self._waiters, (key, next(self._arrival), priority, granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():  # granted, then cancelled: pass it on
                self._release()
            raise  # a cancelled waiter stays in the heap, done: _release skips it

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._release()

    def _release(self) -> None:
        while self._waiters:
            granted = heapq.heappop(self._waiters)[3]
            if not granted.done():
                granted.set_result(None)  # the slot passes to it directly
                return
        self._free += 1
