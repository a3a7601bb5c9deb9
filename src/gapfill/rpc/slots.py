"""Which batch's requests go first when calls are metered.

With a rate limit (``--rps``, a config ``rps``) a worker's requests queue for the
client's slots (``max_in_flight``), and each reserves its calls' tokens of the
shared budget as it gets one. Served in arrival order, the ``batches_in_flight``
batches of a worker share the budget evenly, so all of them finish late together,
and a stop finds none complete. :class:`PrioritySlots` serves the requests of the
batch leased first (lowest :data:`PRIORITY`) first, in arrival order within one
batch: batches complete, and are committed, one after another, and the later ones
take the tokens the earlier ones leave over (between rounds of a batch).

Without a rate limit the client keeps a plain :class:`asyncio.Semaphore`: nothing
waits long there, and its per-request cost is the hot path's.
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
    """``slots`` slots, as :class:`asyncio.Semaphore`, granted lowest :data:`PRIORITY`
    first (then first come, first served) to the tasks waiting for one."""

    def __init__(self, slots: int) -> None:
        self._free = slots
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrival = itertools.count()

    def waiting(self) -> int:
        """Tasks waiting for a slot."""
        return sum(1 for _, _, f in self._waiters if not f.done())

    def queued(self, priority: int) -> bool:
        """Whether a task of ``priority`` waits for a slot."""
        return any(p == priority and not f.done() for p, _, f in self._waiters)

    async def __aenter__(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (PRIORITY.get(), next(self._arrival), granted))
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
            _, _, granted = heapq.heappop(self._waiters)
            if not granted.done():
                granted.set_result(None)  # the slot passes to it directly
                return
        self._free += 1
