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
from dataclasses import dataclass, field
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
# Reads, and only reads, what an item's handler will need, while the lane's previous
# item is still being handled (bridge.db.outcome.prepared hands it over).
Prepare = Callable[[InboundItem], Awaitable[object]]
MAX_RUNNING = 32  # lanes processed at once per source (bounds the load on Synapse)
STOP_GRACE_SECONDS = 10.0
GLOBAL_LANE = ""  # runs alone, after everything older (rows queued before lanes existed)


@dataclass
class _Attempt:
    """An item's handler has run; its outcome is not recorded yet."""

    item: InboundItem
    writes: outcome.OutcomeWrites
    result: InboundStatus | None = None
    error: Exception | None = None


@dataclass(eq=False)
class _Run:
    """An item of a lane, run in its own task."""

    item: InboundItem
    turn: asyncio.Future[bool]  # a prepared run: may it be handled (previous one done)?
    recorded: asyncio.Future[None]  # done once its outcome is recorded
    overlap: bool = False  # its handler allowed the next item to start meanwhile
    task: asyncio.Task[_Attempt | None] = field(init=False)


@dataclass(eq=False)
class _Pipe:
    """A running lane: its current run, the run started behind it, the next item."""

    lane: str
    current: _Run | None = None
    next: _Run | None = None
    candidate: InboundItem | None = None  # the lane's next pending item, not started


class InboundWorker:
    """One dispatcher task per source; `wake(source, lane)` after storing new rows.

    Items carry a lane (a room, a citizen): each lane is processed in order, one item
    at a time, and lanes never wait for each other. A lane runs in its own task, which
    records each item's outcome and reads the lane's next item in one transaction,
    then goes on with it. The dispatcher starts lanes that are not running: on a wake
    naming only lanes that are running it reads nothing (their tasks find the new
    items, or re-check when they run dry). The next item is always the lane's oldest
    pending one, so items a handler made pending again (held messages released by an
    opt-in, which are older) run before anything newer of the same lane. A relayed
    message lets its lane overlap it with the next one (`_lane`): that is what keeps a
    lane's pace close to the homeserver's own, beside a send that takes most of it.
    """

    def __init__(self, db: Database, handlers: dict[InboundSource, Handler],
                 metrics: Metrics | None = None, on_dead: OnDead | None = None,
                 backoff: Callable[[int], float] = backoff,
                 intake: dict[InboundSource, Intake] | None = None,
                 prepare: dict[InboundSource, Prepare] | None = None) -> None:
        self._db = db
        self._prepare = prepare or {}
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
        True if the dispatcher must then look at every lane.

        An item whose handler allows it (bridge.db.outcome.may_overlap) lets the lane's
        next item be prepared meanwhile (read-only, `prepare`) and handled once it is
        done, while its outcome is recorded: the next item waits for that only to read
        what it wrote (`settled`), and runs again if it fails to be recorded."""
        if self._stopping:
            return False
        pipe = _Pipe(first.lane)
        run = pipe.current = self._begin(source, pipe, first)
        try:
            return await self._drive(source, pipe, run)
        finally:
            if pipe.next is not None and not pipe.next.task.done():  # stopped meanwhile
                pipe.next.task.cancel()  # it runs again on restart
                await asyncio.gather(pipe.next.task, return_exceptions=True)

    async def _drive(self, source: InboundSource, pipe: _Pipe, run: _Run) -> bool:
        lane = pipe.lane
        while True:
            attempt = await run.task
            assert attempt is not None  # only a run told it is not its turn ends without
            follower = pipe.next
            if follower is not None:
                go = attempt.error is None and not self._stopping
                follower.turn.set_result(go)
                if not go:
                    await follower.task  # it did nothing yet; it runs again later
                    follower = pipe.next = None
            self._recheck[source].discard(lane)  # the next read sees what was woken
            try:
                ahead = await self._record(source, attempt,
                                           follower.item.id if follower else None)
            except Exception:
                # Recording the outcome failed (database down?): the row is still pending,
                # and the item that overlapped it runs again after it.
                log.exception("inbound %s #%d: could not record the outcome", source,
                              attempt.item.id)
                run.recorded.set_result(None)
                if follower is not None:
                    await asyncio.gather(follower.task, return_exceptions=True)
                    pipe.next = None
                self._retry_later(source, lane, 1)
                return False
            finally:
                if not run.recorded.done():
                    run.recorded.set_result(None)
            if follower is not None:
                run, pipe.current, pipe.next = follower, follower, None
                pipe.candidate = ahead[0] if ahead else None
                self._follow(source, pipe)
                continue
            if ahead is None:
                return False  # backing off
            nxt = ahead[0] if ahead else None
            if nxt is None or self._stopping:
                return lane == GLOBAL_LANE
            if nxt.lane != lane or lane == GLOBAL_LANE:
                # The global lane is next (it runs alone), or the global lane ran and
                # older items of other lanes may be waiting: the dispatcher decides.
                return True
            pipe.candidate = ahead[1] if len(ahead) > 1 else None
            run = pipe.current = self._begin(source, pipe, nxt)

    def _begin(self, source: InboundSource, pipe: _Pipe, item: InboundItem,
               after: _Run | None = None) -> _Run:
        """Start `item`'s run: at once, or (`after` another run) prepared now and handled
        once `after` is."""
        loop = asyncio.get_running_loop()
        run = _Run(item, loop.create_future(), loop.create_future())

        def overlap() -> None:
            run.overlap = True
            self._follow(source, pipe)

        async def go() -> _Attempt | None:
            prepared = None
            if after is not None:
                if (prepare := self._prepare.get(source)) is not None:
                    try:
                        prepared = await prepare(item)
                    except asyncio.CancelledError:
                        raise
                    except Exception:  # the handler reads for itself
                        log.warning("inbound %s #%d: preparing failed", source, item.id)
                if not await run.turn:
                    return None
            return await self._attempt(source, item, after.recorded if after else None,
                                       prepared, overlap)

        run.task = asyncio.create_task(go(), name=f"inbound {source} lane #{item.id}")
        return run

    def _follow(self, source: InboundSource, pipe: _Pipe) -> None:
        """Start the lane's next item behind the current one, once the current one
        allows it and the next item is known."""
        current, nxt = pipe.current, pipe.candidate
        if current is None or not current.overlap or pipe.next is not None or \
                nxt is None or nxt.lane != pipe.lane or pipe.lane == GLOBAL_LANE or \
                self._stopping:
            return
        pipe.candidate = None
        pipe.next = self._begin(source, pipe, nxt, after=current)

    async def _attempt(self, source: InboundSource, item: InboundItem,
                       previous: asyncio.Future[None] | None, prepared: object,
                       on_overlap: Callable[[], None]) -> _Attempt:
        """Run the item's handler; its outcome is recorded afterwards (`_record`)."""
        with outcome.collecting(previous, prepared, on_overlap) as writes:
            try:
                result = await self._handlers[source](item)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                return _Attempt(item, writes, error=exc)
        return _Attempt(item, writes, result)

    async def _record(self, source: InboundSource, attempt: _Attempt, running: int | None
                      ) -> list[InboundItem] | None:
        """Record the outcome; returns the lane's next items (not the one `running`), or
        None while the lane backs off."""
        item, writes = attempt.item, attempt.writes
        if attempt.error is not None:
            return await self._failed(source, item, attempt.error, writes)
        self._backoff.pop((source, item.lane), None)
        # The handler's deferred writes (bridge.db.outcome) land with the outcome. A
        # handler that set the status itself ("held") returned it.
        async with self._db.transaction() as tx:
            await writes.apply(tx)
            return await tx.inbound.complete(
                item, "done" if attempt.result is None else None, running=running)

    async def _failed(self, source: InboundSource, item: InboundItem, exc: Exception,
                      writes: outcome.OutcomeWrites) -> list[InboundItem] | None:
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
