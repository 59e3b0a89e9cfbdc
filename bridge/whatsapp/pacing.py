"""Meta's rate limits, kept by the outbox: sends per second from the business number
(a shared slot clock: each send takes the next slot, waiting for it) and a least
interval between two sends to the same citizen (a send that comes too early is
postponed, not waited for, so other citizens' sends go meanwhile, and a citizen's sends
stay in order: the outbox picks rows by due time, then id).

In memory: after a restart the first send to a citizen may come early, once. A 429 or
Graph's throughput/pair-limit errors are still retried with backoff (bridge.retry).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class Pacer:
    def __init__(self, per_second: float, recipient_interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._step = 1.0 / per_second if per_second > 0 else 0.0
        self._interval = recipient_interval
        self._clock = clock
        self._next_slot = 0.0
        self._last_to: dict[int, float] = {}

    def too_early(self, citizen_id: int) -> float:
        """Seconds until `citizen_id` may get the next send (0: now)."""
        if self._interval <= 0:
            return 0.0
        last = self._last_to.get(citizen_id)
        return 0.0 if last is None else max(0.0, last + self._interval - self._clock())

    async def slot(self) -> None:
        """Wait for this number's next send slot and take it."""
        if self._step <= 0:
            return
        now = self._clock()
        start = max(now, self._next_slot)
        self._next_slot = start + self._step
        if start > now:
            await asyncio.sleep(start - now)

    def sent(self, citizen_id: int) -> None:
        if self._interval <= 0:
            return
        now = self._clock()
        self._last_to[citizen_id] = now
        if len(self._last_to) > 100_000:  # forget those past their interval
            self._last_to = {c: t for c, t in self._last_to.items()
                             if t + self._interval > now}
