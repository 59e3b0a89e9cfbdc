"""Offering timed sends, paced or back to back (bench/whatsapp_relay.py, and Meta's side
of it in bench/_meta_sender.py, which runs in a process of its own)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass
class Sample:
    body: str
    sent: float = math.nan  # perf_counter() when the POST / room_send started
    acked: float = math.nan  # ... when it returned
    ok: bool = False


async def offer(samples: list[Sample], rate: float | None,
                send: Callable[[int], Awaitable[bool]], lanes: int = 1,
                stagger: float = 0.0) -> float:
    """Send every sample, paced at `rate` (open loop) or back to back in `lanes` lanes
    (sample i in lane i % lanes, lane n starting n * `stagger` s late); returns the
    worst slip."""
    async def one(i: int) -> None:
        s = samples[i]
        s.sent = time.perf_counter()
        s.ok = await send(i)
        s.acked = time.perf_counter()

    async def lane(first: int) -> None:
        await asyncio.sleep(first * stagger)
        for i in range(first, len(samples), lanes):
            await one(i)

    if rate is None:
        await asyncio.gather(*(lane(n) for n in range(lanes)))
        return 0.0
    loop = asyncio.get_running_loop()
    start, slip = loop.time(), 0.0
    tasks = []
    for i in range(len(samples)):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            slip = max(slip, -delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    return slip
