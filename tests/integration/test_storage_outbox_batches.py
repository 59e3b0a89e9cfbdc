"""The outbox repository's batch operations, on SQLite and PostgreSQL (fixture `db`):
lane heads in queue order, a batch marked in flight / released / marked sent in one
statement each, and the sends postponed behind a settled one brought forward."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import event, text

from bridge.db import Database
from bridge.types import RoomID, WamidHash

ROOM = RoomID("")


async def citizen_ids(db: Database, n: int) -> list[int]:
    return [(await db.citizens.create(index_hash=f"{i:02d}" * 32, identifier_ct="ct",
                                      pseudonym_code=f"C{i:03d}")).id for i in range(n)]


async def test_lane_heads_take_each_citizens_oldest_due_send(db: Database) -> None:
    a, b = await citizen_ids(db, 2)
    now = datetime.now(UTC)
    a1 = await db.outbox.add("wr:a1", a, ROOM, "x")
    a2 = await db.outbox.add("wr:a2", a, ROOM, "x")
    b1 = await db.outbox.add("wr:b1", b, ROOM, "x")
    assert a1 and a2 and b1
    # a1 was retried and is due again later than a2: it still goes first.
    await db.outbox.postpone(a1, now + timedelta(seconds=1))
    later = now + timedelta(seconds=2)
    assert [i.id for i in await db.outbox.lane_heads(later, 10)] == [a1, b1]
    assert [i.id for i in await db.outbox.lane_heads(later, 1)] == [a1]
    # While a1 is not due, a2 is the head (the queue then checks waiting room sends).
    assert [i.id for i in await db.outbox.lane_heads(now + timedelta(milliseconds=500),
                                                     10)] == [a2, b1]
    assert [(c, i) for c, i, _ in await db.outbox.waiting_room_sends(
        [a, b], now + timedelta(milliseconds=500))] == [(a, a1)]


async def test_a_batch_in_flight_released_and_marked_sent(db: Database) -> None:
    ids = [await db.outbox.add(f"k{n}", c, ROOM, "x") for n, c in
           enumerate(await citizen_ids(db, 3))]
    x, y, z = (i for i in ids if i is not None)
    await db.outbox.cancel_for_citizen((await db.outbox.get(z)).citizen_id)  # type: ignore[union-attr]
    window = datetime.now(UTC) + timedelta(minutes=10)
    assert await db.outbox.begin_attempts([x, y, z], window) == {x, y}
    await db.outbox.release([y])
    released = await db.outbox.get(y)
    assert released is not None and released.sending_at is None
    assert released.next_attempt_at <= datetime.now(UTC)
    assert await db.outbox.mark_sent_many({x: WamidHash("a" * 64), y: WamidHash("b" * 64)}
                                          ) == {x, y}
    assert (await db.outbox.get(x)).wamid_hash == "a" * 64  # type: ignore[union-attr]
    assert (await db.outbox.get(y)).wamid_hash == "b" * 64  # type: ignore[union-attr]
    assert await db.outbox.mark_sent_many({x: WamidHash("c" * 64)}) == set()  # settled


async def test_bring_forward_only_untried_later_sends(db: Database) -> None:
    (c,) = await citizen_ids(db, 1)
    first = await db.outbox.add("wr:1", c, ROOM, "x")
    waiting = await db.outbox.add("wr:2", c, ROOM, "x")
    retrying = await db.outbox.add("wr:3", c, ROOM, "x")
    assert first and waiting and retrying
    later = datetime.now(UTC) + timedelta(minutes=10)
    await db.outbox.postpone(waiting, later)
    await db.outbox.retry_later(retrying, later, "429 130429")
    assert await db.outbox.bring_forward(c, first) == 1
    assert (await db.outbox.get(waiting)).next_attempt_at <= datetime.now(UTC)  # type: ignore[union-attr]
    assert (await db.outbox.get(retrying)).next_attempt_at > datetime.now(UTC)  # type: ignore[union-attr]


async def test_add_many_queues_in_order_and_skips_keys_queued_before(db: Database) -> None:
    a, b = await citizen_ids(db, 2)
    first = await db.outbox.add("wr:$e:a", a, ROOM, "x")
    await db.outbox.add_many([("wr:$e:a", a, ROOM, "y"), ("wr:$e:b", b, ROOM, "y"),
                              ("wr:$f:a", a, ROOM, "y")])
    heads = await db.outbox.due(datetime.now(UTC) + timedelta(seconds=1))
    assert [(i.idempotency_key, i.payload) for i in heads] == [
        ("wr:$e:a", "x"), ("wr:$e:b", "y"), ("wr:$f:a", "y")]
    assert heads[0].id == first and heads[1].id < heads[2].id  # queue order kept


async def test_lane_heads_leave_out_busy_citizens(db: Database) -> None:
    """A citizen with a batch in flight gets nothing in the next claim, not even a
    later send: their sends stay one after another."""
    a, b = await citizen_ids(db, 2)
    for key, citizen in (("a1", a), ("a2", a), ("b1", b), ("b2", b)):
        await db.outbox.add(key, citizen, ROOM, "x")
    later = datetime.now(UTC) + timedelta(seconds=1)
    assert [i.idempotency_key for i in await db.outbox.lane_heads(later, 10, busy={a})] \
        == ["b1"]
    assert await db.outbox.lane_heads(later, 10, busy={a, b}) == []


async def test_a_claim_walks_the_queue_by_index_not_the_whole_table(db: Database) -> None:
    """Sent rows stay until the purge: the claim (lane heads, in queue order) must read
    pending rows by the (status, id) index, not scan the table from its first sent row
    or sort every pending row."""
    (a,) = await citizen_ids(db, 1)
    await db.outbox.add_many([(f"old{n}", a, ROOM, "x") for n in range(3000)])
    async with db.engine.begin() as conn:
        await conn.execute(text("UPDATE outbox SET status = 'sent'"))
    await db.outbox.add_many([(f"new{n}", a, ROOM, "x") for n in range(50)])
    captured: list[tuple[str, Any]] = []

    def capture(_c: Any, _cur: Any, statement: str, parameters: Any, *_: Any) -> None:
        if "FROM outbox" in statement:
            captured.append((statement, parameters))

    event.listen(db.engine.sync_engine, "before_cursor_execute", capture)
    try:
        heads = await db.outbox.lane_heads(datetime.now(UTC) + timedelta(seconds=1), 64,
                                           busy={a + 1})
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", capture)
    assert [h.idempotency_key for h in heads] == ["new0"]
    (sql, params), = captured
    async with db.engine.connect() as conn:
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        if db.dialect == "sqlite":
            await conn.execute(text("ANALYZE"))
            cursor = await driver.execute("EXPLAIN QUERY PLAN " + sql, params)
            plan = " ".join(str(row[-1]) for row in await cursor.fetchall())
        else:
            await conn.execute(text("ANALYZE outbox"))
            plan = "\n".join(r[0] for r in await driver.fetch("EXPLAIN " + sql, *params))
    assert "ix_outbox_status_id" in plan and "Seq Scan" not in plan, plan
    if db.dialect == "sqlite":  # walked in id order, not sorted
        assert "TEMP B-TREE" not in plan and "SCAN outbox" not in plan, plan


async def test_sending_to_sees_a_citizens_unrecorded_sends_begun_in_the_span(db: Database
                                                                             ) -> None:
    a, b = await citizen_ids(db, 2)
    x = await db.outbox.add("wr:x", a, ROOM, "x")
    assert x and await db.outbox.add("wr:y", b, ROOM, "x")
    before = datetime.now(UTC) - timedelta(seconds=1)
    assert not await db.outbox.sending_to(a, before, datetime.now(UTC))  # not begun
    assert await db.outbox.begin_attempts([x], datetime.now(UTC) + timedelta(minutes=10))
    after = datetime.now(UTC) + timedelta(seconds=1)
    assert await db.outbox.sending_to(a, before, after)
    assert not await db.outbox.sending_to(b, before, after)  # another citizen's
    assert not await db.outbox.sending_to(a, after, after + timedelta(seconds=1))
    assert not await db.outbox.sending_to(a, before - timedelta(seconds=9), before)
    assert await db.outbox.mark_sent_many({x: WamidHash("a" * 64)}) == {x}
    assert not await db.outbox.sending_to(a, before, after)  # recorded
