"""The inbound worker's lanes, and SQLite's session turns, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from bridge.db import Database, InboundItem, InboundSource, InboundStatus, Repositories, outcome
from bridge.worker import InboundWorker

Handler = Callable[[InboundItem], Awaitable[InboundStatus | None]]


async def _queue(db: Database, lane: str, payload: str) -> int:
    item_id = await db.inbound.enqueue("whatsapp", f"k:{payload}", payload, lane=lane)
    assert item_id is not None
    return item_id


async def _drained(worker: InboundWorker, timeout: float = 10) -> None:
    await asyncio.sleep(0)
    await asyncio.wait_for(worker.idle["whatsapp"].wait(), timeout)


async def _run(db: Database, handler: Handler, **options: Any) -> InboundWorker:
    worker = InboundWorker(db, {"whatsapp": handler}, **options)
    worker.start()
    return worker


async def test_lane_heads_are_the_oldest_pending_item_of_each_idle_lane(db: Database) -> None:
    a1 = await _queue(db, "a", "a1")
    b1 = await _queue(db, "b", "b1")
    await _queue(db, "a", "a2")
    c1 = await _queue(db, "c", "c1")
    await db.inbound.set_status(b1, "done")
    b2 = await _queue(db, "b", "b2")
    await db.inbound.enqueue("matrix", "m1", "{}", lane="a")  # another source

    heads = await db.inbound.lane_heads("whatsapp")
    assert [h.id for h in heads] == [a1, c1, b2]
    assert [h.lane for h in heads] == ["a", "c", "b"]
    assert [h.id for h in await db.inbound.lane_heads("whatsapp", busy={"a", "b"})] == [c1]
    assert [h.id for h in await db.inbound.lane_heads("whatsapp", limit=1)] == [a1]


async def test_lanes_keep_order_and_never_wait_for_each_other(db: Database) -> None:
    release_a = asyncio.Event()
    order: list[str] = []

    async def handler(item: InboundItem) -> None:
        if item.payload == "a1":
            await release_a.wait()
        order.append(item.payload)

    for payload in ("a1", "a2", "b1", "b2", "a3"):
        await _queue(db, payload[0], payload)
    worker = await _run(db, handler)
    try:
        async with asyncio.timeout(10):
            while order != ["b1", "b2"]:  # lane b finishes while lane a is stuck
                await asyncio.sleep(0.01)
        release_a.set()
        await _drained(worker)
    finally:
        await worker.stop()
    assert order == ["b1", "b2", "a1", "a2", "a3"]
    assert await db.inbound.lane_heads("whatsapp") == []


async def test_items_queued_while_their_lane_runs_are_not_missed(
        db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wake naming a running lane reads nothing; the lane's task must find the item:
    queued mid-item (the task's next read sees it) or just after the task's last read
    (the task was woken meanwhile and looks again before it ends)."""
    release = asyncio.Event()
    order: list[str] = []

    async def handler(item: InboundItem) -> None:
        if item.payload == "a1":
            await release.wait()
        order.append(item.payload)

    await _queue(db, "a", "a1")
    worker = await _run(db, handler)
    real_record = worker._record
    late: list[int] = []

    async def record_then_queue(source: InboundSource, attempt: Any, running: int | None
                                ) -> object:
        nxt = await real_record(source, attempt, running)  # the outcome; the lane's next
        if attempt.item.payload == "a2" and not late:  # right after the lane's last read
            late.append(await _queue(db, "a", "a3"))
            worker.wake("whatsapp", "a")
        return nxt

    monkeypatch.setattr(worker, "_record", record_then_queue)
    try:
        async with asyncio.timeout(10):
            while "a" not in {i.lane for i in await db.inbound.pending("whatsapp")} or \
                    not worker._running["whatsapp"]:
                await asyncio.sleep(0.01)
        await _queue(db, "a", "a2")  # while a1 runs
        worker.wake("whatsapp", "a")
        await asyncio.sleep(0.05)
        release.set()
        async with asyncio.timeout(10):
            while order != ["a1", "a2", "a3"]:
                await asyncio.sleep(0.01)
        await _drained(worker)
    finally:
        await worker.stop()
    assert order == ["a1", "a2", "a3"]
    assert await db.inbound.pending("whatsapp") == []


async def test_global_lane_runs_alone_after_everything_older(db: Database) -> None:
    running: set[str] = set()
    log: list[tuple[str, frozenset[str]]] = []

    async def handler(item: InboundItem) -> None:
        running.add(item.payload)
        log.append((item.payload, frozenset(running)))
        await asyncio.sleep(0.05)
        running.discard(item.payload)

    for lane, payload in (("a", "a1"), ("b", "b1"), ("", "g1"), ("a", "a2"), ("c", "c1")):
        await _queue(db, lane, payload)
    worker = await _run(db, handler)
    try:
        await _drained(worker)
    finally:
        await worker.stop()
    started = [payload for payload, _ in log]
    assert set(started[:2]) == {"a1", "b1"}
    assert started[2] == "g1"
    assert dict(log)["g1"] == {"g1"}  # nothing else ran beside it
    assert set(started[3:]) == {"a2", "c1"}


async def test_a_failing_item_holds_its_lane_only(db: Database) -> None:
    order: list[str] = []
    failed: list[str] = []

    async def handler(item: InboundItem) -> None:
        if item.payload == "a1" and not failed:
            failed.append(item.payload)
            raise ConnectionRefusedError("homeserver unavailable")  # transient
        order.append(item.payload)

    a1 = await _queue(db, "a", "a1")
    for payload in ("a2", "b1"):
        await _queue(db, payload[0], payload)
    worker = await _run(db, handler)
    try:
        async with asyncio.timeout(10):
            while "b1" not in order:
                await asyncio.sleep(0.01)
        assert "a2" not in order  # a2 waits for a1's retry (after 2 s)
        async with asyncio.timeout(10):
            while len(order) < 3:
                await asyncio.sleep(0.05)
    finally:
        await worker.stop()
    assert order == ["b1", "a1", "a2"]
    item = await db.inbound.get(a1)
    assert item is not None and item.status == "done" and item.attempts == 1


async def test_held_items_released_by_an_opt_in_run_before_newer_ones(db: Database) -> None:
    citizen = await db.citizens.create(index_hash="1" * 64, identifier_ct="ct",
                                       pseudonym_code="C001")
    order: list[str] = []

    async def handler(item: InboundItem) -> InboundStatus | None:
        order.append(item.payload)
        if item.payload == "held" and len(order) == 1:
            await db.inbound.hold(item.id, citizen.id, datetime.now(UTC) + timedelta(hours=1))
            return "held"
        if item.payload == "opt-in":
            await db.inbound.release_held(citizen.id)
        return None

    await _queue(db, "a", "held")
    worker = await _run(db, handler)
    try:
        await _drained(worker)
        await _queue(db, "a", "opt-in")
        await _queue(db, "a", "later")
        worker.wake("whatsapp")
        await _drained(worker)
    finally:
        await worker.stop()
    assert order == ["held", "opt-in", "held", "later"]


async def test_lanes_start_while_another_session_writes(db: Database) -> None:
    """Finding which lanes have work is a read: it does not wait for SQLite's writer,
    held meanwhile by others (a lane recording an outcome, a webhook's rows)."""
    started = asyncio.Event()

    async def handler(_item: InboundItem) -> InboundStatus | None:
        started.set()
        return None

    await _queue(db, "a", "one")
    writing, release = asyncio.Event(), asyncio.Event()

    async def writer() -> None:
        async with db.transaction() as tx:
            await tx.kv.set("busy", "yes")
            writing.set()
            await release.wait()

    holder = asyncio.create_task(writer())
    await writing.wait()
    worker = await _run(db, handler)
    try:
        async with asyncio.timeout(5):
            await started.wait()
        release.set()
        await holder
        await _drained(worker)
    finally:
        release.set()
        await worker.stop()


@pytest.mark.parametrize("db_backend", ["sqlite"], indirect=True)
async def test_urgent_sessions_go_before_queued_background_work(db: Database) -> None:
    """SQLite has one writer; sessions queue in-process, acknowledgements first."""
    order: list[str] = []
    hold = asyncio.Event()

    async def session(name: str, urgent: bool = False) -> None:
        if urgent:
            with db.urgent():
                async with db.session():
                    order.append(name)
        else:
            async with db.session():
                order.append(name)
                if name == "first":
                    await hold.wait()

    first = asyncio.create_task(session("first"))
    await asyncio.sleep(0.05)
    background = [asyncio.create_task(session(f"bg{i}")) for i in range(3)]
    await asyncio.sleep(0.05)
    cancelled = asyncio.create_task(session("cancelled"))
    await asyncio.sleep(0.05)
    urgent = asyncio.create_task(session("ack", urgent=True))
    await asyncio.sleep(0.05)
    cancelled.cancel()  # a waiter that gives up must not block the queue
    hold.set()
    await asyncio.wait_for(asyncio.gather(first, urgent, *background), 10)
    assert order == ["first", "ack", "bg0", "bg1", "bg2"]


async def test_deferred_writes_land_with_the_outcome_only(db: Database) -> None:
    """What a handler defers (bridge.db.outcome: the message map of a sent event) is
    written with the item's outcome: not before, not after a transient failure (the
    retry does it again), and also when the item becomes a dead letter (what it did
    before failing happened)."""
    attempts: dict[str, int] = {}
    seen_early: list[str | None] = []

    async def handler(item: InboundItem) -> None:
        attempts[item.payload] = attempts.get(item.payload, 0) + 1
        n = attempts[item.payload]

        async def write(tx: Repositories) -> None:
            await tx.kv.set(f"t:{item.payload}", str(n))

        await outcome.with_outcome(db, write)
        seen_early.append(await db.kv.get(f"t:{item.payload}"))
        if item.payload == "retried" and n == 1:
            raise ConnectionRefusedError("homeserver unavailable")  # transient
        if item.payload == "dead":
            raise ValueError("refused for good")

    ids = {p: await _queue(db, p, p) for p in ("done", "retried", "dead")}
    worker = await _run(db, handler, backoff=lambda n: 0.05)
    try:
        async with asyncio.timeout(10):
            while attempts.get("retried", 0) < 2 or \
                    (await db.inbound.get(ids["dead"])).status != "dead":  # type: ignore[union-attr]
                await asyncio.sleep(0.02)
        await _drained(worker)
    finally:
        await worker.stop()
    assert seen_early == [None] * 4  # deferred, every time
    assert await db.kv.get("t:done") == "1"
    assert await db.kv.get("t:retried") == "2"  # the failed attempt wrote nothing
    assert await db.kv.get("t:dead") == "1"
    assert (await db.inbound.get(ids["retried"])).status == "done"  # type: ignore[union-attr]
    # Outside an item it writes at once.
    await outcome.with_outcome(db, lambda tx: tx.kv.set("t:now", "x"))
    assert await db.kv.get("t:now") == "x"


async def test_the_next_item_starts_while_an_overlapping_outcome_is_recorded(
        db: Database) -> None:
    """An item whose handler says the next one may overlap (bridge.db.outcome:
    `may_overlap`, a relayed message whose only effects are its deferred writes) lets
    its lane start the next item while its outcome is recorded; that item waits for
    the outcome (`settled`) before it reads what it wrote. Outcomes land in order.
    (A lane's first item has no next item read yet: a0 runs before, as usual.)"""
    gate = asyncio.Event()
    payloads = ("a0", "a1", "a2", "a3")
    started = {p: asyncio.Event() for p in payloads}
    passed: list[str] = []
    seen_after_settled: dict[str, str | None] = {}

    async def handler(item: InboundItem) -> None:
        started[item.payload].set()
        await outcome.settled()
        passed.append(item.payload)
        if item.payload != "a0":
            previous = f"a{int(item.payload[1]) - 1}"
            seen_after_settled[item.payload] = await db.kv.get(f"t:{previous}")

        async def write(tx: Repositories) -> None:
            if item.payload == "a1":
                await gate.wait()  # a slow outcome
            await tx.kv.set(f"t:{item.payload}", "written")

        await outcome.with_outcome(db, write)
        outcome.may_overlap()

    ids = [await _queue(db, "a", p) for p in payloads]
    worker = await _run(db, handler)
    try:
        async with asyncio.timeout(10):
            # a2 starts once a1's handler returned, a1's outcome not recorded yet
            await started["a2"].wait()
        await asyncio.sleep(0.1)
        assert passed == ["a0", "a1"]  # a2 waits for a1's outcome
        async with asyncio.timeout(10), db.reading() as tx:  # (SQLite: a1 holds the writer)
            assert (await tx.inbound.get(ids[1])).status == "pending"  # type: ignore[union-attr]
        gate.set()
        await _drained(worker)
    finally:
        gate.set()
        await worker.stop()
    assert passed == list(payloads)
    assert seen_after_settled == {"a1": "written", "a2": "written", "a3": "written"}
    assert [(await db.inbound.get(i)).status for i in ids] == ["done"] * 4  # type: ignore[union-attr]


async def test_items_that_do_not_allow_it_never_overlap(db: Database) -> None:
    recorded_before: dict[str, str | None] = {}

    async def handler(item: InboundItem) -> None:
        if item.payload == "b2":
            recorded_before["b2"] = (await db.inbound.get(first)).status  # type: ignore[union-attr]

        async def write(tx: Repositories) -> None:
            await asyncio.sleep(0.05)
            await tx.kv.set(f"t:{item.payload}", "written")

        await outcome.with_outcome(db, write)

    first = await _queue(db, "b", "b1")
    await _queue(db, "b", "b2")
    worker = await _run(db, handler)
    try:
        await _drained(worker)
    finally:
        await worker.stop()
    assert recorded_before == {"b2": "done"}


async def test_an_outcome_that_fails_to_record_discards_the_overlapping_item(
        db: Database) -> None:
    """The next item ran while the outcome failed to record (the database went away):
    its result is dropped and both run again, in order; nothing is recorded twice."""
    runs: list[str] = []
    broken = [True]

    async def handler(item: InboundItem) -> None:
        runs.append(item.payload)
        n = runs.count(item.payload)

        async def write(tx: Repositories) -> None:
            if item.payload == "a1" and broken[0]:
                broken[0] = False
                raise ConnectionRefusedError("database unavailable")
            await tx.kv.set(f"t:{item.payload}", str(n))

        await outcome.with_outcome(db, write)
        outcome.may_overlap()

    ids = [await _queue(db, "a", p) for p in ("a0", "a1", "a2", "a3")]
    worker = await _run(db, handler, backoff=lambda n: 0.05)
    try:
        async with asyncio.timeout(10):
            while (await db.inbound.get(ids[3])).status != "done":  # type: ignore[union-attr]
                await asyncio.sleep(0.02)
        await _drained(worker)
    finally:
        await worker.stop()
    assert runs == ["a0", "a1", "a2", "a1", "a2", "a3"]
    assert [await db.kv.get(f"t:{p}") for p in ("a0", "a1", "a2", "a3")] == ["1", "2", "2", "1"]


async def test_the_next_item_is_prepared_while_an_overlapping_one_is_handled(
        db: Database) -> None:
    """Once a handler allows overlap, the lane prepares its next item (read-only,
    `prepare`) while the handler still runs; that item's handler starts only when this
    one returned, and finds what was prepared (bridge.db.outcome.prepared). A failed
    item holds the prepared one back: it is handled after the retry, in order."""
    sending = asyncio.Event()
    handled: list[tuple[str, object]] = []
    prepared_while: dict[str, list[str]] = {}
    failures = {"b1": 1}

    async def prepare(item: InboundItem) -> str:
        prepared_while[item.payload] = [p for p, _ in handled]
        return f"prepared:{item.payload}"

    async def handler(item: InboundItem) -> None:
        outcome.may_overlap()
        if item.payload in ("a1", "b1"):
            await sending.wait()  # a slow send, after overlap was allowed
        if failures.get(item.payload):
            failures[item.payload] -= 1
            raise ConnectionRefusedError("homeserver unavailable")  # transient
        handled.append((item.payload, outcome.prepared()))

    for payload in ("a0", "a1", "a2", "b0", "b1", "b2"):
        await _queue(db, payload[0], payload)
    worker = await _run(db, handler, backoff=lambda n: 0.05, prepare={"whatsapp": prepare})
    try:
        async with asyncio.timeout(10):
            while not {"a2", "b2"} <= prepared_while.keys():
                await asyncio.sleep(0.01)
        assert sorted(p for p, _ in handled) == ["a0", "b0"]  # a1 and b1 still sending
        sending.set()
        async with asyncio.timeout(10):
            while len(handled) < 6:
                await asyncio.sleep(0.01)
        await _drained(worker)
    finally:
        sending.set()
        await worker.stop()
    order = [p for p, _ in handled]
    assert [p for p in order if p[0] == "a"] == ["a0", "a1", "a2"]
    assert [p for p in order if p[0] == "b"] == ["b0", "b1", "b2"]  # b2 after b1's retry
    assert dict(handled)["a2"] == "prepared:a2"
    assert dict(handled)["a0"] is None  # a lane's first item is not prepared ahead
    assert "a1" not in prepared_while["a2"]  # prepared while a1 was still being handled
