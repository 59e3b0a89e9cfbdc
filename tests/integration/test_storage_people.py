"""Citizens, ghosts, rooms, consent evidence and the audit chain, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import inspect
from datetime import UTC, datetime, timedelta
from itertools import pairwise

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from bridge.db import Citizen, Database
from bridge.db.audit import GENESIS, entry_hash
from bridge.db.people import ConsentRepo
from bridge.errors import Conflict, NotFound
from bridge.types import DeviceID, Pseudonym, RoomID, UserID

GHOST = UserID("@cb_k3j5:agency.example")
STAFF = UserID("@ana:agency.example")


async def _citizen(db: Database, n: int = 1) -> Citizen:
    return await db.citizens.create(
        index_hash=f"{n:064x}", identifier_ct=f"ct{n}", wa_id_ct=f"wa{n}",
        pseudonym_code=f"C{n:03d}",
    )


async def _raw(db: Database, sql: str, **params: object) -> None:
    async with db.engine.begin() as conn:
        await conn.execute(text(sql), params)


# --- citizens ----------------------------------------------------------------------


async def test_citizen_lookup_and_updates(db: Database) -> None:
    citizen = await _citizen(db)
    assert (citizen.consent_state, citizen.ghost_user_id, citizen.wa_id_ct) == (
        "unknown", None, "wa1",
    )
    assert await db.citizens.by_index("0" * 63 + "1") == citizen
    assert await db.citizens.by_pseudonym("C001") == citizen
    assert await db.citizens.get(citizen.id) == citizen

    await db.citizens.set_consent_state(citizen.id, "granted")
    await db.citizens.set_ghost(citizen.id, GHOST)
    found = await db.citizens.by_ghost(GHOST)
    assert found is not None
    assert (found.id, found.consent_state, found.ghost_user_id) == (citizen.id, "granted", GHOST)

    with pytest.raises(NotFound):
        await db.citizens.set_consent_state(999, "granted")
    with pytest.raises(IntegrityError):  # the CHECK constraint guards the state names
        await db.citizens.set_consent_state(citizen.id, "maybe")  # type: ignore[arg-type]


async def test_touch_inbound_only_moves_forward(db: Database) -> None:
    citizen = await _citizen(db)
    t = datetime(2025, 5, 1, 10, 0, tzinfo=UTC)
    await db.citizens.touch_inbound(citizen.id, t)
    await db.citizens.touch_inbound(citizen.id, t - timedelta(minutes=1))  # late webhook
    stored = await db.citizens.get(citizen.id)
    assert stored is not None and stored.last_inbound_at == t
    await db.citizens.touch_inbound(citizen.id, t + timedelta(hours=1))
    stored = await db.citizens.get(citizen.id)
    assert stored is not None and stored.last_inbound_at == t + timedelta(hours=1)


async def test_create_conflicts_and_racing_get_or_create(db: Database) -> None:
    citizen = await _citizen(db)
    with pytest.raises(Conflict):
        await _citizen(db)  # same index hash
    with pytest.raises(Conflict):  # a new contact whose random code collides
        await db.citizens.create(index_hash="e" * 64, identifier_ct="x", pseudonym_code="C001")

    # Two webhooks for one new contact at the same moment: one row, one creator.
    results = await asyncio.gather(*(
        db.citizens.get_or_create(index_hash="b" * 64, identifier_ct="ct", pseudonym_code=f"R{i}")
        for i in range(5)
    ))
    assert sorted(created for _, created in results) == [False] * 4 + [True]
    assert len({c.id for c, _ in results}) == 1
    again, created = await db.citizens.get_or_create(
        index_hash="0" * 63 + "1", identifier_ct="new", pseudonym_code="ZZZ"
    )
    assert not created and again == citizen


async def test_identifiers_for_key_rotation(db: Database) -> None:
    one, two = await _citizen(db, 1), await _citizen(db, 2)
    listed = await db.citizens.list_identifiers()
    assert [(i.id, i.identifier_ct, i.wa_id_ct) for i in listed] == [
        (one.id, "ct1", "wa1"), (two.id, "ct2", "wa2"),
    ]
    await db.citizens.update_identifier(one.id, "k2:ct1", None)
    updated = await db.citizens.get(one.id)
    assert updated is not None and (updated.identifier_ct, updated.wa_id_ct) == ("k2:ct1", None)
    assert updated.index_hash == one.index_hash  # the lookup key does not change


async def test_rekey_keeps_the_row_and_refuses_a_taken_identity(db: Database) -> None:
    """A number/BSUID change moves the same citizen (pseudonym, ghost, consent) to the
    new identity; an identity another citizen already has is a Conflict, not a merge."""
    citizen = await _citizen(db, 1)
    await db.citizens.set_ghost(citizen.id, GHOST)
    await db.citizens.set_consent_state(citizen.id, "granted")
    other = await _citizen(db, 2)
    new_hash = "a" * 64
    await db.citizens.rekey(citizen.id, index_hash=new_hash, identifier_ct="ctN",
                            wa_id_ct="waN")
    assert await db.citizens.by_index(f"{1:064x}") is None
    moved = await db.citizens.by_index(new_hash)
    assert moved is not None
    assert (moved.id, moved.pseudonym_code, moved.ghost_user_id, moved.consent_state,
            moved.identifier_ct, moved.wa_id_ct) == (
        citizen.id, "C001", GHOST, "granted", "ctN", "waN")
    with pytest.raises(Conflict):
        await db.citizens.rekey(citizen.id, index_hash=other.index_hash, identifier_ct="x",
                                wa_id_ct=None)
    assert (await db.citizens.by_index(new_hash)) == moved  # unchanged
    async with db.transaction() as tx:  # also inside a transaction
        await tx.citizens.rekey(citizen.id, index_hash="b" * 64, identifier_ct="ctB",
                                wa_id_ct=None)
    again = await db.citizens.get(citizen.id)
    assert again is not None and (again.index_hash, again.wa_id_ct) == ("b" * 64, None)
    with pytest.raises(NotFound):
        await db.citizens.rekey(999, index_hash="c" * 64, identifier_ct="x", wa_id_ct=None)


async def test_erasure_removes_messages_and_keeps_evidence_unlinked(db: Database) -> None:
    citizen, other = await _citizen(db, 1), await _citizen(db, 2)
    await db.ghosts.create(GHOST, DeviceID("DEV"), "Ciudadano/a C001", "citizen",
                           citizen_id=citizen.id)
    await db.rooms.create(RoomID("!p:x"), "portal", "Portal C001", STAFF, citizen_id=citizen.id)
    await db.consent.append(citizen_id=citizen.id, pseudonym=Pseudonym("C001"),
                            purpose="mirroring", state="granted", notice_version="1",
                            notice_hash="a" * 64, channel="whatsapp")
    await db.inbound.enqueue("whatsapp", "w1", "held", status="held",
                             hold_until=datetime.now(UTC) + timedelta(hours=1),
                             citizen_id=citizen.id)
    await db.outbox.add("$1", citizen.id, RoomID("!p:x"), "p")
    await db.outbox.add("$2", other.id, RoomID("!q:x"), "p")

    assert await db.citizens.delete(citizen.id) is True
    assert await db.citizens.delete(citizen.id) is False
    assert await db.citizens.get(citizen.id) is None
    assert await db.inbound.held_for(citizen.id) == []
    assert await db.outbox.depth() == 1  # only the other citizen's
    ghost = await db.ghosts.get(GHOST)
    assert ghost is not None and ghost.citizen_id is None
    room = await db.rooms.get(RoomID("!p:x"))
    assert room is not None and room.citizen_id is None
    [record] = await db.consent.for_pseudonym(Pseudonym("C001"))
    assert record.citizen_id is None and record.state == "granted"


# --- ghosts and rooms --------------------------------------------------------------


async def test_ghosts(db: Database) -> None:
    citizen = await _citizen(db)
    bot = UserID("@cb_bot:agency.example")
    await db.ghosts.create(bot, DeviceID("BOTDEV"), "Bridge", "bot")
    ghost = await db.ghosts.create(GHOST, DeviceID("DEV1"), "Ciudadano/a C001", "citizen",
                                   citizen_id=citizen.id)
    assert not ghost.registered and ghost.cross_signing_ct is None
    with pytest.raises(Conflict):
        await db.ghosts.create(GHOST, DeviceID("DEV2"), "x", "citizen")

    await db.ghosts.mark_registered(GHOST)
    await db.ghosts.set_cross_signing(GHOST, "k1:opaque")
    await db.ghosts.set_display_name(GHOST, "Ciudadano/a C002")
    stored = await db.ghosts.by_citizen(citizen.id)
    assert stored is not None
    assert (stored.user_id, stored.registered, stored.cross_signing_ct, stored.display_name) == (
        GHOST, True, "k1:opaque", "Ciudadano/a C002",
    )
    assert [g.user_id for g in await db.ghosts.all()] == sorted([bot, GHOST])
    assert await db.ghosts.get(UserID("@nobody:x")) is None
    with pytest.raises(NotFound):
        await db.ghosts.mark_registered(UserID("@nobody:x"))


async def test_rooms(db: Database) -> None:
    citizen = await _citizen(db)
    team = await db.rooms.create(RoomID("!team:x"), "team", "Equipo", STAFF, topic="interno")
    assert (team.kind, team.topic, team.closed_at) == ("team", "interno", None)
    with pytest.raises(Conflict):
        await db.rooms.create(RoomID("!team:x"), "team", "Equipo", STAFF)
    old = await db.rooms.create(RoomID("!p1:x"), "portal", "Portal", STAFF, citizen_id=citizen.id)
    await db.rooms.close(old.room_id)
    await db.rooms.create(RoomID("!p2:x"), "portal", "Portal", STAFF, citizen_id=citizen.id)

    portal = await db.rooms.portal_for(citizen.id)
    assert portal is not None and portal.room_id == "!p2:x"
    assert [r.room_id for r in await db.rooms.list()] == ["!team:x", "!p2:x"]
    assert [r.room_id for r in await db.rooms.list(include_closed=True)] == [
        "!team:x", "!p1:x", "!p2:x",
    ]
    assert [r.room_id for r in await db.rooms.list(kind="team")] == ["!team:x"]

    closed = await db.rooms.get(old.room_id)
    assert closed is not None and closed.closed_at is not None
    await db.rooms.close(old.room_id)  # again: keeps the first time
    assert await db.rooms.get(old.room_id) == closed
    with pytest.raises(NotFound):
        await db.rooms.close(RoomID("!nope:x"))


# --- consent -----------------------------------------------------------------------


async def test_consent_is_append_only(db: Database) -> None:
    public = {name for name, _ in inspect.getmembers(ConsentRepo) if not name.startswith("_")}
    assert public == {"append", "for_citizen", "for_pseudonym"}

    citizen = await _citizen(db)
    common = {"citizen_id": citizen.id, "pseudonym": Pseudonym("C001"), "purpose": "mirroring",
              "notice_version": "1", "notice_hash": "a" * 64, "channel": "whatsapp"}
    first = await db.consent.append(**common, state="prompted", language="es")  # type: ignore[arg-type]
    second = await db.consent.append(**common, state="granted",  # type: ignore[arg-type]
                                     evidence="wamid.HBg", staff_id=STAFF)
    records = await db.consent.for_citizen(citizen.id)
    assert records == [first, second]
    assert [(r.state, r.evidence, r.staff_id) for r in records] == [
        ("prompted", None, None), ("granted", "wamid.HBg", STAFF),
    ]
    assert second.created_at >= first.created_at and second.created_at.tzinfo is UTC
    assert await db.consent.for_citizen(citizen.id + 1) == []


# --- audit -------------------------------------------------------------------------


async def test_audit_chain_links_and_pages(db: Database) -> None:
    assert await db.audit.verify() == (True, None)
    entries = [await db.audit.append(STAFF, "room.kick", f"!r:x @u{i}:x", "ok", "spam")
               for i in range(5)]
    assert entries[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.hash for a, b in pairwise(entries))
    assert await db.audit.verify() == (True, None)

    page = await db.audit.list(limit=2)
    assert [e.id for e in page] == [entries[4].id, entries[3].id]
    page = await db.audit.list(limit=10, before_id=page[-1].id)
    assert [e.id for e in page] == [e.id for e in reversed(entries[:3])]
    assert page[-1] == entries[0]


async def test_concurrent_appends_keep_the_chain_linear(db: Database) -> None:
    await asyncio.gather(*(db.audit.append("admin", "room.invite", f"o{i}", "ok")
                           for i in range(20)))
    chain = list(reversed(await db.audit.list(limit=100)))
    assert len(chain) == 20
    assert chain[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.hash for a, b in pairwise(chain))
    assert await db.audit.verify() == (True, None)


async def test_audit_verify_detects_an_edited_row(db: Database) -> None:
    entries = [await db.audit.append("admin", "citizen.reidentify", f"C{i}", "ok", "court order")
               for i in range(4)]
    await _raw(db, "UPDATE audit_log SET reason = :r WHERE id = :id", r="curiosity",
               id=entries[1].id)
    assert await db.audit.verify() == (False, entries[1].id)


async def test_audit_verify_detects_a_rehashed_edit(db: Database) -> None:
    # An editor who recomputes the row's own hash without audit.key (plain SHA-256, as
    # the chain was before the key existed) fails that row's MAC.
    entries = [await db.audit.append("admin", "a", f"o{i}", "ok") for i in range(3)]
    e = entries[1]
    new_hash = entry_hash(at=e.at, actor=e.actor, action=e.action, object=e.object,
                          result="denied", reason=e.reason, prev_hash=e.prev_hash)
    await _raw(db, "UPDATE audit_log SET result = 'denied', hash = :h WHERE id = :id",
               h=new_hash, id=e.id)
    assert await db.audit.verify() == (False, entries[1].id)


async def test_audit_verify_detects_a_deleted_middle_row(db: Database) -> None:
    entries = [await db.audit.append("admin", "a", f"o{i}", "ok") for i in range(4)]
    await _raw(db, "DELETE FROM audit_log WHERE id = :id", id=entries[1].id)
    assert await db.audit.verify() == (False, entries[2].id)
