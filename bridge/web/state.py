"""What the HTTP edge reads from the process: narrow views, one `AppKey` each.

The edge never imports the composition root (tests/unit/test_layers.py): each handler
module declares here the little it calls, and bridge.app puts the objects in (the one
Bridge satisfies every view). Keys are read with `request.config_dict`, so a sub-app
(`/admin/v1`) sees what its parent holds. One key lives with its routes instead: the
webhook's (bridge.web.whatsapp), which the ingest process serves without this module.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from aiohttp import web

from bridge.admin.citizens import CitizenData
from bridge.admin.moderation import Moderation
from bridge.admin.notices import Notices
from bridge.admin.reidentify import Reidentification
from bridge.admin.service import AdminService
from bridge.config import Config
from bridge.db import Database
from bridge.deadletters import DeadLetters
from bridge.ingest import Ingest
from bridge.invites.service import InviteLinks
from bridge.leader import Role
from bridge.matrix.api import MatrixAPI
from bridge.matrix.trust import Trust
from bridge.metrics import Metrics
from bridge.moderation.wiring import ModerationParts
from bridge.rooms_wa.wiring import WhatsAppRooms
from bridge.whatsapp.staff_templates import StaffTemplates


class E2EETransport(Protocol):
    """How the bridge's devices get to-device events (bridge.matrix.crypto_feed)."""

    def warning(self) -> str | None: ...


class Process(Protocol):
    """The process as probes and the standby guard see it (bridge.lifecycle)."""

    @property
    def role(self) -> Role: ...
    @property
    def ready(self) -> asyncio.Event: ...
    @property
    def lost(self) -> asyncio.Event: ...
    @property
    def config(self) -> Config: ...
    @property
    def db(self) -> Database: ...
    @property
    def api(self) -> MatrixAPI: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def crypto(self) -> E2EETransport: ...


class Pages(Protocol):
    """What the public invite pages call."""

    @property
    def config(self) -> Config: ...
    @property
    def invites(self) -> InviteLinks: ...
    @property
    def wa_rooms(self) -> WhatsAppRooms | None: ...


class AdminParts(Protocol):
    """What the admin API's handlers call (the verbs' `Services` among them)."""

    @property
    def config(self) -> Config: ...
    @property
    def db(self) -> Database: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def admin(self) -> AdminService: ...
    @property
    def moderation(self) -> Moderation: ...
    @property
    def invites(self) -> InviteLinks: ...
    @property
    def citizens(self) -> CitizenData: ...
    @property
    def notices(self) -> Notices: ...
    @property
    def trust(self) -> Trust: ...
    @property
    def dead_letters(self) -> DeadLetters: ...
    @property
    def templates(self) -> StaffTemplates | None: ...
    @property
    def safety(self) -> ModerationParts | None: ...
    @property
    def reidentify(self) -> Reidentification | None: ...
    @property
    def wa_rooms(self) -> WhatsAppRooms | None: ...


PROCESS = web.AppKey[Process]("civic_bridge_process")
INGEST = web.AppKey("civic_bridge_ingest", Ingest)
PAGES = web.AppKey[Pages]("civic_bridge_pages")
ADMIN = web.AppKey[AdminParts]("civic_bridge_admin")
