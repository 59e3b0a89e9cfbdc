"""Who may bring the bridge bot into a room.

The bot decrypts and reads every room it is in, and each encrypted event there costs it
work: an account anyone can get (a citizen's, from an invite link) must not be able to
pull it into rooms of their own. It accepts invites from the people the agency listed
(`admin.users`, `portals.staff`: admins DM it for the management room) and into rooms
the bridge manages; it declines (leaves) every other invite and counts it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

from prometheus_client import Counter

from bridge.types import RoomID

log = logging.getLogger(__name__)


class BotInvitePolicy:
    """Decides on an invite of the bot; `managed(room_id)` says if the bridge owns it."""

    def __init__(self, trusted: Iterable[str], managed: Callable[[RoomID], Awaitable[bool]],
                 declined: Counter | None = None) -> None:
        self._trusted = frozenset(trusted)
        self._managed = managed
        self._declined = declined

    async def accepts(self, inviter: str, room_id: RoomID) -> bool:
        if inviter in self._trusted or await self._managed(room_id):
            return True
        # Neither the inviter nor the room is logged: a room id says nothing here, and
        # the inviter may be a citizen.
        log.info("declined an invite of the bot from someone not in admin.users or "
                 "portals.staff")
        if self._declined is not None:
            self._declined.inc()
        return False
