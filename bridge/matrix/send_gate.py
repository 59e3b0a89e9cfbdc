"""Group commit for the bridge's room sends.

Synapse does less work per event for events that reach it together: one appservice
transaction, one wake-up of each syncing client, one batch of persistence for them
all. Rooms whose sends happen to start in the same millisecond stay in step and were
measured at 1.2x the rate of rooms a few milliseconds apart (bench/whatsapp_relay.py,
"in-step"); the bridge's lanes (one per citizen) never start in step by themselves.

So a room send that finds others in flight waits until they are answered, plus a short
grace for their lanes to come back with their next message, and then leaves with
everything that waited meanwhile. A send with nothing in flight leaves at once: a quiet
bridge adds no latency. A send that is not answered within `longest_wait` stops
counting, so a slow room holds the others that long at most.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

GRACE_SECONDS = 0.003  # measured: lanes come back within 1-3 ms of their answer
LONGEST_WAIT_SECONDS = 0.2  # about two sends' time on a loaded 2-core machine


class SendGate:
    def __init__(self, grace: float = GRACE_SECONDS,
                 longest_wait: float = LONGEST_WAIT_SECONDS,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self._grace = grace
        self._on_batch = on_batch  # told how many sends left together (a metric)
        self._longest_wait = longest_wait
        # Sends of this generation in flight; a generation ends when the longest wait
        # releases the waiters, and its sends still in flight stop counting.
        self._generation = 0
        self._in_flight = 0
        self._waiting: asyncio.Future[None] | None = None
        self._waiters = 0
        self._longest_timer: asyncio.TimerHandle | None = None
        self._grace_timer: asyncio.TimerHandle | None = None

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Wait for this send's turn; the body is the request, until its answer."""
        if self._waiting is not None or self._in_flight:
            await self._wait()
        else:
            self._left(1)
        generation = self._generation
        self._in_flight += 1
        try:
            yield
        finally:
            self._answered(generation)

    async def _wait(self) -> None:
        loop = asyncio.get_running_loop()
        if self._waiting is None:
            self._waiting, self._waiters = loop.create_future(), 0
            self._longest_timer = loop.call_later(self._longest_wait, self._release, True)
        self._waiters += 1
        waiting = self._waiting
        try:
            # Shielded: a waiter cancelled must not cancel the others' turn.
            await asyncio.shield(waiting)
        except asyncio.CancelledError:
            if not waiting.done():
                self._waiters -= 1
            raise

    def _answered(self, generation: int) -> None:
        if generation != self._generation:
            return  # it outlived the longest wait and no longer counts
        self._in_flight -= 1
        if self._in_flight == 0 and self._waiting is not None and self._grace_timer is None:
            self._grace_timer = asyncio.get_running_loop().call_later(
                self._grace, self._release, False)

    def _release(self, too_long: bool) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is None:
            return
        for timer in (self._longest_timer, self._grace_timer):
            if timer is not None:
                timer.cancel()
        self._longest_timer = self._grace_timer = None
        if too_long:
            self._generation += 1
            self._in_flight = 0
        if self._waiters:
            self._left(self._waiters)
        waiting.set_result(None)

    def _left(self, sends: int) -> None:
        if self._on_batch is not None:
            self._on_batch(sends)
