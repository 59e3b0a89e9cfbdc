"""Outbox lookups the outbound relay needs, on SQLite and PostgreSQL (fixture `db`):
the send a staff event queued (by its key), and postponing a part without counting an
attempt."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from bridge.db import Database
from bridge.types import RoomID

ROOM = RoomID("!portal:agency.example")


async def test_by_key_and_postpone(db: Database) -> None:
    citizen = await db.citizens.create(index_hash="ab" * 32, identifier_ct="ct",
                                       pseudonym_code="C777")
    now = datetime.now(UTC)
    first = await db.outbox.add("$event", citizen.id, ROOM, "part0")
    second = await db.outbox.add("$event#1", citizen.id, ROOM, "part1")
    assert first is not None and second is not None
    item = await db.outbox.by_key("$event")
    assert item is not None and item.id == first and item.payload == "part0"
    assert (await db.outbox.by_key("$event#1")).id == second  # type: ignore[union-attr]
    assert await db.outbox.by_key("$other") is None

    later = now + timedelta(minutes=5)
    await db.outbox.postpone(second, later)
    postponed = await db.outbox.get(second)
    assert postponed is not None and postponed.attempts == 0 and postponed.status == "pending"
    assert abs((postponed.next_attempt_at - later).total_seconds()) < 1
    assert [i.idempotency_key for i in await db.outbox.due(now + timedelta(seconds=1))] == [
        "$event"]
    assert [i.idempotency_key for i in await db.outbox.due(later + timedelta(seconds=1))] == [
        "$event", "$event#1"]
