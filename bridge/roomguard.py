"""A room of this bridge that is still open, and the wrong-recipient guard on its size.

Shared by the admin verbs (bridge.admin) and invite links (bridge.invites): an action that
reaches many people names the room and its size and waits for confirmation first
(data-protection requirement 9).
"""

from __future__ import annotations

import re

from bridge.db import Database, Room
from bridge.errors import BridgeError, Conflict, NotFound
from bridge.matrix.rooms import Rooms
from bridge.types import RoomID

ROOM_ID = re.compile(r"^![^\s]+$")


class ConfirmRequired(BridgeError):
    """The action touches many people: the caller must repeat it with `confirm`.

    Carries the room's name and size so the question can name them (data-protection
    requirement 9: the wrong-recipient guard).
    """

    status = 409
    errcode = "CB_CONFIRM_REQUIRED"

    def __init__(self, room_name: str, members: int) -> None:
        super().__init__(f"Room '{room_name}' has {members} members; "
                         "repeat with confirm: true")
        self.room_name = room_name
        self.members = members


async def open_room(db: Database, room_id: str) -> Room:
    """A room of this bridge that is not closed."""
    room = await db.rooms.get(RoomID(room_id)) if ROOM_ID.match(room_id) else None
    if room is None:
        raise NotFound("not a room of this bridge")
    if room.closed_at is not None:
        raise Conflict("the room is closed")
    return room


async def member_count(rooms: Rooms, room_id: RoomID) -> int:
    """Joined and invited members (what a wrong-recipient mistake would expose)."""
    return sum(1 for m in await rooms.members(room_id) if m.membership in ("join", "invite"))


async def guard_size(rooms: Rooms, room: Room, confirm: bool, above: int) -> int:
    """Raise ConfirmRequired unless confirmed or the room has at most `above` members."""
    count = await member_count(rooms, room.room_id)
    if count > above and not confirm:
        raise ConfirmRequired(room.name, count)
    return count
