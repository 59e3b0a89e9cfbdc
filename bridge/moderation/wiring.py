"""Builds the moderation side (reports, flags, watched display names) for the admin
wiring, registering its relay handlers."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp

from bridge.admin.moderation import Moderation
from bridge.config import Config
from bridge.db import Database
from bridge.matrix.api import MatrixAPI
from bridge.matrix.ghosts import Ghosts
from bridge.matrix.relay import Relay
from bridge.matrix.rooms import Rooms
from bridge.metrics import Metrics
from bridge.moderation.displaynames import DisplayNameWatch
from bridge.moderation.intake import Flagger, ReportPoller, WhatsAppReports
from bridge.moderation.notify import ManagementRooms, Reporters
from bridge.moderation.reports import Reports
from bridge.moderation.synapse_admin import SynapseAdmin
from bridge.privacy import Privacy
from bridge.types import RoomID
from bridge.whatsapp.outbox import Outbox


@dataclass(frozen=True)
class ModerationParts:
    reports: Reports
    poller: ReportPoller | None  # None without moderation.synapse_admin_token
    whatsapp: WhatsAppReports | None  # None without WhatsApp
    flagger: Flagger


def build_moderation(config: Config, db: Database, http: aiohttp.ClientSession,
                     api: MatrixAPI, rooms: Rooms, ghosts: Ghosts, relay: Relay,
                     privacy: Privacy, moderation: Moderation, outbox: Outbox | None,
                     metrics: Metrics) -> ModerationParts:
    bot = ghosts.bot

    async def notice(room_id: RoomID, text: str) -> None:
        await relay.send_as(bot, room_id, {"msgtype": "m.notice", "body": text})

    token = config.moderation.synapse_admin_token
    admin = SynapseAdmin(http, config.homeserver.url, token) if token else None
    management = ManagementRooms(db, notice, metrics)
    reporters = Reporters(db, outbox, admin, metrics)
    reports = Reports(db, api, rooms, bot, privacy.cipher, moderation, management, reporters,
                      metrics)
    flagger = Flagger(config, db, reports, bot, metrics)
    relay.add_handler(flagger)
    relay.add_member_handler(DisplayNameWatch(config, db, api, ghosts, admin, management,
                                              reporters, metrics))
    poller = ReportPoller(db, admin, reports, config.moderation.reports_poll_seconds,
                          metrics) if admin else None
    whatsapp = WhatsAppReports(db, privacy, outbox, reports) if outbox else None
    return ModerationParts(reports, poller, whatsapp, flagger)
