"""Micro-benchmark: what the RPC client's slots cost per request.

Without a configured rate the client used an :class:`asyncio.Semaphore`; it now keeps a
:class:`gapfill.rpc.slots.PrioritySlots` in arrival order, turned to priority order
when an endpoint learns a rate. Each request takes a slot and gives it back once
(``async with``), so this times that, in CPU ns per request, best of ``--repeats``
rounds, the kinds alternating:

- free: a slot is free every time (the hot path without a rate: nothing waits);
- contended: ``--tasks`` tasks on ``--slots`` slots, each taking one ``--rounds`` times
  with a yield inside, so most requests wait and are handed their slot.

    .venv/bin/python bench/slots.py

A request carries up to ~100 calls, so a few hundred ns per request is nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from gapfill.rpc.slots import PrioritySlots

Slots = Callable[[int], AbstractAsyncContextManager[Any]]

KINDS: dict[str, Slots] = {
    "Semaphore": asyncio.Semaphore,
    "PrioritySlots (arrival order)": PrioritySlots,
    "PrioritySlots (prioritized)": lambda n: PrioritySlots(n, prioritized=True),
}


async def free(make: Slots, requests: int) -> float:
    slots = make(8)
    t0 = time.process_time()
    for _ in range(requests):
        async with slots:
            pass
    return time.process_time() - t0


async def contended(make: Slots, tasks: int, n_slots: int, rounds: int) -> float:
    slots = make(n_slots)

    async def one() -> None:
        for _ in range(rounds):
            async with slots:
                await asyncio.sleep(0)

    async def baseline() -> None:  # the same tasks and yields, without slots
        for _ in range(rounds):
            await asyncio.sleep(0)

    t0 = time.process_time()
    await asyncio.gather(*(one() for _ in range(tasks)))
    with_slots = time.process_time() - t0
    t0 = time.process_time()
    await asyncio.gather(*(baseline() for _ in range(tasks)))
    return with_slots - (time.process_time() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    best_free = dict.fromkeys(KINDS, float("inf"))
    best_contended = dict.fromkeys(KINDS, float("inf"))
    for _ in range(args.repeats):
        for name, make in KINDS.items():
            best_free[name] = min(best_free[name], asyncio.run(free(make, args.requests)))
            spent = asyncio.run(contended(make, args.tasks, args.slots, args.rounds))
            best_contended[name] = min(best_contended[name], spent)
    waits = args.tasks * args.rounds
    print(f"{'':32}{'free slot':>12}{'contended':>12}   (CPU ns per request, best of {args.repeats})")
    for name in KINDS:
        per_free, per_wait = best_free[name] / args.requests, best_contended[name] / waits
        print(f"{name:32}{per_free * 1e9:12.0f}{per_wait * 1e9:12.0f}")


if __name__ == "__main__":
    main()
