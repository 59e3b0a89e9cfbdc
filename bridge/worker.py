"""Drains the durable inbound queue (appservice events, WhatsApp webhooks) in order.

Requests are acknowledged once their payload is stored; this worker does the work
afterwards, so a crash between the two only delays processing: on restart every row
still `pending` is processed again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial

from bridge.db import Database, InboundItem, InboundSource, InboundStatus
from bridge.metrics import Metrics

log = logging.getLogger(__name__)

# A handler returns None when the item is done, or the status it already set ("held").
Handler = Callable[[InboundItem], Awaitable[InboundStatus | None]]
MAX_ATTEMPTS = 5
MAX_RUNNING = 32  # lanes processed at once per source (bounds the load on Synapse)
STOP_GRACE_SECONDS = 10.0
GLOBAL_LANE = ""  # runs alone, after everything older (rows queued before lanes existed)


class InboundWorker:
    """One dispatcher task per source; `wake()` after storing new rows.

    Items carry a lane (a room, a citizen): each lane is processed in order, one item
    at a time, and lanes never wait for each other. The dispatcher starts the oldest
    pending item of every idle lane, each in its own task; a task that ends wakes the
    dispatcher, which then starts that lane's next item. Heads are re-read on every
    dispatch, so items a handler made pending again (held messages released by an
    opt-in, which are older) run before anything newer of the same lane.
    """

    def __init__(self, db: Database, handlers: dict[InboundSource, Handler],
                 metrics: Metrics | None = None) -> None:
        self._db = db
        self._metrics = metrics
        self._handlers = handlers
        self._wake = {source: asyncio.Event() for source in handlers}
        self._tasks: list[asyncio.Task[None]] = []
        self._running: dict[InboundSource, dict[str, asyncio.Task[None]]] = {
            source: {} for source in handlers}
        self._backoff: dict[tuple[InboundSource, str], float] = {}
        self.idle = {source: asyncio.Event() for source in handlers}

    def wake(self, source: InboundSource) -> None:
        self.idle[source].clear()
        self._wake[source].set()

    def start(self) -> None:
        for source in self._handlers:
            self._tasks.append(asyncio.create_task(self._run(source), name=f"inbound {source}"))
            self.wake(source)

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Stop dispatching; let items in progress finish for up to `grace` seconds.

        Cancelling an item mid-way is safe (it runs again on restart) but wasteful, and
        a database session cancelled mid-statement can leave SQLite's write lock held.
        """
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        running = [t for r in self._running.values() for t in r.values()]
        if running:
            await asyncio.wait(running, timeout=grace)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        for lanes in self._running.values():
            lanes.clear()

    async def _run(self, source: InboundSource) -> None:
        while True:
            await self._wake[source].wait()
            self._wake[source].clear()
            try:
                await self._dispatch(source)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("inbound %s worker failed; retrying", source)
                await asyncio.sleep(1)
                self._wake[source].set()
                continue
            if not self._wake[source].is_set() and not self._running[source]:
                self.idle[source].set()

    async def _dispatch(self, source: InboundSource) -> None:
        """Start the oldest pending item of each idle lane that is not backing off."""
        running = self._running[source]
        now = asyncio.get_running_loop().time()
        waiting = {lane for (src, lane), until in self._backoff.items()
                   if src == source and until > now}
        busy = running.keys() | waiting
        if GLOBAL_LANE in busy or len(running) >= MAX_RUNNING:
            return  # a finishing task (or the backoff timer) wakes us
        for item in await self._db.inbound.lane_heads(source, busy, MAX_RUNNING):
            if item.lane == GLOBAL_LANE:
                if not running:
                    self._start(source, item)
                return  # nothing newer starts before it has run
            self._start(source, item)
            if len(running) >= MAX_RUNNING:
                return

    def _start(self, source: InboundSource, item: InboundItem) -> None:
        task = asyncio.create_task(self._one(source, item.lane, item),
                                   name=f"inbound {source} #{item.id}")
        self._running[source][item.lane] = task
        task.add_done_callback(partial(self._finished, source, item.lane))

    def _finished(self, source: InboundSource, lane: str, _: asyncio.Task[None]) -> None:
        self._running[source].pop(lane, None)
        self.wake(source)

    async def _one(self, source: InboundSource, lane: str, item: InboundItem) -> None:
        try:
            await self._handle(source, lane, item)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Recording the outcome failed (database down?): the row is still pending.
            log.exception("inbound %s #%d: could not record the outcome", source, item.id)
            self._retry_later(source, lane, 1)

    async def _handle(self, source: InboundSource, lane: str, item: InboundItem) -> None:
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
                # Keep order: this lane waits; the item is retried first.
                self._retry_later(source, lane, attempts)
                return
        else:
            if result is None:
                await self._db.inbound.set_status(item.id, "done")
            self._backoff.pop((source, lane), None)

    def _retry_later(self, source: InboundSource, lane: str, attempts: int) -> None:
        delay = 2.0**attempts
        loop = asyncio.get_running_loop()
        self._backoff[(source, lane)] = loop.time() + delay
        loop.call_later(delay, self.wake, source)
