"""Admin actions on rooms and membership: the logic behind /admin/v1 and the management room.

Moderation (kick, ban, mute, redact, knocks, close, announce) is in
`bridge.admin.moderation`; both audit every action (see `bridge.admin.common`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, cast

from bridge.admin.common import audited, guard_size, open_room, user_id
from bridge.config import Config
from bridge.db import Database, RoomKind
from bridge.errors import InvalidParam, NotFound
from bridge.matrix.api import MatrixAPI
from bridge.matrix.ghosts import Ghosts
from bridge.matrix.room_policy import ADMIN, CREATOR, KINDS, MODERATOR
from bridge.matrix.rooms import Rooms
from bridge.types import RoomID, UserID

log = logging.getLogger(__name__)
ADMIN_KINDS = tuple(k for k in KINDS if k not in ("portal", "management"))
JOIN_RULES = ("invite", "knock")


@dataclass(frozen=True)
class RoomInfo:
    room_id: str
    kind: str
    name: str
    topic: str | None


def role(power: int) -> str:
    """A member's role in words, from their power level."""
    if power >= CREATOR:
        return "bot"
    if power >= ADMIN:
        return "admin"
    if power >= MODERATOR:
        return "moderator"
    return "muted" if power < 0 else "member"


class AdminService:
    """Creates and lists rooms, lists members, invites staff."""

    def __init__(self, config: Config, db: Database, api: MatrixAPI, rooms: Rooms,
                 ghosts: Ghosts) -> None:
        self._config = config
        self._db = db
        self._api = api
        self._rooms = rooms
        self._ghosts = ghosts

    async def create_room(self, actor: str, name: str, kind: str,
                          topic: str | None = None, join_rule: str = "invite") -> RoomID:
        if kind not in ADMIN_KINDS:
            raise InvalidParam(f"kind must be one of {', '.join(ADMIN_KINDS)} "
                               "(portals are created by the WhatsApp opt-in)")
        if not name.strip() or len(name) > 200:
            raise InvalidParam("name must be 1-200 characters")
        if join_rule not in JOIN_RULES:
            raise InvalidParam(f"join_rule must be one of {', '.join(JOIN_RULES)}")
        room_id = await self._rooms.create(kind, name, topic,
                                           invite=list(self._config.admin.users),
                                           knock=join_rule == "knock")
        await self._db.rooms.create(room_id, cast(RoomKind, kind), name, UserID(actor),
                                    topic=topic)
        await self._db.audit.append(actor, "room.create", room_id, "ok", None)
        return room_id

    async def list_rooms(self) -> list[RoomInfo]:
        return [RoomInfo(r.room_id, r.kind, r.name, r.topic) for r in await self._db.rooms.list()
                if r.kind != "management"]

    async def members(self, room_id: str) -> list[dict[str, Any]]:
        """Pseudonyms and roles only: no contact data of anyone."""
        room = await self._db.rooms.get(RoomID(room_id))
        if room is None:
            raise NotFound("not a room of this bridge")
        members = await self._rooms.members(room.room_id)
        citizens = {a.user_id for a in await self._db.invites.accounts(
            [m.user_id for m in members])}
        out = []
        for m in members:
            ghost = await self._db.ghosts.get(UserID(m.user_id))
            kind = ghost.kind if ghost else "citizen" if m.user_id in citizens else "staff"
            out.append({"user_id": m.user_id, "display_name": m.display_name, "kind": kind,
                        "membership": m.membership, "power": m.power, "role": role(m.power)})
        return out

    async def invite(self, actor: str, room_id: str, target: str,
                     reason: str | None = None, confirm: bool = False) -> None:
        room = await open_room(self._db, room_id)
        uid = user_id(target)
        if self._ghosts.is_ours(uid):
            raise InvalidParam("ghosts are only placed in rooms by the bridge itself")
        await guard_size(self._rooms, room, confirm, self._config.rooms.confirm_above)
        await audited(self._db, actor, "room.invite", f"{room.room_id} {uid}", reason,
                      lambda: self._api.invite(self._ghosts.bot, room.room_id, uid, reason),
                      "invite")
