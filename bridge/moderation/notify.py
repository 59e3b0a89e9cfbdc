"""Where moderation speaks: the management rooms, and the people who reported.

Management rooms are the DMs admins opened with the bot (bridge.admin.commands). They are
not agency rooms, so the bridge learns them when an admin runs a command there and keeps
them in the key-value table; a new admin sends `help` once. Every notice goes to each
of them, encrypted by the bot's device.

Reporters hear back in their own language:
- WhatsApp citizens by a WhatsApp message (the outbox: persisted, retried);
- Matrix users by a *server notice* (Synapse's admin API, `server_notices` configured in
  homeserver.yaml). A DM from the bot would create a room for each reporter, and a notice
  in the room where they reported would tell everyone there who reported; a server
  notice reaches only them, in a room the homeserver manages. Without `server_notices`
  (or without `moderation.synapse_admin_token`) they are not told, the management room's
  notice says so and `civic_bridge_moderation_undelivered{what="reporter"}` counts it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from bridge.db import Database
from bridge.matrix.api import MatrixError
from bridge.metrics import Metrics
from bridge.moderation.synapse_admin import SynapseAdmin
from bridge.types import Pseudonym, RoomID, UserID
from bridge.whatsapp.outbox import Outbox

log = logging.getLogger(__name__)
KEY_PREFIX = "management_room:"
# bot sends an m.notice into a room
SendNotice = Callable[[RoomID, str], Awaitable[None]]


class ManagementRooms:
    """The admins' DMs with the bot, and posting to all of them."""

    def __init__(self, db: Database, send: SendNotice, metrics: Metrics) -> None:
        self._db = db
        self._send = send
        self._metrics = metrics

    async def remember(self, room_id: RoomID, admin: UserID) -> None:
        key = KEY_PREFIX + room_id
        if await self._db.kv.get(key) is None:
            await self._db.kv.set(key, admin)

    async def rooms(self) -> list[RoomID]:
        return [RoomID(k[len(KEY_PREFIX):]) for k, _ in await self._db.kv.with_prefix(KEY_PREFIX)]

    async def post(self, text: str) -> int:
        """Post to every management room; returns in how many it arrived."""
        delivered = 0
        for room_id in await self.rooms():
            try:
                await self._send(room_id, text)
                delivered += 1
            except (MatrixError, RuntimeError, LookupError) as exc:
                log.warning("management room %s: notice not delivered (%s)", room_id,
                            type(exc).__name__)
        if not delivered:
            self._metrics.moderation_undelivered.labels("management").inc()
            log.warning("moderation notice not delivered: no management room answered; an "
                        "admin must send `help` to the bot once")
        return delivered


class Reporters:
    """Tells a reporter about their report, over the channel they reported from."""

    def __init__(self, db: Database, outbox: Outbox | None, admin: SynapseAdmin | None,
                 metrics: Metrics) -> None:
        self._db = db
        self._outbox = outbox
        self._admin = admin
        self._metrics = metrics

    async def language(self, user_id: UserID) -> str:
        """An invite-link citizen's language from their membership consent, else Spanish."""
        for record in await self._db.consent.for_pseudonym(Pseudonym(user_id)):
            if record.language:
                return record.language
        return "es"

    async def tell(self, source: str, reporter: UserID, key: str, text: str) -> bool:
        """Send `text`; False (counted) if the reporter cannot be reached. `key` makes a
        WhatsApp answer idempotent (the outbox sends each key once)."""
        told = await (self._whatsapp(reporter, key, text) if source == "whatsapp"
                      else self._matrix(reporter, text))
        if not told:
            self._metrics.moderation_undelivered.labels("reporter").inc()
        return told

    async def _whatsapp(self, ghost: UserID, key: str, text: str) -> bool:
        citizen = await self._db.citizens.by_ghost(ghost)
        if citizen is None or self._outbox is None:
            return False
        await self._outbox.system_text(citizen, key, text)
        return True

    async def _matrix(self, user_id: UserID, text: str) -> bool:
        if self._admin is None:
            return False
        try:
            await self._admin.server_notice(user_id, text)
        except MatrixError as exc:
            log.warning("server notice to a reporter refused (%s); is server_notices "
                        "configured in homeserver.yaml?", exc.errcode)
            return False
        return True
