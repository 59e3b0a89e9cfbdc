"""Queues, message map and kv state, on SQLite and PostgreSQL (fixture `db`)."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta
from functools import partial

import pytest
from sqlalchemy import func, select

from bridge.db import Citizen, Database
from bridge.db.models import InboundRow, OutboxRow
from bridge.errors import NotFound
from bridge.matrix.queued import open_event, seal_event
from bridge.privacy import Cipher
from bridge.types import EventID, RoomID, UserID
from bridge.whatsapp.outbound import WINDOW
from tests.fixtures.wamids import sealed, wamid_hash

ROOM = RoomID("!portal:agency.example")
T0 = datetime(2025, 1, 1, 9, 0, tzinfo=UTC)
CIPHER = Cipher(os.urandom(32))
SEAL = partial(seal_event, CIPHER)


async def _count(db: Database, model: type[InboundRow] | type[OutboxRow]) -> int:
    async with db.session() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


async def _citizen(db: Database, n: int = 1) -> Citizen:
    return await db.citizens.create(
        index_hash=f"{n:064x}", identifier_ct=f"ct{n}", pseudonym_code=f"C{n:03d}"
    )


def _event(event_id: str, body: str = "hola") -> dict[str, object]:
    return {"event_id": event_id, "type": "m.room.message", "content": {"body": body}}


# --- appservice transactions -------------------------------------------------------


async def test_transaction_is_stored_once(db: Database) -> None:
    assert await db.transactions.store("t1", [_event("$a"), _event("$b")], seal=SEAL) is True
    items = await db.inbound.pending("matrix")
    assert [i.dedupe_key for i in items] == ["$a", "$b"]
    assert open_event(CIPHER, items[0]) == _event("$a")
    assert all(i.status == "pending" and i.attempts == 0 for i in items)

    # A retried transaction is a no-op, even if Synapse sent different contents.
    assert await db.transactions.store("t1", [_event("$a"), _event("$c")], seal=SEAL) is False
    assert await _count(db, InboundRow) == 2
    assert await db.transactions.seen("t1")
    assert not await db.transactions.seen("t2")


async def test_event_already_queued_is_skipped(db: Database) -> None:
    assert await db.transactions.store("t1", [_event("$a")], seal=SEAL)
    assert await db.transactions.store("t2", [_event("$a", "again"), _event("$c")], seal=SEAL)
    items = await db.inbound.pending("matrix")
    assert [i.dedupe_key for i in items] == ["$a", "$c"]
    assert open_event(CIPHER, items[0])["content"]["body"] == "hola"  # first copy kept


async def test_concurrent_duplicate_transaction_stores_once(db: Database) -> None:
    events = [_event("$a"), _event("$b"), _event("$c")]
    results = await asyncio.gather(
        *(db.transactions.store("dup", events, seal=SEAL) for _ in range(8)))
    assert sorted(results) == [False] * 7 + [True]
    assert await _count(db, InboundRow) == 3


async def test_concurrent_transactions_sharing_an_event(db: Database) -> None:
    results = await asyncio.gather(
        *(db.transactions.store(f"t{i}", [_event("$shared"), _event(f"$own{i}")], seal=SEAL)
          for i in range(6))
    )
    assert results == [True] * 6
    keys = [i.dedupe_key for i in await db.inbound.pending("matrix", limit=100)]
    assert sorted(keys) == sorted(["$shared", *(f"$own{i}" for i in range(6))])


async def test_events_without_event_id_are_keyed_by_position(db: Database) -> None:
    ephemeral = {"type": "m.typing", "content": {}}
    assert await db.transactions.store("t9", [ephemeral, _event("$a"), ephemeral], seal=SEAL)
    keys = [i.dedupe_key for i in await db.inbound.pending("matrix")]
    assert keys == ["txn:t9:0", "$a", "txn:t9:2"]


async def test_old_transaction_ids_are_purged(db: Database) -> None:
    await db.transactions.store("old", [], seal=SEAL)
    assert await db.transactions.purge(datetime.now(UTC) + timedelta(seconds=1)) == 1
    assert await db.transactions.store("old", [], seal=SEAL)  # forgotten, so new again


# --- inbound queue -----------------------------------------------------------------


async def test_enqueue_dedupes_per_source_and_pending_keeps_order(db: Database) -> None:
    first = await db.inbound.enqueue("whatsapp", "msg:1", "p1")
    assert first is not None
    assert await db.inbound.enqueue("whatsapp", "msg:1", "p1 again") is None
    # The same key from the other source is a different item.
    assert await db.inbound.enqueue("matrix", "msg:1", "m") is not None
    second = await db.inbound.enqueue("whatsapp", "msg:2", "p2")
    assert second is not None and second > first

    whatsapp = await db.inbound.pending("whatsapp")
    assert [(i.dedupe_key, i.payload) for i in whatsapp] == [("msg:1", "p1"), ("msg:2", "p2")]
    assert [i.id for i in await db.inbound.pending("whatsapp", limit=1)] == [first]
    assert len(await db.inbound.pending()) == 3


async def test_after_follows_the_queue_whatever_the_status(db: Database) -> None:
    a = await db.inbound.enqueue("whatsapp", "a", "p")
    b = await db.inbound.enqueue("matrix", "b", "p")
    c = await db.inbound.enqueue("whatsapp", "c", "p")
    assert a is not None and b is not None and c is not None
    await db.inbound.set_status(a, "done")
    assert [i.id for i in await db.inbound.after(0)] == [a, b, c]
    assert [i.dedupe_key for i in await db.inbound.after(a, limit=1)] == ["b"]
    assert await db.inbound.after(c) == []


async def test_status_changes_and_attempts(db: Database) -> None:
    item_id = await db.inbound.enqueue("whatsapp", "w1", "p")
    assert item_id is not None
    assert await db.inbound.note_attempt(item_id, "Timeout") == 1
    assert await db.inbound.note_attempt(item_id, "Timeout") == 2
    await db.inbound.set_status(item_id, "failed", error="GraphError", attempts=5)
    item = await db.inbound.get(item_id)
    assert item is not None
    assert (item.status, item.error, item.attempts) == ("failed", "GraphError", 5)
    assert item.processed_at is not None and item.processed_at.tzinfo is UTC
    assert await db.inbound.pending() == []

    await db.inbound.set_status(item_id, "pending")  # requeued by an admin
    item = await db.inbound.get(item_id)
    assert item is not None and item.processed_at is None and item.error is None

    with pytest.raises(NotFound):
        await db.inbound.set_status(12345, "done")
    with pytest.raises(NotFound):
        await db.inbound.note_attempt(12345, "x")
    assert await db.inbound.get(12345) is None


async def test_held_messages_release_in_order(db: Database) -> None:
    citizen = await _citizen(db)
    other = await _citizen(db, 2)
    until = datetime.now(UTC) + timedelta(hours=72)
    a = await db.inbound.enqueue("whatsapp", "w1", "first", status="held",
                                 hold_until=until, citizen_id=citizen.id)
    b = await db.inbound.enqueue("whatsapp", "w2", "second")
    assert a is not None and b is not None
    await db.inbound.hold(b, citizen.id, until)
    await db.inbound.enqueue("whatsapp", "w3", "not theirs", status="held",
                             hold_until=until, citizen_id=other.id)

    assert [i.payload for i in await db.inbound.held_for(citizen.id)] == ["first", "second"]
    assert await db.inbound.pending() == []

    assert await db.inbound.release_held(citizen.id) == 2
    released = await db.inbound.pending("whatsapp")
    assert [i.payload for i in released] == ["first", "second"]
    assert all(i.hold_until is None for i in released)
    assert await db.inbound.held_for(citizen.id) == []
    assert len(await db.inbound.held_for(other.id)) == 1


async def test_expired_holds_are_purged(db: Database) -> None:
    citizen = await _citizen(db)
    now = datetime.now(UTC)
    for key, hours in (("expired1", -2), ("expired2", -1), ("live", 5)):
        await db.inbound.enqueue("whatsapp", key, "secret", status="held",
                                 hold_until=now + timedelta(hours=hours), citizen_id=citizen.id)
    await db.inbound.enqueue("whatsapp", "pending", "p")  # not held: never purged

    assert await db.inbound.purge_expired_holds(now) == 2
    assert [i.dedupe_key for i in await db.inbound.held_for(citizen.id)] == ["live"]
    assert await db.inbound.purge_expired_holds(now) == 0
    assert await _count(db, InboundRow) == 2


async def test_finished_items_are_purged(db: Database) -> None:
    done = await db.inbound.enqueue("matrix", "$done", "p")
    await db.inbound.enqueue("matrix", "$pending", "p")
    assert done is not None
    await db.inbound.set_status(done, "done")
    assert await db.inbound.purge_finished(datetime.now(UTC) - timedelta(days=1)) == 0
    assert await db.inbound.purge_finished(datetime.now(UTC) + timedelta(seconds=1)) == 1
    assert [i.dedupe_key for i in await db.inbound.pending()] == ["$pending"]


# --- outbox ------------------------------------------------------------------------


async def test_outbox_is_idempotent(db: Database) -> None:
    citizen = await _citizen(db)
    first = await db.outbox.add("$evt1", citizen.id, ROOM, "ciphertext")
    assert first is not None
    assert await db.outbox.add("$evt1", citizen.id, ROOM, "other") is None
    assert await _count(db, OutboxRow) == 1
    assert await db.outbox.depth() == 1


async def test_outbox_due_order_retry_and_outcomes(db: Database) -> None:
    citizen = await _citizen(db)
    now = datetime.now(UTC)
    a = await db.outbox.add("$a", citizen.id, ROOM, "a", not_before=now - timedelta(minutes=5))
    b = await db.outbox.add("$b", citizen.id, ROOM, "b", not_before=now - timedelta(minutes=10))
    c = await db.outbox.add("$c", citizen.id, ROOM, "c", not_before=now - timedelta(minutes=5))
    future = await db.outbox.add("$f", citizen.id, ROOM, "f", not_before=now + timedelta(hours=1))
    assert None not in (a, b, c, future)
    assert a is not None and b is not None and c is not None

    # Longest-waiting first; ties in arrival order; not-yet-due rows left out.
    assert [i.idempotency_key for i in await db.outbox.due(now)] == ["$b", "$a", "$c"]
    assert [i.idempotency_key for i in await db.outbox.due(now, limit=1)] == ["$b"]

    await db.outbox.retry_later(b, now + timedelta(minutes=1), "429")
    item = await db.outbox.get(b)
    assert item is not None
    assert (item.status, item.attempts, item.last_error) == ("pending", 1, "429")
    assert item.next_attempt_at == now + timedelta(minutes=1)
    assert [i.idempotency_key for i in await db.outbox.due(now)] == ["$a", "$c"]
    assert [i.idempotency_key for i in await db.outbox.due(now + timedelta(minutes=2))] == [
        "$a", "$c", "$b",
    ]

    await db.outbox.mark_sent(a, wamid_hash("A"))
    await db.outbox.mark_failed(c, "131047")
    sent = await db.outbox.by_wamid(wamid_hash("A"))
    assert sent is not None and sent.id == a and sent.status == "sent" and sent.attempts == 1
    failed = await db.outbox.get(c)
    assert failed is not None and (failed.status, failed.last_error) == ("failed", "131047")
    assert [i.idempotency_key for i in await db.outbox.due(now)] == []
    assert await db.outbox.depth() == 2  # $b (retrying) and $f (future)

    with pytest.raises(NotFound):
        await db.outbox.mark_sent(9999, wamid_hash("X"))


async def test_outbox_send_in_flight_is_settled_once(db: Database) -> None:
    """An attempt is marked in flight and pushed a confirmation window ahead before
    Graph is called; then either Graph's answer or a delivery status settles it, and
    only the first of them counts."""
    citizen = await _citizen(db)
    now = datetime.now(UTC)
    a = await db.outbox.add("$a", citizen.id, ROOM, "a")
    b = await db.outbox.add("$b", citizen.id, ROOM, "b")
    c = await db.outbox.add("$c", citizen.id, ROOM, "c")
    assert a is not None and b is not None and c is not None
    # Never attempted: no status can settle it.
    assert await db.outbox.confirm_in_flight(a, wamid_hash("X")) is None
    assert await db.outbox.fail_in_flight(a, "x") is None

    window = now + timedelta(minutes=10)
    assert await db.outbox.begin_attempt(a, window)
    item = await db.outbox.get(a)
    assert item is not None and item.status == "pending" and item.sending_at is not None
    assert item.next_attempt_at == window and item.attempts == 0
    assert [i.id for i in await db.outbox.due(now + timedelta(minutes=1))] == [b, c]
    assert [i.id for i in await db.outbox.due(window)] == [b, c, a]

    # The crash case: a status confirms the send in flight, once.
    confirmed = await db.outbox.confirm_in_flight(a, wamid_hash("A"))
    assert confirmed is not None and (confirmed.id, confirmed.status, confirmed.wamid_hash,
                                      confirmed.sending_at, confirmed.attempts) == (
        a, "sent", wamid_hash("A"), None, 1)
    assert await db.outbox.confirm_in_flight(a, wamid_hash("OTHER")) is None
    assert await db.outbox.fail_in_flight(a, "late") is None
    assert await db.outbox.mark_sent(a, wamid_hash("LATE")) is False  # the answer came second
    assert (await db.outbox.by_wamid(wamid_hash("A"))) is not None

    # A failed status fails it; Graph's answer after that changes nothing.
    assert await db.outbox.begin_attempt(b, window)
    failed = await db.outbox.fail_in_flight(b, "status failed 131026")
    assert failed is not None and (failed.status, failed.last_error, failed.sending_at) == (
        "failed", "status failed 131026", None)
    assert await db.outbox.mark_sent(b, wamid_hash("B")) is False

    # Graph's answer first: marked sent, the in-flight mark cleared, a status is late.
    assert await db.outbox.begin_attempt(c, window)
    assert await db.outbox.mark_sent(c, wamid_hash("C")) is True
    item = await db.outbox.get(c)
    assert item is not None and (item.status, item.sending_at) == ("sent", None)
    assert await db.outbox.confirm_in_flight(c, wamid_hash("C")) is None

    # Retry and failure clear the mark too; a row no longer pending is not begun.
    d = await db.outbox.add("$d", citizen.id, ROOM, "d")
    assert d is not None and await db.outbox.begin_attempt(d, window)
    await db.outbox.retry_later(d, now + timedelta(seconds=4), "500 None")
    item = await db.outbox.get(d)
    assert item is not None and item.sending_at is None and item.attempts == 1
    assert await db.outbox.confirm_in_flight(d, wamid_hash("D")) is None
    assert await db.outbox.begin_attempt(d, window)
    await db.outbox.mark_failed(d, "131047")
    item = await db.outbox.get(d)
    assert item is not None and (item.status, item.sending_at) == ("failed", None)
    assert not await db.outbox.begin_attempt(d, window)


async def test_cancel_for_citizen_cancels_only_their_pending(db: Database) -> None:
    one, two = await _citizen(db, 1), await _citizen(db, 2)
    pending = await db.outbox.add("$1", one.id, ROOM, "p")
    sent = await db.outbox.add("$2", one.id, ROOM, "p")
    await db.outbox.add("$3", two.id, ROOM, "p")
    assert pending is not None and sent is not None
    await db.outbox.mark_sent(sent, wamid_hash("2"))

    assert await db.outbox.cancel_for_citizen(one.id) == 1
    cancelled = await db.outbox.get(pending)
    assert cancelled is not None and cancelled.status == "cancelled"
    still_sent = await db.outbox.get(sent)
    assert still_sent is not None and still_sent.status == "sent"
    assert [i.idempotency_key for i in await db.outbox.due(datetime.now(UTC))] == ["$3"]


# --- message map, kv, shared transactions ------------------------------------------


async def test_message_links_map_both_ways(db: Database) -> None:
    assert await db.messages.link(sealed("1"), ROOM, EventID("$e1"), "in")
    assert not await db.messages.link(sealed("1"), ROOM, EventID("$e2"), "in")  # wamid taken
    assert not await db.messages.link(sealed("2"), ROOM, EventID("$e1"), "out")  # event taken
    by_wamid = await db.messages.by_wamid(wamid_hash("1"))
    by_event = await db.messages.by_event(EventID("$e1"))
    assert by_wamid is not None and by_wamid == by_event
    assert (by_wamid.room_id, by_wamid.direction) == (ROOM, "in")
    assert await db.messages.by_wamid(wamid_hash("2")) is None


async def test_kv(db: Database) -> None:
    assert await db.kv.get("sync") is None
    await db.kv.set("sync", "s1")
    await db.kv.set("sync", "s2")
    assert await db.kv.get("sync") == "s2"
    await db.kv.delete("sync")
    assert await db.kv.get("sync") is None


async def test_kv_prefix_is_literal(db: Database) -> None:
    for key in ("held-out:$a", "held-out:$b", "held_out:$c", "held-outx", "other"):
        await db.kv.set(key, key.upper())
    assert sorted(await db.kv.with_prefix("held-out:")) == [("held-out:$a", "HELD-OUT:$A"),
                                                           ("held-out:$b", "HELD-OUT:$B")]
    assert await db.kv.with_prefix("held_") == [("held_out:$c", "HELD_OUT:$C")]  # _ literal


async def test_unconfirmed_staff_messages_are_dropped_by_age_or_room(db: Database) -> None:
    now = datetime.now(UTC)

    async def hold(event_id: str, room_id: str, at: datetime) -> None:
        await db.held.add(EventID(event_id), RoomID(room_id), at, "sealed payloads")

    await hold("$old", "!a", now - timedelta(hours=25))
    await hold("$new", "!a", now - timedelta(hours=1))
    await hold("$other", "!b", now)
    await hold("$other", "!c", now - timedelta(days=9))  # a retried hold keeps the first
    assert await db.held.purge(before=now - WINDOW, dry_run=True) == 1
    assert await db.held.purge(before=now - WINDOW) == 1
    assert await db.held.get(EventID("$old")) is None
    assert await db.held.purge(room_id=RoomID("!a")) == 1
    other = await db.held.get(EventID("$other"))
    assert other is not None and (other.room_id, other.payloads_ct) == ("!b", "sealed payloads")
    assert await db.held.delete(EventID("$other")) and not await db.held.delete(EventID("$other"))


async def test_mutes_and_reactions_are_rows(db: Database) -> None:
    room, user = RoomID("!r:x"), UserID("@cb_ghost:x")
    await db.mutes.add(room, user, 50)
    await db.mutes.add(RoomID("!s:x"), user, None)
    assert await db.mutes.previous_level(room, user) == 50
    assert await db.mutes.previous_level(RoomID("!s:x"), user) is None
    await db.mutes.delete(room, user)
    assert await db.mutes.previous_level(room, user) is None
    assert await db.mutes.forget_user(user) == 1
    await db.reactions.set(user, EventID("$t"), EventID("$r1"))
    await db.reactions.set(user, EventID("$t"), EventID("$r2"))  # a new emoji replaces it
    assert await db.reactions.get(user, EventID("$t")) == "$r2"
    await db.reactions.delete(user, EventID("$t"))
    assert await db.reactions.get(user, EventID("$t")) is None
    await db.reactions.set(user, EventID("$u"), EventID("$r3"))
    assert await db.reactions.forget_ghost(user) == 1


async def test_transaction_commits_together_or_not_at_all(db: Database) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with db.transaction() as tx:
            citizen = await tx.citizens.create(
                index_hash="f" * 64, identifier_ct="ct", pseudonym_code="TX1"
            )
            await tx.outbox.add("$tx", citizen.id, ROOM, "p")
            raise Boom
    assert await db.citizens.by_index("f" * 64) is None
    assert await _count(db, OutboxRow) == 0

    async with db.transaction() as tx:
        citizen = await tx.citizens.create(
            index_hash="f" * 64, identifier_ct="ct", pseudonym_code="TX1"
        )
        await tx.outbox.add("$tx", citizen.id, ROOM, "p")
    assert await db.citizens.by_index("f" * 64) is not None
    assert await db.outbox.depth() == 1
