"""Portal rooms: one private E2EE room per opted-in WhatsApp citizen.

The citizen appears as their ghost (pseudonym, own device); `portals.staff` are invited
when the portal is created. History is visible from invitation so staff who join late
can still read the first messages (the ghost's device shares keys with invited devices).
"""

from __future__ import annotations

import logging

from bridge.config import Config
from bridge.db import Citizen, Database
from bridge.matrix.api import MatrixAPI, MatrixError
from bridge.matrix.ghosts import Ghosts
from bridge.matrix.relay import Relay
from bridge.matrix.rooms import Rooms
from bridge.types import EventID, RoomID, UserID

log = logging.getLogger(__name__)


OPTED_OUT_NOTICE = ("La persona ha retirado su consentimiento: el puente ya no reenvía "
                    "mensajes en ninguna dirección.")


class Portals:
    def __init__(self, config: Config, db: Database, api: MatrixAPI, ghosts: Ghosts,
                 rooms: Rooms, relay: Relay) -> None:
        self._config = config
        self._db = db
        self._api = api
        self._ghosts = ghosts
        self._rooms = rooms
        self._relay = relay

    async def ghost_for(self, citizen: Citizen) -> UserID:
        if citizen.ghost_user_id:
            ghost = citizen.ghost_user_id
        else:
            existing = await self._db.ghosts.by_citizen(citizen.id)
            ghost = UserID(existing.user_id) if existing else await self._ghosts.create(
                "citizen", citizen.id)
            await self._db.citizens.set_ghost(citizen.id, ghost)
        # A retry after the homeserver was down mid-creation finishes the registration
        # here rather than only at the next restart.
        await self._ghosts.ensure_registered(ghost)
        return ghost

    async def open(self, citizen: Citizen) -> RoomID:
        """The citizen's portal with their ghost joined (idempotent)."""
        ghost = await self.ghost_for(citizen)
        room = await self._db.rooms.portal_for(citizen.id)
        if room is None or room.closed_at is not None:
            ghost_row = await self._db.ghosts.get(ghost)
            name = f"WhatsApp · {ghost_row.display_name if ghost_row else 'Ciudadano/a'}"
            room_id = await self._rooms.create(
                "portal", name, topic="Conversación de WhatsApp (cifrada, con seudónimo)",
                invite=[*self._config.portals.staff, ghost])
            await self._db.rooms.create(room_id, "portal", name, self._ghosts.bot,
                                        citizen_id=citizen.id)
            log.info("portal %s opened", room_id)
        else:
            room_id = RoomID(room.room_id)
            await self._invite_quietly(room_id, ghost)
        await self._api.join(ghost, room_id)
        return room_id

    async def _invite_quietly(self, room_id: RoomID, user_id: str) -> None:
        try:
            await self._api.invite(self._ghosts.bot, room_id, user_id)
        except MatrixError as exc:
            if exc.status != 403:  # 403: already a member
                raise

    async def room_of(self, citizen: Citizen) -> RoomID | None:
        room = await self._db.rooms.portal_for(citizen.id)
        return RoomID(room.room_id) if room and room.closed_at is None else None

    async def close(self, citizen: Citizen, notice: str = OPTED_OUT_NOTICE) -> None:
        """Opt-out or erasure: staff are told, the ghost leaves (no-op if it already left)."""
        room_id = await self.room_of(citizen)
        if room_id is None or citizen.ghost_user_id is None:
            return
        await self.notice(room_id, notice)
        try:
            await self._api.leave(citizen.ghost_user_id, room_id)
        except MatrixError as exc:
            log.warning("ghost leave failed: %s", exc.errcode)

    async def read_receipt(self, ghost: UserID, room_id: RoomID, event_id: EventID) -> None:
        """The citizen read a staff message on WhatsApp: their ghost marks it read."""
        await self._api.receipt(ghost, room_id, event_id)

    async def notice(self, room_id: RoomID, text: str) -> EventID:
        """A bridge notice to staff in the room (encrypted by the bot's device)."""
        return await self._relay.send_as(self._ghosts.bot, room_id,
                                         {"msgtype": "m.notice", "body": text})
