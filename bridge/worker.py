"""Drains the durable inbound queue (appservice events, WhatsApp webhooks) in order.

Requests are acknowledged once their payload is stored; this worker does the work
afterwards, so a crash between the two only delays processing: on restart every row
still `pending` is processed again.

Nothing is given up silently (bridge.retry decides): an item that fails transiently
(Synapse or the database unreachable, 5xx, 429, timeouts) is retried after a capped,
jittered backoff for as long as it takes, holding its lane (order per room and per
citizen) but no running slot; one that fails permanently becomes a dead letter
(bridge.deadletters: counted, listed, announced, retryable by an admin) and its lane
goes on with the next item.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import Any

from bridge.db import Database, InboundItem, InboundSource, InboundStatus, outcome
from bridge.metrics import Metrics
from bridge.retry import backoff, error_label, is_transient, reason_of

log = logging.getLogger(__name__)

# A handler returns None when the item is done, or the status it already set ("held").
Handler = Callable[[InboundItem], Awaitable[InboundStatus | None]]
# Told about each new dead letter (by its id, "in-N"); must not raise.
OnDead = Callable[[str], Coroutine[Any, Any, None]]
# Takes rows stored elsewhere into the queue (bridge.ingest.take_spooled); their lanes.
Intake = Callable[[], Awaitable[set[str]]]
MAX_RUNNING = 32  # lanes processed at once per source (bounds the load on Synapse)
STOP_GRACE_SECONDS = 10.0
GLOBAL_LANE = ""  # runs alone, after everything older (rows queued before lanes existed)


class InboundWorker:
    """One dispatcher task per source; `wake(source, lane)` after storing new rows.

    Items carry a lane (a room, a citizen): each lane is processed in order, one item
    at a time, and lanes never wait for each other. A lane runs in its own task, which
    records each item's outcome and reads the lane's next item in one transaction,
    then goes on with it. The dispatcher starts lanes that are not running: on a wake
    naming only lanes that are running it reads nothing (their tasks find the new
    items, or re-check when they run dry). The next item is always the lane's oldest
    pending one, so items a handler made pending again (held messages released by an
    opt-in, which are older) run before anything newer of the same lane.
    """

    def __init__(self, db: Database, handlers: dict[InboundSource, Handler],
                 metrics: Metrics | None = None, on_dead: OnDead | None = None,
                 backoff: Callable[[int], float] = backoff,
                 intake: dict[InboundSource, Intake] | None = None) -> None:
        self._db = db
        # Run before each round of a source: rows that wait outside the queue (the
        # webhook spool) come in first, so `idle` still means all stored work is done.
        self._intake = intake or {}
        self._delay = backoff  # seconds before retry n (tests shorten it)
        self._metrics = metrics
        self._on_dead = on_dead
        self._announcing: set[asyncio.Task[None]] = set()
        self._handlers = handlers
        self._wake = {source: asyncio.Event() for source in handlers}
        self._tasks: list[asyncio.Task[None]] = []
        self._running: dict[InboundSource, dict[str, asyncio.Task[bool]]] = {
            source: {} for source in handlers}
        # Lanes woken since the last dispatch (None: look at every lane), and running
        # lanes woken meanwhile, which look again before they end.
        self._woken: dict[InboundSource, set[str] | None] = {s: None for s in handlers}
        self._recheck: dict[InboundSource, set[str]] = {s: set() for s in handlers}
        self._backoff: dict[tuple[InboundSource, str], float] = {}
        self._stopping = False
        self.idle = {source: asyncio.Event() for source in handlers}

    def wake(self, source: InboundSource, *lanes: str) -> None:
        """New items are pending in `lanes` (none named: anywhere)."""
        woken = self._woken[source]
        if not lanes:
            self._woken[source] = None
        elif woken is not None:
            woken.update(lanes)
        self.idle[source].clear()
        self._wake[source].set()

    def start(self) -> None:
        self._stopping = False
        for source in self._handlers:
            self._tasks.append(asyncio.create_task(self._run(source), name=f"inbound {source}"))
            self.wake(source)

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Stop dispatching; let items in progress finish for up to `grace` seconds.

        Cancelling an item mid-way is safe (it runs again on restart) but wasteful, and
        a database session cancelled mid-statement can leave SQLite's write lock held.
        """
        self._stopping = True  # lanes end after their current item
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        running = [t for r in self._running.values() for t in r.values()]
        if running:
            await asyncio.wait(running, timeout=grace)
        for lane_task in running:
            lane_task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        for lanes in self._running.values():
            lanes.clear()
        if self._announcing:  # notices of dead letters: stored already, may be cut
            announcing = list(self._announcing)
            await asyncio.wait(announcing, timeout=grace)
            for task in announcing:
                task.cancel()
            await asyncio.gather(*announcing, return_exceptions=True)

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
                self.wake(source)
                continue
            if not self._wake[source].is_set() and not self._running[source]:
                self.idle[source].set()

    async def _dispatch(self, source: InboundSource) -> None:
        """Start the oldest pending item of each idle lane that is not backing off."""
        if (intake := self._intake.get(source)) is not None and (lanes := await intake()):
            woken_before = self._woken[source]
            if woken_before is not None:
                woken_before.update(lanes)
        running = self._running[source]
        woken, self._woken[source] = self._woken[source], set()
        if woken is not None:
            self._recheck[source].update(woken & running.keys())
            if woken <= running.keys():
                return  # nothing new outside running lanes: nothing to read
        now = asyncio.get_running_loop().time()
        waiting = {lane for (src, lane), until in self._backoff.items()
                   if src == source and until > now}
        busy = running.keys() | waiting
        if GLOBAL_LANE in busy or len(running) >= MAX_RUNNING:
            self._woken[source] = None  # look again when a lane ends
            return
        async with self._db.reading() as tx:  # no writer turn on SQLite
            heads = await tx.inbound.lane_heads(source, busy, MAX_RUNNING)
        for item in heads:
            if item.lane == GLOBAL_LANE:
                if running:
                    self._woken[source] = None  # look again when a lane ends
                else:
                    self._start(source, item)
                return  # nothing newer starts before it has run
            self._start(source, item)
            if len(running) >= MAX_RUNNING:
                self._woken[source] = None
                return

    def _start(self, source: InboundSource, item: InboundItem) -> None:
        task = asyncio.create_task(self._lane(source, item),
                                   name=f"inbound {source} lane #{item.id}")
        self._running[source][item.lane] = task
        task.add_done_callback(partial(self._finished, source, item.lane))

    def _finished(self, source: InboundSource, lane: str, task: asyncio.Task[bool]) -> None:
        self._running[source].pop(lane, None)
        if task.cancelled() or task.exception() is not None or task.result():
            self.wake(source)
        elif lane in self._recheck[source]:
            self.wake(source, lane)
        else:
            self._wake[source].set()  # only to notice that the worker is idle
        self._recheck[source].discard(lane)

    async def _lane(self, source: InboundSource, first: InboundItem) -> bool:
        """Process a lane's items in order until it runs dry, stops or backs off;
        True if the dispatcher must then look at every lane."""
        lane = first.lane
        item: InboundItem | None = first
        while item is not None and not self._stopping:
            self._recheck[source].discard(lane)  # the next read sees what was woken
            item = await self._one(source, item)
            if item is not None and (item.lane != lane or lane == GLOBAL_LANE):
                # The global lane is next (it runs alone), or the global lane ran and
                # older items of other lanes may be waiting: the dispatcher decides.
                return True
        return lane == GLOBAL_LANE

    async def _one(self, source: InboundSource, item: InboundItem) -> InboundItem | None:
        """Process one item; returns the lane's next item, None to end the lane."""
        try:
            return await self._handle(source, item)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Recording the outcome failed (database down?): the row is still pending.
            log.exception("inbound %s #%d: could not record the outcome", source, item.id)
            self._retry_later(source, item.lane, 1)
            return None

    async def _handle(self, source: InboundSource, item: InboundItem) -> InboundItem | None:
        with outcome.collecting() as writes:
            try:
                result = await self._handlers[source](item)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                return await self._failed(source, item, exc, writes)
        self._backoff.pop((source, item.lane), None)
        # The handler's deferred writes (bridge.db.outcome) land with the outcome. A
        # handler that set the status itself ("held") returned it.
        async with self._db.transaction() as tx:
            await writes.apply(tx)
            return await tx.inbound.complete(item, "done" if result is None else None)

    async def _failed(self, source: InboundSource, item: InboundItem, exc: Exception,
                      writes: outcome.OutcomeWrites) -> InboundItem | None:
        # Log the kind of failure only: messages may carry personal data.
        attempts = item.attempts + 1
        error = error_label(exc)
        if is_transient(exc):
            log.warning("inbound %s #%d failed (%s, attempt %d); retrying", source, item.id,
                        error, attempts)
            writes.open = False  # the retry does them again
            await self._db.inbound.note_failure(item.id, error, attempts)
            if self._metrics is not None:
                self._metrics.inbound_retries.labels(source).inc()
            # Keep order: this lane waits (without a running slot); the item goes first.
            self._retry_later(source, item.lane, attempts)
            return None
        reason = reason_of(exc)
        log.error("inbound %s #%d failed for good (%s, %s): set aside as dead letter in-%d",
                  source, item.id, reason, error, item.id)
        async with self._db.transaction() as tx:  # what was done before the failure
            await writes.apply(tx)
            nxt = await tx.inbound.set_aside(item, reason, error, attempts)
        self._backoff.pop((source, item.lane), None)
        if self._on_dead is not None:
            # Announced aside: the lane goes on at once, whatever the notice costs.
            task = asyncio.create_task(self._on_dead(f"in-{item.id}"),
                                       name=f"dead letter in-{item.id}")
            self._announcing.add(task)
            task.add_done_callback(self._announcing.discard)
        return nxt

    def _retry_later(self, source: InboundSource, lane: str, attempts: int) -> None:
        delay = self._delay(attempts)
        loop = asyncio.get_running_loop()
        self._backoff[(source, lane)] = loop.time() + delay
        loop.call_later(delay, self.wake, source, lane)
