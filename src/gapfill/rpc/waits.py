"""What a client's requests wait for: a node that does not answer, or the client's own choice.

Two questions of the engine turn on the difference. Is the node gone (a worker's outage
clock, ``--rpc-outage``)? Only time spent *trying* to reach one counts: a request sent and
not answered yet, or waiting to be sent again after one that got no reply (the backoff, an
endpoint set aside by its breaker). Is a batch stuck (its lease renewal)? Not while its
requests wait *by choice*: for their rate budget's tokens (``--rps``, or a rate learned from
429s), a ``Retry-After`` pause, or the backoff after a rate-limited or null answer. The node
replied there, and the client decided to wait; a long pause (up to 600 s) or a low shared
``--rps`` (four workers at 2 rps: a reply per process every few minutes) had the worker
stopped as if the node were dead, and the batch's lease lapse as if it were stuck.

Waiting for one of the client's slots is neither: it lasts as long as what the requests
holding them do (see :meth:`gapfill.rpc.client.RpcClient.held_back`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Waits:
    """One client's tally: the outage clock and the requests waiting by choice."""

    def __init__(self) -> None:
        self._trying = 0  # requests trying to reach a node now
        self._since = time.monotonic()  # when the clock last started running, or the last reply
        self._spent = 0.0  # seconds it ran, since the last reply, before ``_since``
        self._held: dict[int, int] = {}  # priority -> its requests waiting by choice now
        #: Requests waiting by choice while they hold one of the client's slots (their tokens).
        self.in_slot = 0

    # -- the outage clock ---------------------------------------------------------------

    def start_trying(self) -> None:
        """A request is sent, or waits to be sent again after one that got no reply."""
        if not self._trying:
            self._since = time.monotonic()
        self._trying += 1

    def stop_trying(self) -> None:
        self._trying -= 1
        if not self._trying:
            now = time.monotonic()
            self._spent += now - self._since
            self._since = now

    @contextmanager
    def trying(self) -> Iterator[None]:
        self.start_trying()
        try:
            yield
        finally:
            self.stop_trying()

    def replied(self) -> None:
        """Some endpoint sent an HTTP reply (any status: a node is there)."""
        self._spent = 0.0
        self._since = time.monotonic()

    def silent_s(self) -> float:
        """Seconds spent trying to reach a node since the last reply."""
        if self._trying:
            return self._spent + time.monotonic() - self._since
        return self._spent

    # -- waits by choice ---------------------------------------------------------------

    @contextmanager
    def by_choice(self, priority: int, *, in_slot: bool = False) -> Iterator[None]:
        """A request of ``priority`` (:data:`gapfill.rpc.slots.PRIORITY`) waits by the
        client's choice; ``in_slot``: holding a slot meanwhile."""
        held = self._held
        held[priority] = held.get(priority, 0) + 1
        self.in_slot += in_slot
        try:
            yield
        finally:
            self.in_slot -= in_slot
            left = held[priority] - 1
            if left:
                held[priority] = left
            else:
                del held[priority]

    def held(self, priority: int) -> bool:
        """Whether a request of ``priority`` waits by choice now."""
        return priority in self._held
