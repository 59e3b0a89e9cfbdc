"""Notice subscriptions and the notice log, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from bridge.db import Citizen, Database, Notice
from bridge.db.queues import NOTICE_KEY_PREFIX
from bridge.errors import Conflict
from bridge.types import Pseudonym, RoomID
from tests.fixtures.wamids import wamid_hash


async def _citizen(db: Database, n: int = 1) -> Citizen:
    return await db.citizens.create(index_hash=f"{n:064x}", identifier_ct=f"ct{n}",
                                    pseudonym_code=f"C{n:03d}")


async def _notice(db: Database, citizen: Citizen, reference: str = "NOT-2026/1"
                  ) -> tuple[Notice, bool]:
    return await db.notices.add(
        reference=reference, citizen_id=citizen.id, pseudonym=Pseudonym(citizen.pseudonym_code),
        template_name="aviso", template_language="es", template_version="3",
        requested_by="admin-api")


async def test_subscription_is_created_once_with_a_unique_code(db: Database) -> None:
    one, two = await _citizen(db, 1), await _citizen(db, 2)
    sub = await db.subscriptions.get_or_create(one.id, "BCDF-GHJK-LMNP")
    assert (sub.code, sub.state) == ("BCDF-GHJK-LMNP", "unknown")
    # A second call keeps the first code.
    assert (await db.subscriptions.get_or_create(one.id, "QRST-VWXZ-BCDF")).code == sub.code
    with pytest.raises(Conflict):
        await db.subscriptions.get_or_create(two.id, "BCDF-GHJK-LMNP")
    await db.subscriptions.set_state(one.id, "granted")
    found = await db.subscriptions.by_code("BCDF-GHJK-LMNP")
    assert found is not None and (found.citizen_id, found.state) == (one.id, "granted")
    assert await db.subscriptions.get(two.id) is None
    # Conditional: a change from a state the row no longer has does nothing.
    assert not await db.subscriptions.set_state(one.id, "withdrawn", only_from="prompted")
    assert await db.subscriptions.set_state(one.id, "withdrawn", only_from="granted")
    assert not await db.subscriptions.set_state(one.id, "withdrawn", only_from="granted")
    assert not await db.subscriptions.set_state(two.id, "withdrawn")  # no row
    found = await db.subscriptions.get(one.id)
    assert found is not None and found.state == "withdrawn"
    with pytest.raises(IntegrityError):  # the CHECK constraint guards the state names
        await db.subscriptions.set_state(one.id, "maybe")  # type: ignore[arg-type]


async def test_notice_is_idempotent_per_pseudonym_and_reference(db: Database) -> None:
    one, two = await _citizen(db, 1), await _citizen(db, 2)
    first, created = await _notice(db, one)
    assert created and first.status == "queued" and first.wamid_hash is None
    again, created = await _notice(db, one)
    assert not created and again == first
    assert (await _notice(db, two))[1]  # same reference, another citizen: a new notice
    assert (await _notice(db, one, "NOT-2026/2"))[1]
    results = await asyncio.gather(*(_notice(db, one, "NOT-2026/3") for _ in range(5)))
    assert sum(created for _, created in results) == 1
    assert len({n.id for n, _ in results}) == 1
    assert [n.reference for n in await db.notices.list(citizen_id=one.id)] == [
        "NOT-2026/3", "NOT-2026/2", "NOT-2026/1"]
    assert len(await db.notices.list(reference="NOT-2026/1")) == 2
    assert await db.notices.find(Pseudonym("C001"), "NOT-2026/1") == first


async def test_statuses_fill_the_times_and_the_first_report_wins(db: Database) -> None:
    citizen = await _citizen(db)
    notice, _ = await _notice(db, citizen)
    assert not await db.notices.record_status(wamid_hash("nobody"), "delivered",
                                              datetime.now(UTC))
    await db.notices.mark_accepted(notice.id, wamid_hash("A"))
    t1 = datetime(2026, 5, 1, 10, 0, tzinfo=UTC)
    assert await db.notices.record_status(wamid_hash("A"), "delivered", t1)
    assert not await db.notices.record_status(wamid_hash("A"), "delivered", t1 + timedelta(hours=1))
    assert not await db.notices.record_status(wamid_hash("A"), "played", t1)
    assert await db.notices.record_status(wamid_hash("A"), "read", t1 + timedelta(minutes=5))
    got = await db.notices.get(notice.id)
    assert got is not None and got.status == "read" and got.sent_at is not None
    assert (got.delivered_at, got.read_at) == (t1, t1 + timedelta(minutes=5))
    assert await db.notices.record_status(wamid_hash("A"), "failed", t1, "Message undeliverable")
    got = await db.notices.get(notice.id)
    assert got is not None and got.status == "failed" and got.error == "Message undeliverable"


async def test_unsent_notices_fail_and_erasure_keeps_the_log_by_pseudonym(db: Database) -> None:
    citizen = await _citizen(db)
    sent, _ = await _notice(db, citizen, "R1")
    await db.notices.mark_accepted(sent.id, wamid_hash("S"))
    unsent, _ = await _notice(db, citizen, "R2")
    await db.subscriptions.get_or_create(citizen.id, "BCDF-GHJK-LMNP")
    assert await db.notices.fail_unsent(citizen.id, "consent withdrawn") == 1
    assert await db.notices.fail_unsent(citizen.id, "again") == 0
    got = await db.notices.get(unsent.id)
    assert got is not None and got.status == "failed" and got.error == "consent withdrawn"
    assert (await db.notices.get(sent.id)).status == "sent"  # type: ignore[union-attr]

    # Erasure unlinks the entries from the messages first: no wamid hash stays.
    assert await db.notices.forget_wamids(citizen.id) == 1
    assert await db.notices.forget_wamids(citizen.id) == 0
    assert not await db.notices.record_status(wamid_hash("S"), "read", datetime.now(UTC))
    assert await db.citizens.delete(citizen.id)
    assert await db.subscriptions.by_code("BCDF-GHJK-LMNP") is None  # CASCADE
    kept = await db.notices.list(pseudonym=Pseudonym("C001"))
    assert len(kept) == 2 and all(n.citizen_id is None for n in kept)  # SET NULL
    assert all(n.wamid_hash is None for n in kept)
    assert [n.status for n in kept] == ["failed", "sent"]


async def test_outbox_cancels_notices_and_chat_separately(db: Database) -> None:
    citizen = await _citizen(db)
    await db.outbox.add("$chat", citizen.id, RoomID("!p:x"), "p")
    await db.outbox.add("optout:" + wamid_hash("1"), citizen.id, RoomID(""), "p")
    await db.outbox.add(f"{NOTICE_KEY_PREFIX}1", citizen.id, RoomID(""), "p")
    assert await db.outbox.cancel_for_citizen(citizen.id) == 2  # a chat opt-out
    assert await db.outbox.depth() == 1
    assert await db.outbox.cancel_for_citizen(citizen.id, notices=True) == 1
    assert await db.outbox.depth() == 0


async def test_purge_deletes_old_entries_only(db: Database) -> None:
    citizen = await _citizen(db)
    old, _ = await _notice(db, citizen, "OLD")
    await _notice(db, citizen, "NEW")
    async with db.engine.begin() as conn:
        await conn.execute(text("UPDATE notices SET created_at = :t WHERE id = :i"),
                           {"t": datetime(2020, 1, 1) if db.dialect == "sqlite"
                            else datetime(2020, 1, 1, tzinfo=UTC), "i": old.id})
    assert await db.notices.purge(datetime.now(UTC) - timedelta(days=30)) == 1
    assert [n.reference for n in await db.notices.list()] == ["NEW"]
