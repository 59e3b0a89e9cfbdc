"""Creating and inspecting agency rooms as the bridge bot (the I/O); what each kind of
room looks like is `bridge.matrix.room_policy`.
"""

from __future__ import annotations

import logging

from bridge.matrix.api import MatrixAPI
from bridge.matrix.room_policy import (
    Member,
    RoomPolicy,
    members_from_state,
    room_create_body,
    with_power,
)
from bridge.types import RoomID, UserID

log = logging.getLogger(__name__)


class Rooms:
    """Creates and inspects rooms as the bridge bot."""

    def __init__(self, api: MatrixAPI, bot: UserID, policy: RoomPolicy) -> None:
        self._api = api
        self._bot = bot
        self.policy = policy

    async def create(self, kind: str, name: str, topic: str | None = None,
                     invite: list[str] | None = None, knock: bool = False,
                     alias_localpart: str | None = None) -> RoomID:
        """`alias_localpart` (in the bridge's alias namespace) names the room while its
        creation is not yet recorded, so that a retry can find it (bridge.whatsapp.portal)."""
        invitees = [u for u in (invite or []) if u != self._bot]
        body = room_create_body(kind, name, topic, self.policy, invitees, knock)
        if alias_localpart is not None:
            body["room_alias_name"] = alias_localpart
        room_id = await self._api.create_room(self._bot, body)
        log.info("created %s room %s", kind, room_id)
        return room_id

    async def members(self, room_id: RoomID) -> list[Member]:
        """Joined, invited and knocking members with their effective power."""
        return members_from_state(await self._api.get_state(self._bot, room_id))

    async def set_power(self, room_id: RoomID, user_id: str, level: int | None) -> None:
        levels = await self._api.get_state_event(self._bot, room_id, "m.room.power_levels")
        await self._api.send_state(self._bot, room_id, "m.room.power_levels",
                                   with_power(levels, user_id, level))
