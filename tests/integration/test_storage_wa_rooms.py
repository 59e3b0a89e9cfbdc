"""WhatsApp room members' storage (revision 0014), on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.exc import IntegrityError

from bridge.db import Citizen, Database
from bridge.model import RoomSettings
from bridge.types import EventID, Pseudonym, RoomID, UserID
from tests.fixtures.wamids import sealed, wamid_hash

ROOM = RoomID("!vecinos:agency.example")
OTHER = RoomID("!fiestas:agency.example")


async def _citizen(db: Database, n: int = 1) -> Citizen:
    return await db.citizens.create(index_hash=f"{n:064x}", identifier_ct=f"ct{n}",
                                    pseudonym_code=f"C{n:03d}")


async def test_invitation_keeps_its_pseudonym_across_renewals(db: Database) -> None:
    citizen = await _citizen(db)
    first = await db.wa_rooms.invite(ROOM, citizen.id, "Ciudadano/a AAAA", "api:admin",
                                     "a" * 64)
    assert (first.state, first.ghost_user_id, first.chosen_at) == ("invited", None, None)
    # Invited again while invited: the same row and pseudonym, the newest text's hash
    # (the one its buttons name: bridge.rooms_wa.members).
    again = await db.wa_rooms.invite(ROOM, citizen.id, "Ciudadano/a BBBB", "@ana:x", "b" * 64)
    assert (again.id, again.display_name, again.notice_hash) == (first.id, "Ciudadano/a AAAA",
                                                                 "b" * 64)
    assert await db.wa_rooms.set_state(first.id, "declined", only_from=("invited",))
    renewed = await db.wa_rooms.invite(ROOM, citizen.id, "Ciudadano/a CCCC", "@ana:x",
                                       "c" * 64)
    assert (renewed.id, renewed.state, renewed.display_name, renewed.notice_hash) == (
        first.id, "invited", "Ciudadano/a AAAA", "c" * 64)
    # A guarded change does nothing from the wrong state.
    assert not await db.wa_rooms.set_state(first.id, "left", only_from=("joined",))


async def test_memberships_by_room_citizen_and_ghost(db: Database) -> None:
    one, two = await _citizen(db, 1), await _citizen(db, 2)
    a = await db.wa_rooms.invite(ROOM, one.id, "P1", "api:admin", "0" * 64)
    b = await db.wa_rooms.invite(ROOM, two.id, "P2", "api:admin", "0" * 64)
    c = await db.wa_rooms.invite(OTHER, one.id, "P3", "api:admin", "0" * 64)
    for member in (a, b, c):
        await db.wa_rooms.set_state(member.id, "joined")
    await db.wa_rooms.set_ghost(a.id, UserID("@cb_a:x"))
    assert [m.id for m in await db.wa_rooms.in_room(ROOM)] == [a.id, b.id]
    assert [m.id for m in await db.wa_rooms.of_citizen(one.id)] == [a.id, c.id]
    assert await db.wa_rooms.count_joined(ROOM) == 2
    found = await db.wa_rooms.by_ghost(UserID("@cb_a:x"))
    assert found is not None and found.id == a.id
    assert await db.wa_rooms.is_joined(OTHER, one.id)
    at = datetime(2026, 12, 1, 12, tzinfo=UTC)
    await db.wa_rooms.choose(c.id, at)
    chosen = await db.wa_rooms.get(c.id)
    assert chosen is not None and chosen.chosen_at == at
    with pytest.raises(IntegrityError):  # one ghost stands for one membership
        await db.wa_rooms.set_ghost(b.id, UserID("@cb_a:x"))


async def test_settings_upsert(db: Database) -> None:
    assert await db.wa_rooms.settings(ROOM) is None
    await db.wa_rooms.save_settings(RoomSettings(ROOM, True, False))
    await db.wa_rooms.save_settings(RoomSettings(ROOM, False, True))
    assert await db.wa_rooms.settings(ROOM) == RoomSettings(ROOM, False, True)


async def test_backlog_in_order_once_and_forgotten(db: Database) -> None:
    citizen = await _citizen(db)
    assert await db.wa_rooms.keep(citizen.id, ROOM, "wr:$e1:1", "sealed1")
    assert not await db.wa_rooms.keep(citizen.id, ROOM, "wr:$e1:1", "again")
    await db.wa_rooms.keep(citizen.id, ROOM, "wr:$e1:1#1", "sealed1b")
    await db.wa_rooms.keep(citizen.id, OTHER, "wr:$e_2:1", "sealed2")
    await db.wa_rooms.keep(citizen.id, ROOM, "wr:$e3:1", "sealed3")
    assert [e.payload for e in await db.wa_rooms.backlog(citizen.id)] == [
        "sealed1", "sealed1b", "sealed2", "sealed3"]
    # A redaction drops every part; LIKE wildcards in the id are literal.
    assert await db.wa_rooms.forget_event("wr:$e1:") == 2
    assert await db.wa_rooms.forget_event("wr:$e%") == 0
    assert await db.wa_rooms.forget_room(citizen.id, OTHER) == 1
    rest = await db.wa_rooms.backlog(citizen.id)
    assert [e.event_key for e in rest] == ["wr:$e3:1"]
    await db.wa_rooms.forget([e.id for e in rest])
    assert await db.wa_rooms.backlog(citizen.id) == []


async def test_message_map_per_member_and_cancel_unsent(db: Database) -> None:
    one, two = await _citizen(db, 1), await _citizen(db, 2)
    event = EventID("$ev")
    await db.wa_rooms.link(sealed("wamid.1"), one.id, ROOM, event)
    await db.wa_rooms.link(sealed("wamid.2"), two.id, ROOM, event)
    await db.wa_rooms.link(sealed("wamid.1"), two.id, OTHER, EventID("$x"))  # first wins
    assert await db.wa_rooms.by_wamid(wamid_hash("wamid.1")) == (ROOM, event, one.id)
    # Found by the keyed hash; what goes back to Graph is the ciphertext, never a wamid.
    assert await db.wa_rooms.wamid_for("$ev", two.id) == sealed("wamid.2")
    assert await db.wa_rooms.wamid_for("$ev", 999) is None
    assert await db.wa_rooms.by_wamid(wamid_hash("wamid.3")) is None
    await db.outbox.add("wr:$ev:1", one.id, RoomID(""), "p1")
    await db.outbox.add("wr:$ev:2", two.id, RoomID(""), "p2")
    await db.outbox.add("wr:$evil:1", one.id, RoomID(""), "p3")
    assert await db.wa_rooms.cancel_unsent("wr:$ev:") == 2
    kept = await db.outbox.by_key("wr:$evil:1")
    assert kept is not None and kept.status == "pending"


async def test_room_consent_purpose_and_erasure_cascade(db: Database) -> None:
    citizen = await _citizen(db)
    record = await db.consent.append(
        citizen_id=citizen.id, pseudonym=Pseudonym("C001"),
        purpose=f"room:{ROOM}",  # type: ignore[arg-type]
        state="granted", notice_version="rooms-1", notice_hash="f" * 64, channel="whatsapp",
        language="es", evidence="wamid-hmac:" + wamid_hash("wamid.X"))
    assert record.purpose == f"room:{ROOM}"
    with pytest.raises(IntegrityError):
        await db.consent.append(
            citizen_id=citizen.id, pseudonym=Pseudonym("C001"),
            purpose="chat",  # type: ignore[arg-type]
            state="granted", notice_version="1", notice_hash="f" * 64, channel="whatsapp")
    # A room ghost is of kind "room" and is never taken for the portal ghost.
    await db.ghosts.create(user_id=UserID("@cb_room:x"), device_id="CBROOM",
                           display_name="P", kind="room", citizen_id=citizen.id)
    assert await db.ghosts.by_citizen(citizen.id) is None
    member = await db.wa_rooms.invite(ROOM, citizen.id, "P", "api:admin", "0" * 64)
    await db.wa_rooms.keep(citizen.id, ROOM, "wr:$e:1", "s")
    await db.wa_rooms.link(sealed("wamid.9"), citizen.id, ROOM, EventID("$e"))
    assert await db.citizens.delete(citizen.id)
    assert await db.wa_rooms.get(member.id) is None
    assert await db.wa_rooms.by_wamid(wamid_hash("wamid.9")) is None
    assert await db.wa_rooms.backlog(citizen.id) == []


async def test_backlog_retention(db: Database) -> None:
    citizen = await _citizen(db)
    await db.wa_rooms.keep(citizen.id, ROOM, "wr:$old:1", "s")
    later = datetime.now(UTC) + timedelta(seconds=5)
    assert await db.wa_rooms.purge_backlog(later - timedelta(days=1)) == 0
    assert await db.wa_rooms.purge_backlog(later) == 1
    assert await db.wa_rooms.backlog(citizen.id) == []
    # A dry run counts what a purge would delete, and deletes nothing.
    await db.wa_rooms.keep(citizen.id, ROOM, "wr:$old2:1", "s")
    assert await db.wa_rooms.purge_backlog(later, dry_run=True) == 1
    assert len(await db.wa_rooms.backlog(citizen.id)) == 1


async def test_room_message_map_retention(db: Database) -> None:
    citizen = await _citizen(db)
    await db.wa_rooms.link(sealed("wamid.old"), citizen.id, ROOM, EventID("$old"))
    later = datetime.now(UTC) + timedelta(seconds=5)
    assert await db.wa_rooms.purge_messages(later - timedelta(days=1)) == 0
    assert await db.wa_rooms.purge_messages(later, dry_run=True) == 1
    assert await db.wa_rooms.by_wamid(wamid_hash("wamid.old")) is not None
    assert await db.wa_rooms.purge_messages(later) == 1
    assert await db.wa_rooms.by_wamid(wamid_hash("wamid.old")) is None


async def test_erase_citizen_takes_memberships_backlog_and_pairs(db: Database) -> None:
    one, two = await _citizen(db, 1), await _citizen(db, 2)
    a = await db.wa_rooms.invite(ROOM, one.id, "P1", "api:admin", "0" * 64)
    await db.wa_rooms.invite(OTHER, one.id, "P2", "api:admin", "0" * 64)
    b = await db.wa_rooms.invite(ROOM, two.id, "P3", "api:admin", "0" * 64)
    await db.wa_rooms.keep(one.id, ROOM, "wr:$e:1", "s1")
    await db.wa_rooms.keep(two.id, ROOM, "wr:$e:2", "s2")
    await db.wa_rooms.link(sealed("wamid.a"), one.id, ROOM, EventID("$e"))
    await db.wa_rooms.link(sealed("wamid.b"), two.id, ROOM, EventID("$e"))
    assert [m.id for m in await db.wa_rooms.of_citizen_all(one.id)] != []
    assert await db.wa_rooms.erase_citizen(one.id) == 2
    assert await db.wa_rooms.of_citizen_all(one.id) == []
    assert await db.wa_rooms.get(a.id) is None
    assert await db.wa_rooms.backlog(one.id) == []
    assert await db.wa_rooms.by_wamid(wamid_hash("wamid.a")) is None
    # Nobody else's.
    assert await db.wa_rooms.get(b.id) is not None
    assert len(await db.wa_rooms.backlog(two.id)) == 1
    assert await db.wa_rooms.by_wamid(wamid_hash("wamid.b")) is not None
