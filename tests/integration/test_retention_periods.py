"""Retention for everything kept (issue 15 point 6), on SQLite and PostgreSQL: each kind
of row goes once past its `retention.*` period and not before, pending work never goes,
and a dry run counts exactly what a purge then deletes, changing nothing."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from bridge.config import Config
from bridge.db import Citizen, Database
from bridge.db.invites import InviteAccountRow, InviteLinkRow
from bridge.db.models import Base, CitizenRow, InboundRow, MessageMapRow, OutboxRow
from bridge.privacy import Cipher
from bridge.retention import STEPS, TABLES, Retention
from bridge.types import EventID, Pseudonym, RoomID, UserID, WamidHash
from tests.fixtures.synapse import build_test_config

NOW = datetime.now(UTC)
ROOM = RoomID("!portal:agency.example")


def days_ago(n: float) -> datetime:
    return NOW - timedelta(days=n)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return build_test_config("http://127.0.0.1:1", 1, tmp_path)


async def set_row(db: Database, model: type[Base], where: Any, **values: Any) -> None:
    async with db.engine.begin() as conn:
        await conn.execute(update(model).where(where).values(**values))


async def count(db: Database, model: type[Base]) -> int:
    async with db.engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(model))).scalar_one())


async def citizen(db: Database, state: str = "prompted", seen: float = 0) -> Citizen:
    c = await db.citizens.create(index_hash=secrets.token_hex(32), identifier_ct="ct",
                                 pseudonym_code=secrets.token_hex(4).upper(),
                                 consent_state=state)  # type: ignore[arg-type]
    await set_row(db, CitizenRow, CitizenRow.id == c.id, last_inbound_at=days_ago(seen),
                  created_at=days_ago(seen))
    return c


async def outbox(db: Database, c: Citizen, status: str, age: float,
                 in_flight: bool = False) -> int:
    item = await db.outbox.add(secrets.token_hex(8), c.id, ROOM, "sealed")
    assert item is not None
    await set_row(db, OutboxRow, OutboxRow.id == item, status=status,
                  updated_at=days_ago(age), last_failed_at=days_ago(age),
                  sending_at=days_ago(age) if in_flight else None)
    return item


async def dead_inbound(db: Database, age: float) -> int:
    item = await db.inbound.enqueue("whatsapp", secrets.token_hex(8), "sealed", lane="x")
    assert item is not None
    await set_row(db, InboundRow, InboundRow.id == item, status="dead",
                  last_failed_at=days_ago(age))
    return item


async def link(db: Database, created: float, expires: float, uses: int = 0,
               revoked: float | None = None) -> int:
    made = await db.invites.create(token_hash=secrets.token_hex(32), room_id=ROOM,
                                   max_uses=2, expires_at=NOW, created_by="api:admin")
    await set_row(db, InviteLinkRow, InviteLinkRow.id == made.id, uses=uses,
                  created_at=days_ago(created), expires_at=days_ago(expires),
                  revoked_at=None if revoked is None else days_ago(revoked))
    return made.id


async def test_each_kind_goes_after_its_period_and_a_dry_run_only_counts(
        db: Database, config: Config) -> None:
    c = await citizen(db, "granted")
    # outbox_days 30: settled sends older than that go; pending, in flight, dead stay.
    old_sends = [await outbox(db, c, s, 31) for s in ("sent", "failed", "cancelled")]
    kept_sends = [await outbox(db, c, "sent", 29), await outbox(db, c, "pending", 60),
                  await outbox(db, c, "pending", 60, in_flight=True),
                  await outbox(db, c, "dead", 60)]
    # message_map_days 90.
    for n, age in enumerate((91, 89)):
        assert await db.messages.link((WamidHash(f"{n:064x}"), ""), ROOM, EventID(f"$e{n}"), "in")
        await set_row(db, MessageMapRow, MessageMapRow.event_id == f"$e{n}",
                      created_at=days_ago(age))
    # invite_links_days 30: expired, revoked or used up that long ago.
    old_links = [await link(db, 40, expires=31), await link(db, 40, expires=-5, revoked=31),
                 await link(db, 31, expires=-5, uses=2)]
    kept_links = [await link(db, 20, expires=10), await link(db, 31, expires=-5, uses=1),
                  await link(db, 40, expires=-5, revoked=29)]
    await db.invites.add_account(user_id=UserID("@v_a:agency.example"), link_id=old_links[0],
                                 room_id=ROOM, display_name="Vecino")
    # dead_letters_days 90, from the last failure.
    old_dead = [await dead_inbound(db, 91), await outbox(db, c, "dead", 91)]
    kept_dead = [await dead_inbound(db, 89)]
    before = {m: await count(db, m) for m in (OutboxRow, MessageMapRow, InviteLinkRow,
                                              InboundRow)}
    expected = {"settled outbox sends": 3, "message map pairs": 1, "spent invite links": 3,
                "dead letters": 2}
    retention = Retention(db, Cipher(secrets.token_bytes(32)), config)

    dry = await retention.run(NOW, dry_run=True)
    assert {k: dry.deleted[k] for k in expected} == expected
    assert {m: await count(db, m) for m in before} == before, "a dry run deleted something"
    lines = dry.lines()
    assert len(lines) == len(dry.deleted) == len(STEPS) - 2  # no eraser, no Synapse here
    assert "outbox: 3 settled outbox sends would be deleted" in lines
    assert "invite_links: 3 spent invite links would be deleted" in lines
    assert all(line.split(":")[0] in TABLES.values() for line in lines)

    done = await retention.run(NOW)
    assert {k: done.deleted[k] for k in expected} == expected
    assert "message_map: 1 message map pairs deleted" in done.lines()
    for item in old_sends:
        assert await db.outbox.get(item) is None
    for item in kept_sends:
        assert await db.outbox.get(item) is not None
    assert await db.messages.by_event(EventID("$e0")) is None
    assert await db.messages.by_event(EventID("$e1")) is not None
    for link_id in old_links:
        assert await db.invites.get(link_id) is None
    for link_id in kept_links:
        assert await db.invites.get(link_id) is not None
    # The account outlives its link (it is retired on its own terms), unlinked.
    account = await db.invites.account(UserID("@v_a:agency.example"))
    assert account is not None and account.link_id is None
    assert await db.inbound.get(old_dead[0]) is None and await db.outbox.get(old_dead[1]) is None
    assert await db.inbound.get(kept_dead[0]) is not None
    [entry] = [e for e in await db.audit.list(limit=10) if e.action == "dead_letters.purge"]
    assert entry.actor == "retention" and f"in-{old_dead[0]}" in (entry.reason or "")
    assert f"out-{old_dead[1]}" in (entry.reason or "")

    again = await retention.run(NOW)
    assert not any(again.deleted.values())


async def test_never_consented_contacts_are_those_who_never_said_yes(db: Database) -> None:
    old_prompted = await citizen(db, "prompted", seen=31)
    old_refused = await citizen(db, "refused", seen=31)
    await citizen(db, "prompted", seen=29)  # still within the period
    await citizen(db, "granted", seen=60)
    withdrawn = await citizen(db, "withdrawn", seen=60)  # consented once, then withdrew
    notices_only = await citizen(db, "unknown", seen=60)  # said yes to notices
    for who, purpose in ((withdrawn, "mirroring"), (notices_only, "notices")):
        await db.consent.append(citizen_id=who.id, pseudonym=Pseudonym(who.pseudonym_code),
                                purpose=purpose, state="granted",  # type: ignore[arg-type]
                                notice_version="1", notice_hash="0" * 64, channel="whatsapp")
    found = await db.citizens.never_consented(days_ago(30))
    assert [c.id for c in found] == [old_prompted.id, old_refused.id]
    assert [c.id for c in await db.citizens.never_consented(days_ago(30), limit=1)] == [
        old_prompted.id]


async def test_unused_invite_accounts_are_listed_until_found_in_use(db: Database) -> None:
    made = await db.invites.create(token_hash=secrets.token_hex(32), room_id=ROOM, max_uses=3,
                                   expires_at=NOW, created_by="api:admin")
    for name, age in (("old", 31), ("used", 40), ("new", 5)):
        user = UserID(f"@v_{name}:agency.example")
        await db.invites.add_account(user_id=user, link_id=made.id, room_id=ROOM,
                                     display_name=name)
        await set_row(db, InviteAccountRow, InviteAccountRow.user_id == user,
                      created_at=days_ago(age))
    await db.invites.mark_in_use(UserID("@v_used:agency.example"))
    found = await db.invites.unused_accounts(days_ago(30))
    assert [a.user_id for a in found] == ["@v_old:agency.example"]
    assert await db.invites.delete_account(UserID("@v_old:agency.example"))
    assert not await db.invites.delete_account(UserID("@v_old:agency.example"))
    assert await db.invites.unused_accounts(days_ago(30)) == []


async def test_a_citizens_copies_are_found_for_their_export(db: Database) -> None:
    """What the export decrypts: held items (by citizen), queued items (by lane, any
    status), sends (by citizen); nobody else's."""
    c, other = await citizen(db), await citizen(db)
    held = await db.inbound.enqueue("whatsapp", "w1", "sealed", lane="citizen:x")
    done = await db.inbound.enqueue("whatsapp", "w2", "sealed", lane="citizen:x")
    status = await db.inbound.enqueue("whatsapp", "w3", "sealed", lane="statuses:x")
    await db.inbound.enqueue("whatsapp", "w4", "sealed", lane="citizen:y")
    await db.inbound.enqueue("matrix", "$e", "{}", lane="citizen:x")  # not a webhook
    assert held and done and status
    await db.inbound.hold(held, c.id, NOW + timedelta(days=1))
    await db.inbound.set_status(done, "done")
    found = await db.inbound.of_citizen(c.id, ["citizen:x", "statuses:x"])
    assert [(i.id, i.status) for i in found] == [(held, "held"), (done, "done"),
                                                 (status, "pending")]
    mine, theirs = await outbox(db, c, "sent", 1), await outbox(db, other, "sent", 1)
    assert [o.id for o in await db.outbox.for_citizen(c.id)] == [mine]
    assert [o.id for o in await db.outbox.for_citizen(other.id)] == [theirs]


async def test_the_purge_keeps_a_message_that_arrives_while_the_contact_goes(
        db: Database) -> None:
    """The purge erases a silent contact with `keep_new_messages`: a webhook stored just
    before their lane is cleared stays pending (handled as a new first contact), while
    an erasure the person asked for takes everything."""
    done = await db.inbound.enqueue("whatsapp", "w1", "sealed", lane="citizen:z")
    new = await db.inbound.enqueue("whatsapp", "w2", "sealed", lane="citizen:z")
    assert done and new
    await db.inbound.set_status(done, "done")
    assert await db.inbound.delete_lane("whatsapp", "citizen:z", keep_pending=True) == 1
    left = await db.inbound.of_citizen(0, ["citizen:z"])
    assert [(i.id, i.status) for i in left] == [(new, "pending")]
    assert await db.inbound.delete_lane("whatsapp", "citizen:z") == 1
    assert await db.inbound.of_citizen(0, ["citizen:z"]) == []
