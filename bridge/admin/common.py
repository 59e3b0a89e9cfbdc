"""What every admin action shares: input checks, the size guard, and audited calls.

Every action that reaches the homeserver is written to the audit log with actor,
object, action, result (`ok` or `error <errcode>`) and reason, whether it worked or not.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import TypeVar

from bridge.db import Database, Room
from bridge.errors import BridgeError, Conflict, InvalidParam, NotFound
from bridge.matrix.api import MatrixError
from bridge.matrix.rooms import Rooms
from bridge.types import EventID, RoomID, UserID

T = TypeVar("T")

MXID = re.compile(r"^@[^:\s]+:[A-Za-z0-9.\-]+(:\d+)?$")
EVENT_ID = re.compile(r"^\$[^\s]+$")
ROOM_ID = re.compile(r"^![^\s]+$")
MAX_REASON = 500


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


class HomeserverRefused(BridgeError):
    """Synapse answered the action with an error; its errcode is passed on."""

    status = 400
    errcode = "CB_HOMESERVER_REFUSED"

    def __init__(self, what: str, exc: MatrixError) -> None:
        super().__init__(f"homeserver refused the {what}: {exc.errcode}")
        if exc.status >= 500:
            self.status = 502
        self.matrix_errcode = exc.errcode


def user_id(value: str) -> UserID:
    if not MXID.match(value):
        raise InvalidParam("user_id must be a Matrix user ID like @name:server")
    return UserID(value)


def event_id(value: str) -> EventID:
    if not EVENT_ID.match(value):
        raise InvalidParam("event_id must be a Matrix event ID like $abc")
    return EventID(value)


def reason(value: str | None, required: bool = True) -> str | None:
    text = (value or "").strip()
    if not text:
        if required:
            raise InvalidParam("reason: required for this action (it goes to the audit log)")
        return None
    if len(text) > MAX_REASON:
        raise InvalidParam(f"reason: at most {MAX_REASON} characters")
    return text


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


async def audited(db: Database, actor: str, action: str, obj: str, why: str | None,
                  call: Callable[[], Awaitable[T]], what: str | None = None) -> T:
    """Run a homeserver call and audit its outcome either way."""
    try:
        result = await call()
    except MatrixError as exc:
        await db.audit.append(actor, action, obj, f"error {exc.errcode}", why)
        raise HomeserverRefused(what or action, exc) from None
    await db.audit.append(actor, action, obj, "ok", why)
    return result
