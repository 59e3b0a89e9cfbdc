"""Builds the admin side (API services, invite links, management room) for the composition
root, so `bridge.services` only has to call `build_admin` and keep what it returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp

from bridge.admin.commands import ManagementRoom
from bridge.admin.moderation import Moderation
from bridge.admin.service import AdminService
from bridge.config import Config
from bridge.db import Database
from bridge.invites.accounts import SynapseRegistrar
from bridge.invites.service import InviteLinks
from bridge.matrix.api import MatrixAPI
from bridge.matrix.ghosts import Ghosts
from bridge.matrix.relay import Relay
from bridge.matrix.rooms import Rooms
from bridge.metrics import Metrics
from bridge.moderation.wiring import ModerationParts, build_moderation
from bridge.privacy import Privacy
from bridge.rooms_wa.members import Members
from bridge.types import EventID, RoomID
from bridge.whatsapp.outbox import Outbox


@dataclass(frozen=True)
class AdminParts:
    admin: AdminService
    moderation: Moderation
    invites: InviteLinks
    management: ManagementRoom
    safety: ModerationParts


def build_admin(config: Config, db: Database, http: aiohttp.ClientSession, api: MatrixAPI,
                rooms: Rooms, ghosts: Ghosts, relay: Relay, privacy: Privacy,
                outbox: Outbox | None = None, metrics: Metrics | None = None,
                wa_members: Members | None = None) -> AdminParts:
    """Wire the admin services; the management room is registered as a relay handler."""
    bot = ghosts.bot

    async def send(room_id: RoomID, content: dict[str, Any]) -> EventID:
        return await relay.send_as(bot, room_id, content)

    async def reply(room_id: RoomID, text: str) -> None:
        await relay.send_as(bot, room_id, {"msgtype": "m.notice", "body": text})

    secret = config.invites.registration_shared_secret
    registrar = SynapseRegistrar(http, config.homeserver.url, secret) if secret else None
    admin = AdminService(config, db, api, rooms, ghosts)
    moderation = Moderation(config, db, api, rooms, bot, send, ghosts.room_changed)
    invites = InviteLinks(config, db, api, rooms, bot, privacy, registrar)
    safety = build_moderation(config, db, http, api, rooms, ghosts, relay, privacy, moderation,
                              outbox, metrics or Metrics())
    management = ManagementRoom(config, db, admin, moderation, invites, reply,
                                reports=safety.reports, wa_members=wa_members)
    relay.add_handler(management)
    return AdminParts(admin, moderation, invites, management, safety)
