"""Nothing lost, nothing stuck: transient failures retry for ever, permanent ones become
dead letters that admins see, retry or discard — on SQLite and PostgreSQL, and end to
end against the real Synapse and the WhatsApp Cloud API simulator."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from bridge.db import Database, InboundItem, InboundStatus
from bridge.matrix.api import MatrixError
from bridge.privacy import DecryptError
from bridge.worker import InboundWorker

Handler = Callable[[InboundItem], Awaitable[InboundStatus | None]]


async def _queue(db: Database, lane: str, payload: str, source: str = "whatsapp") -> int:
    item_id = await db.inbound.enqueue(source, f"k:{payload}", payload, lane=lane)  # type: ignore[arg-type]
    assert item_id is not None
    return item_id


async def _until(predicate: Callable[[], Awaitable[bool] | bool], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while True:
            result = predicate()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await asyncio.sleep(0.02)


async def _status(db: Database, item_id: int) -> str:
    item = await db.inbound.get(item_id)
    assert item is not None
    return item.status


# --- storage and worker (both backends) -------------------------------------------------


async def test_a_poison_item_is_set_aside_and_its_lane_goes_on(db: Database) -> None:
    order: list[str] = []
    announced: list[str] = []

    async def handler(item: InboundItem) -> None:
        if item.payload == "a1":
            raise DecryptError("token failed authentication")
        order.append(item.payload)

    async def on_dead(letter_id: str) -> None:
        announced.append(letter_id)

    a1 = await _queue(db, "citizen:abc", "a1")
    await _queue(db, "citizen:abc", "a2")
    await _queue(db, "citizen:abc", "a3")
    worker = InboundWorker(db, {"whatsapp": handler}, on_dead=on_dead)
    worker.start()
    try:
        await _until(lambda: order == ["a2", "a3"] and announced == [f"in-{a1}"])
    finally:
        await worker.stop()
    item = await db.inbound.get(a1)
    assert item is not None and item.status == "dead" and item.attempts == 1
    assert item.payload == "a1"  # kept as stored (encrypted, in real life)
    [letter] = await db.dead_letters.list()
    assert (letter.id, letter.source, letter.lane_kind, letter.reason, letter.error,
            letter.attempts) == (f"in-{a1}", "whatsapp", "citizen", "undecryptable",
                                 "DecryptError", 1)
    assert letter.first_failed_at == letter.last_failed_at
    assert await db.dead_letters.count() == 1
    # Not finished: no retention purge takes it.
    assert await db.inbound.purge_finished(datetime.now(UTC) + timedelta(days=365)) == 2
    assert await db.dead_letters.get(f"in-{a1}") is not None


async def test_transient_failures_retry_past_the_old_limit_in_order(db: Database) -> None:
    """The old worker gave up after 5 attempts; now the item is retried until it goes
    through, and the item behind it in its lane waits for it (order per citizen)."""
    failures = 12
    seen: list[str] = []

    async def handler(item: InboundItem) -> None:
        seen.append(item.payload)
        if item.payload == "a1" and seen.count("a1") <= failures:
            raise MatrixError(502, "M_UNKNOWN", "bad gateway")

    a1 = await _queue(db, "!room:x", "a1", source="matrix")
    a2 = await _queue(db, "!room:x", "a2", source="matrix")
    worker = InboundWorker(db, {"matrix": handler}, backoff=lambda n: 0.01)
    worker.start()
    try:
        await _until(lambda: "a2" in seen, 20)
    finally:
        await worker.stop()
    assert seen == ["a1"] * (failures + 1) + ["a2"]
    first = await db.inbound.get(a1)
    assert first is not None and first.status == "done" and first.attempts == failures
    assert await _status(db, a2) == "done"
    assert await db.dead_letters.list() == []


async def test_a_retried_lane_loses_its_priority_not_its_place(db: Database) -> None:
    a1 = await _queue(db, "a", "a1")
    await _queue(db, "a", "a2")
    b1 = await _queue(db, "b", "b1")
    g1 = await _queue(db, "", "g1")
    await db.inbound.note_failure(a1, "ConnectionError", 3)
    heads = await db.inbound.lane_heads("whatsapp")
    assert [h.id for h in heads] == [b1, g1, a1]
    failed = await db.inbound.get(a1)
    assert failed is not None and failed.status == "pending" and failed.attempts == 3


async def test_retry_and_discard_of_dead_letters(db: Database) -> None:
    citizen, _ = await db.citizens.get_or_create(index_hash="h" * 64, identifier_ct="x",
                                                 wa_id_ct=None, pseudonym_code="ABCD")
    i1 = await _queue(db, "citizen:h", "i1")
    item = await db.inbound.get(i1)
    assert item is not None
    await db.inbound.note_failure(i1, "ConnectionError", 1)
    await db.inbound.set_aside(item, "bad_payload", "KeyError", 2)
    o1 = await db.outbox.add("evt1", citizen.id, "!portal:x", "token")  # type: ignore[arg-type]
    o2 = await db.outbox.add("availability:9", citizen.id, "", "token")  # type: ignore[arg-type]
    assert o1 is not None and o2 is not None
    assert await db.outbox.set_aside(o1, "graph_refused", "400 131026")
    assert await db.outbox.set_aside(o2, "undecryptable", "DecryptError")
    assert not await db.outbox.set_aside(o2, "undecryptable", "DecryptError")  # not pending
    letters = {d.id: d for d in await db.dead_letters.list()}
    assert set(letters) == {f"in-{i1}", f"out-{o1}", f"out-{o2}"}
    assert letters[f"in-{i1}"].first_failed_at <= letters[f"in-{i1}"].last_failed_at
    assert (letters[f"out-{o1}"].lane_kind, letters[f"out-{o2}"].lane_kind) == ("staff",
                                                                               "notice")
    assert letters[f"out-{o1}"].room_id == "!portal:x"
    assert await db.outbox.depth() == 0

    assert await db.dead_letters.retry("in-999999") is None
    assert await db.dead_letters.retry("nonsense") is None
    assert await db.dead_letters.retry(f"in-{i1}") is not None
    again = await db.inbound.get(i1)
    assert again is not None and (again.status, again.attempts) == ("pending", 0)
    assert await db.dead_letters.retry(f"in-{i1}") is None  # no longer dead
    assert await db.dead_letters.retry(f"out-{o1}") is not None
    out = await db.outbox.get(o1)
    assert out is not None and (out.status, out.attempts) == ("pending", 0)
    assert [x.id for x in await db.outbox.due(datetime.now(UTC))] == [o1]
    assert await db.dead_letters.discard(f"out-{o2}") is not None
    gone = await db.outbox.get(o2)
    assert gone is not None and gone.status == "cancelled"
    assert await db.dead_letters.count() == 0
