"""Drains the durable inbound queue (appservice events, WhatsApp webhooks) in order.

Requests are acknowledged once their payload is stored; this worker does the work
afterwards, so a crash between the two only delays processing: on restart every row
still `pending` is processed again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from bridge.db import Database, InboundItem, InboundSource, InboundStatus
from bridge.metrics import Metrics

log = logging.getLogger(__name__)

# A handler returns None when the item is done, or the status it already set ("held").
Handler = Callable[[InboundItem], Awaitable[InboundStatus | None]]
MAX_ATTEMPTS = 5


class InboundWorker:
    """One task per source; `wake()` after storing new rows."""

    # One item per query: a handler may make older rows pending again (held messages
    # released by an opt-in), and those must go before anything newer.
    def __init__(self, db: Database, handlers: dict[InboundSource, Handler],
                 batch: int = 1, metrics: Metrics | None = None) -> None:
        self._db = db
        self._metrics = metrics
        self._handlers = handlers
        self._batch = batch
        self._wake = {source: asyncio.Event() for source in handlers}
        self._tasks: list[asyncio.Task[None]] = []
        self.idle = {source: asyncio.Event() for source in handlers}

    def wake(self, source: InboundSource) -> None:
        self.idle[source].clear()
        self._wake[source].set()

    def start(self) -> None:
        for source in self._handlers:
            self._tasks.append(asyncio.create_task(self._run(source), name=f"inbound {source}"))
            self.wake(source)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _run(self, source: InboundSource) -> None:
        while True:
            await self._wake[source].wait()
            self._wake[source].clear()
            try:
                while await self._drain(source):
                    pass
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("inbound %s worker failed; retrying", source)
                await asyncio.sleep(1)
                self._wake[source].set()
                continue
            if not self._wake[source].is_set():
                self.idle[source].set()

    async def _drain(self, source: InboundSource) -> int:
        items = await self._db.inbound.pending(source, self._batch)
        for item in items:
            try:
                result = await self._handlers[source](item)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Log the kind of failure only: messages may carry personal data.
                attempts = item.attempts + 1
                status: InboundStatus = "failed" if attempts >= MAX_ATTEMPTS else "pending"
                log.warning("inbound %s #%d failed (%s, attempt %d)", source, item.id,
                            type(exc).__name__, attempts)
                await self._db.inbound.set_status(item.id, status, error=type(exc).__name__,
                                                  attempts=attempts)
                if status == "pending":
                    if self._metrics is not None:
                        self._metrics.inbound_retries.labels(source).inc()
                    # Keep order: retry this item (first) after a backoff.
                    asyncio.get_running_loop().call_later(2**attempts, self.wake, source)
                    return 0
            else:
                if result is None:
                    await self._db.inbound.set_status(item.id, "done")
        return len(items)
