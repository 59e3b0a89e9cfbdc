"""Meta's side of bench/whatsapp_relay.py: POSTs the measured webhooks from a process of
its own, as Meta's servers are machines of their own.

A sender in the bench's process (its loop, or a thread of it) shares the interpreter
lock with the bridge, the staff device and the bare client: during a burst it took the
lock from the bridge's loop, and an acknowledgement it timed also counted its own wait
for the lock. Timestamps are time.perf_counter(), the system's monotonic clock, so the
bench compares them with its own.

Reads one JSON line per block on stdin: {"url", "rate" (msg/s, or null for back to
back), "deliveries": [[body, headers], ...]}; answers one JSON line: {"sent", "acked",
"ok", "slip"}. Ends at end of input.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import aiohttp
from _pacing import Sample, offer


async def timed(http: aiohttp.ClientSession, block: dict[str, Any]) -> dict[str, Any]:
    url = block["url"]
    deliveries = [(body.encode(), headers) for body, headers in block["deliveries"]]
    samples = [Sample("") for _ in deliveries]

    async def send(i: int) -> bool:
        try:
            async with http.post(url, data=deliveries[i][0], headers=deliveries[i][1]) as resp:
                await resp.read()
                return resp.status == 200
        except aiohttp.ClientError:
            return False

    slip = await offer(samples, block["rate"], send)
    return {"sent": [s.sent for s in samples], "acked": [s.acked for s in samples],
            "ok": [s.ok for s in samples], "slip": slip}


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
