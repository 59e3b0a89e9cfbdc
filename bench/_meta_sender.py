"""Meta's side of bench/whatsapp_relay.py: POSTs the measured webhooks from a process of
its own, as Meta's servers are machines of their own.

A sender in the bench's process (its loop, or a thread of it) shares the interpreter
lock with the bridge, the staff device and the bare client: during a burst it took the
lock from the bridge's loop, and an acknowledgement it timed also counted its own wait
for the lock. Timestamps are time.perf_counter(), the system's monotonic clock, so the
bench compares them with its own.

Reads one JSON line per block on stdin: {"url", "rate" (msg/s, or null for back to
back), "deliveries": [[body, headers], ...], "control_url" (optional)}; answers one JSON
line: {"sent", "acked", "ok", "slip", "control"}. With a control URL (the bare handler,
bench/_bare_webhook.py) each delivery also goes there, at the same instant, and
"control" holds those round trips in seconds. Ends at end of input.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import aiohttp
from _pacing import Sample, offer


async def timed(http: aiohttp.ClientSession, block: dict[str, Any]) -> dict[str, Any]:
    url = block["url"]
    deliveries = [(body.encode(), headers) for body, headers in block["deliveries"]]
    samples = [Sample("") for _ in deliveries]
    control: list[float] = []
    tasks: list[asyncio.Task[None]] = []

    async def to_control(i: int) -> None:
        started = time.perf_counter()
        async with http.post(block["control_url"], data=deliveries[i][0],
                             headers=deliveries[i][1]) as resp:
            await resp.read()
            if resp.status == 200:
                control.append(time.perf_counter() - started)

    async def send(i: int) -> bool:
        if block.get("control_url"):
            tasks.append(asyncio.create_task(to_control(i)))
        try:
            async with http.post(url, data=deliveries[i][0], headers=deliveries[i][1]) as resp:
                await resp.read()
                return resp.status == 200
        except aiohttp.ClientError:
            return False

    slip = await offer(samples, block["rate"], send)
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"sent": [s.sent for s in samples], "acked": [s.acked for s in samples],
            "ok": [s.ok for s in samples], "slip": slip, "control": control}


async def serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        while line := await reader.readline():
            sys.stdout.write(json.dumps(await timed(http, json.loads(line))) + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(serve())
