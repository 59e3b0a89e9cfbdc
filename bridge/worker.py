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
# Items with the same partition key (a room, a citizen) are processed in order, one at a
# time; different partitions run concurrently.
Partitioner = Callable[[InboundItem], str]
MAX_ATTEMPTS = 5
LOOKAHEAD = 200  # pending rows read per round to find work for idle partitions


def one_partition(item: InboundItem) -> str:
    return ""


class InboundWorker:
    """One task per source; `wake()` after storing new rows.

    Each round reads the oldest pending rows and starts the oldest row of every
    partition that is not busy or backing off; rows are re-read every round, so rows a
    handler made pending again (held messages released by an opt-in, which are older)
    run before anything newer of the same partition.
    """

    def __init__(self, db: Database, handlers: dict[InboundSource, Handler],
                 partitions: dict[InboundSource, Partitioner] | None = None,
                 metrics: Metrics | None = None) -> None:
        self._db = db
        self._metrics = metrics
        self._handlers = handlers
        self._partitions = partitions or {}
        self._wake = {source: asyncio.Event() for source in handlers}
        self._tasks: list[asyncio.Task[None]] = []
        self._backoff: dict[tuple[InboundSource, str], float] = {}
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
                while await self._round(source):
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

    async def _round(self, source: InboundSource) -> int:
        """Start the oldest item of each ready partition; returns how many ran."""
        now = asyncio.get_running_loop().time()
        partition_of = self._partitions.get(source, one_partition)
        chosen: dict[str, InboundItem] = {}
        for item in await self._db.inbound.pending(source, LOOKAHEAD):
            try:
                key = partition_of(item)
            except Exception:
                key = ""  # unreadable rows fail in the handler, where it is recorded
            if key not in chosen and self._backoff.get((source, key), 0.0) <= now:
                chosen[key] = item
        results = await asyncio.gather(*(self._one(source, key, item)
                                         for key, item in chosen.items()))
        return sum(results)

    async def _one(self, source: InboundSource, key: str, item: InboundItem) -> int:
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
                # Keep order: this partition waits; the item is retried first.
                delay = 2.0**attempts
                self._backoff[(source, key)] = asyncio.get_running_loop().time() + delay
                asyncio.get_running_loop().call_later(delay, self.wake, source)
                return 0
            return 1
        if result is None:
            await self._db.inbound.set_status(item.id, "done")
        self._backoff.pop((source, key), None)
        return 1
