"""Admin actions: the logic behind /admin/v1 (and, later, the management room).

Every action is written to the audit log with actor, object, action, result and reason.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, cast

from bridge.config import Config
from bridge.db import Database, RoomKind
from bridge.errors import InvalidParam, NotFound
from bridge.matrix.api import MatrixAPI, MatrixError
from bridge.matrix.ghosts import Ghosts
from bridge.matrix.rooms import KINDS, Rooms
from bridge.types import RoomID, UserID

log = logging.getLogger(__name__)
MXID = re.compile(r"^@[^:\s]+:[A-Za-z0-9.\-]+(:\d+)?$")
ADMIN_KINDS = tuple(k for k in KINDS if k not in ("portal", "management"))


@dataclass(frozen=True)
class RoomInfo:
    room_id: str
    kind: str
    name: str
    topic: str | None


class AdminService:
    def __init__(self, config: Config, db: Database, api: MatrixAPI, rooms: Rooms,
                 ghosts: Ghosts) -> None:
        self._config = config
        self._db = db
        self._api = api
        self._rooms = rooms
        self._ghosts = ghosts

    async def create_room(self, actor: str, name: str, kind: str,
                          topic: str | None = None) -> RoomID:
        if kind not in ADMIN_KINDS:
            raise InvalidParam(f"kind must be one of {', '.join(ADMIN_KINDS)} "
                               "(portals are created by the WhatsApp opt-in)")
        if not name.strip() or len(name) > 200:
            raise InvalidParam("name must be 1-200 characters")
        room_id = await self._rooms.create(kind, name, topic,
                                           invite=list(self._config.admin.users))
        await self._db.rooms.create(room_id, cast(RoomKind, kind), name, UserID(actor),
                                    topic=topic)
        await self._db.audit.append(actor, "room.create", room_id, "ok", None)
        return room_id

    async def list_rooms(self) -> list[RoomInfo]:
        return [RoomInfo(r.room_id, r.kind, r.name, r.topic) for r in await self._db.rooms.list()]

    async def _room(self, room_id: str) -> RoomID:
        if await self._db.rooms.get(RoomID(room_id)) is None:
            raise NotFound("not a room of this bridge")
        return RoomID(room_id)

    async def members(self, room_id: str) -> list[dict[str, Any]]:
        """Pseudonyms and roles only: no contact data of anyone."""
        rid = await self._room(room_id)
        out = []
        for m in await self._rooms.members(rid):
            ghost = await self._db.ghosts.get(UserID(m.user_id))
            kind = ghost.kind if ghost else "staff"
            out.append({"user_id": m.user_id, "display_name": m.display_name, "kind": kind,
                        "membership": m.membership, "power": m.power})
        return out

    async def invite(self, actor: str, room_id: str, user_id: str,
                     reason: str | None = None) -> None:
        rid = await self._room(room_id)
        if not MXID.match(user_id):
            raise InvalidParam("user_id must be a Matrix user ID like @name:server")
        if self._ghosts.is_ours(user_id):
            raise InvalidParam("ghosts are only placed in rooms by the bridge itself")
        try:
            await self._api.invite(self._ghosts.bot, rid, user_id, reason)
        except MatrixError as exc:
            await self._db.audit.append(actor, "room.invite", f"{rid} {user_id}",
                                        f"error {exc.errcode}", reason)
            raise InvalidParam(f"homeserver refused the invite: {exc.errcode}") from None
        await self._db.audit.append(actor, "room.invite", f"{rid} {user_id}", "ok", reason)
