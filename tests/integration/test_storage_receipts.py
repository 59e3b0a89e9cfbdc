"""The message-map query behind staff read receipts, on SQLite and PostgreSQL."""

from __future__ import annotations

from bridge.db import Database
from bridge.types import EventID, RoomID
from tests.fixtures.wamids import sealed, wamid_hash

ROOM = RoomID("!portal:agency.example")
OTHER = RoomID("!other:agency.example")


async def test_latest_inbound_up_to_an_event(db: Database) -> None:
    assert await db.messages.latest_inbound(ROOM) is None
    await db.messages.link(sealed("in1"), ROOM, EventID("$in1"), "in")
    await db.messages.link(sealed("out1"), ROOM, EventID("$out1"), "out")
    await db.messages.link(sealed("in2"), ROOM, EventID("$in2"), "in")
    await db.messages.link(sealed("out2"), ROOM, EventID("$out2"), "out")
    await db.messages.link(sealed("elsewhere"), OTHER, EventID("$x"), "in")

    newest = await db.messages.latest_inbound(ROOM)
    assert newest is not None and newest.wamid_hash == wamid_hash("in2")
    # A receipt on staff's first answer covers only the citizen's first message.
    up_to_out1 = await db.messages.latest_inbound(ROOM, EventID("$out1"))
    assert up_to_out1 is not None and up_to_out1.wamid_hash == wamid_hash("in1")
    up_to_in1 = await db.messages.latest_inbound(ROOM, EventID("$in1"))
    assert up_to_in1 is not None and up_to_in1.id == up_to_out1.id
    # An event the map does not know (a notice) or of another room: the newest.
    unknown = await db.messages.latest_inbound(ROOM, EventID("$notice"))
    assert unknown is not None and unknown.wamid_hash == wamid_hash("in2")
    foreign = await db.messages.latest_inbound(ROOM, EventID("$x"))
    assert foreign is not None and foreign.wamid_hash == wamid_hash("in2")
    elsewhere = await db.messages.latest_inbound(OTHER)
    assert elsewhere is not None and elsewhere.wamid_hash == wamid_hash("elsewhere")
