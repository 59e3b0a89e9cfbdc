"""The composition root: every long-lived object is built here, once, and passed in.

Only the entry points import it (bridge.app, bridge.cli; tests/unit/test_layers.py). What
the process does with the parts once built (elect, start, lead, stop, purge) is
bridge.lifecycle; the HTTP edge sees them through the views of bridge.web.state.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp

from bridge.admin.citizens import CitizenData
from bridge.admin.moderation import Moderation
from bridge.admin.notices import Notices
from bridge.admin.reidentify import Reidentification
from bridge.admin.service import AdminService
from bridge.admin.wiring import build_admin
from bridge.auditchain import AuditKeys
from bridge.config import Config
from bridge.db import Database, InboundItem, InboundSource
from bridge.db.spool import Spool, spool_path
from bridge.deadletters import DeadLetters
from bridge.ingest import Ingest
from bridge.invites.rights import InviteAccounts
from bridge.invites.service import InviteLinks
from bridge.leader import Election, Role, SingleProcess, election_for
from bridge.legacy_wamids import key_legacy_wamids
from bridge.lifecycle import Lifecycle
from bridge.matrix.api import MatrixAPI
from bridge.matrix.as_recovery import AppserviceRecovery
from bridge.matrix.bot_invites import BotInvitePolicy
from bridge.matrix.catchup import ToDeviceCatchUp
from bridge.matrix.crypto.legacy import LegacyStores
from bridge.matrix.crypto_feed import CryptoFeed, ToDeviceHandler
from bridge.matrix.crypto_parts import unwrap
from bridge.matrix.devices import Devices
from bridge.matrix.devicetrust import CrossSignedDevices
from bridge.matrix.ghosts import Ghosts
from bridge.matrix.keystore import RoomKeyStore
from bridge.matrix.queued import open_event
from bridge.matrix.relay import Relay
from bridge.matrix.room_policy import RoomPolicy
from bridge.matrix.rooms import Rooms
from bridge.matrix.storekey import load_store_key, pickle_passphrase
from bridge.matrix.trust import Trust
from bridge.matrix.undecryptable import UndecryptableStore
from bridge.metrics import Metrics
from bridge.moderation.synapse_admin import SynapseAdmin
from bridge.moderation.wiring import ModerationParts
from bridge.podlabel import PodLabeler
from bridge.privacy import Privacy, data_keys
from bridge.rooms_wa.wiring import WhatsAppRooms, build_rooms_wa
from bridge.types import RoomID, UserID
from bridge.webhook_ingest import WebhookIngest, take_spooled
from bridge.whatsapp.graph import GraphClient
from bridge.whatsapp.inbound import WhatsAppInbound
from bridge.whatsapp.mirror import Mirror
from bridge.whatsapp.outbound import StaffToWhatsApp, adopt_legacy_holds
from bridge.whatsapp.outbox import Outbox
from bridge.whatsapp.pacing import Pacer
from bridge.whatsapp.portal import Portals
from bridge.whatsapp.receipts import StaffReceipts
from bridge.whatsapp.staff_templates import StaffTemplates
from bridge.whatsapp.subscriptions import NoticeSubscriptions
from bridge.worker import Handler, InboundWorker

log = logging.getLogger(__name__)


@dataclass
class Bridge(Lifecycle):
    """Every long-lived part; its life (start, lead, close) is `Lifecycle`'s."""

    config: Config
    db: Database
    http: aiohttp.ClientSession
    api: MatrixAPI
    privacy: Privacy
    devices: Devices
    crypto: CryptoFeed
    ghosts: Ghosts
    rooms: Rooms
    relay: Relay
    trust: Trust
    portals: Portals
    outbox: Outbox
    worker: InboundWorker
    metrics: Metrics
    admin: AdminService
    moderation: Moderation
    invites: InviteLinks
    citizens: CitizenData
    notices: Notices
    dead_letters: DeadLetters
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    # High availability (bridge.leader): only the elected process starts and processes.
    election: Election = field(default_factory=SingleProcess)
    pod: PodLabeler | None = None
    role: Role = "standby"
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    # Why processing stopped for good (set with `lost`): the process should exit.
    stop_reason: str = "leader lock lost"
    # Staff read receipts and typing → WhatsApp (None when off or WhatsApp is off).
    receipts: StaffReceipts | None = None
    templates: StaffTemplates | None = None
    # Reports, flags, watched display names (bridge.moderation).
    safety: ModerationParts | None = None
    # Re-identification and look-up by phone number (admin API, scoped; bridge.admin.auth).
    reidentify: Reidentification | None = None
    # WhatsApp citizens as members of agency rooms (None when WhatsApp is off).
    wa_rooms: WhatsAppRooms | None = None
    # The homeserver's way in (set by build_bridge: it spawns here), and the webhook's.
    ingest: Ingest = field(init=False)
    webhooks: WebhookIngest = field(init=False)


async def build_bridge(config: Config, election: Election | None = None) -> Bridge:
    """Open the database (refusing a wrong schema) and wire every service; `election`
    if one was claimed already (bridge.cli.serve), else a new one."""
    db = await Database.open(config.database.url, audit_keys=AuditKeys.from_base64(
        config.audit.key, config.audit.previous_keys))
    # Before anything can read or write the trail: after an upgrade or a key rotation,
    # the newest entry must be keyed with the current key (bridge.auditchain).
    await db.audit.seal()
    privacy = Privacy.from_config(config.privacy)
    store_dir = Path(config.appservice.store_dir)
    try:
        store_key = await load_store_key(
            db.kv, privacy.cipher, store_dir,
            installed=await db.ghosts.get(UserID(config.bot_mxid)) is not None,
            data_keys=data_keys(config.privacy))
    except BaseException:
        await db.close()
        raise
    # Before anything looks a message up: wamids from before revision 0010 get keyed.
    await key_legacy_wamids(db, privacy)
    await adopt_legacy_holds(db, privacy.cipher)  # the data part of revision 0015
    http = aiohttp.ClientSession()
    api = MatrixAPI(http, config.homeserver.url, config.appservice.as_token)
    trust = Trust(db, http, config.homeserver.url, config.appservice.as_token, privacy.cipher)
    metrics = Metrics()
    devices = Devices(api, db.crypto, pickle_passphrase(store_key), on_ready=trust,
                      long_poll_user=UserID(config.bot_mxid),
                      room_keys=RoomKeyStore(db.room_keys, privacy.cipher),
                      key_trust=CrossSignedDevices(api, metrics)
                      if config.e2ee.forward_keys_to == "cross-signed" else None,
                      max_open=config.appservice.max_open_devices,
                      open_gauge=metrics.open_devices, send_batches=metrics.send_batches,
                      file_stores=LegacyStores(db, store_dir))
    ghosts = Ghosts(db, api, devices, privacy, config.appservice.ghost_prefix,
                    config.homeserver.domain)
    crypto = CryptoFeed(devices, metrics.to_device_dropped)
    crypto.recovery = AppserviceRecovery(api, config.appservice.id, metrics.homeserver_pings)
    to_device = ToDeviceHandler(crypto, db, ghosts)
    rooms = Rooms(api, ghosts.bot, RoomPolicy(federate=config.rooms.federate,
                                              admins=tuple(config.admin.users)))

    async def managed(room_id: RoomID) -> bool:
        return await db.rooms.get(room_id) is not None

    relay = Relay(api, ghosts, db.rooms.get, BotInvitePolicy(
        [*config.admin.users, *config.portals.staff], managed, metrics.bot_invites_declined),
        UndecryptableStore(db, privacy.cipher, config.appservice.undecryptable_retry_seconds),
        metrics.undecryptable)

    async def handle_matrix(item: InboundItem) -> None:
        event = open_event(privacy.cipher, item)
        if (to_device_event := unwrap(event)) is not None:
            await to_device(to_device_event)
        else:
            await relay.handle_event(event)

    graph = GraphClient.from_config(http, config.whatsapp)
    portals = Portals(config, db, api, ghosts, rooms, relay)
    dead_letters = DeadLetters(db, metrics, portals.notice, config.admin.management_room)
    outbox = Outbox(db, privacy, graph, api, ghosts.bot, portals.notice, metrics,
                    confirm_window=timedelta(
                        seconds=config.whatsapp.outbox_confirm_window_seconds),
                    on_dead=dead_letters.announce)
    outbox.pacer = Pacer(config.whatsapp.max_sends_per_second,
                         config.whatsapp.recipient_interval_seconds)
    outbox.concurrency = config.whatsapp.outbox_concurrency
    mirror = Mirror(db, privacy, api, relay, graph, portals, metrics)
    subscriptions = NoticeSubscriptions(config, db, outbox, metrics)
    handlers: dict[InboundSource, Handler] = {"matrix": handle_matrix}
    receipts: StaffReceipts | None = None
    templates: StaffTemplates | None = None
    inbound: WhatsAppInbound | None = None
    wa_rooms: WhatsAppRooms | None = None
    if config.whatsapp.enabled:
        inbound = WhatsAppInbound(config, db, privacy, portals, mirror, outbox, metrics,
                                  subscriptions)
        handlers["whatsapp"] = inbound
        # `!plantilla` commands are answered in front of the staff → WhatsApp relay.
        staff_out = StaffToWhatsApp(db, portals, outbox, privacy, metrics)
        templates = StaffTemplates(config.whatsapp, db, portals, outbox, metrics,
                                   then=staff_out)
        # `!invitar` is answered in front of `!plantilla` and the relay to the citizen.
        wa_rooms = build_rooms_wa(config, db, api, ghosts, rooms, relay, outbox, privacy,
                                  mirror, portals, templates, metrics)
        relay.add_handler(wa_rooms.commands)
        inbound.set_rooms_hook(wa_rooms.replies)
        inbound.set_failed_hook(wa_rooms.members.undelivered)
        if config.whatsapp.send_read_receipts:
            receipts = StaffReceipts(db, privacy, graph, metrics, ghosts.is_ours)
    spool = _spool(config)
    worker = InboundWorker(db, handlers, metrics=metrics, on_dead=dead_letters.announce,
                           intake={"whatsapp": partial(take_spooled, db, spool)}
                           if spool is not None else None,
                           prepare={"whatsapp": inbound.prepare} if inbound else None)
    crypto.catch_up = ToDeviceCatchUp(db, privacy.cipher, crypto, partial(worker.wake, "matrix"),
                                      metrics.to_device_catch_ups)
    dead_letters.wake_inbound, dead_letters.wake_outbox = worker.wake, outbox.wake
    parts = build_admin(config, db, http, api, rooms, ghosts, relay, privacy,
                        outbox if config.whatsapp.enabled else None, metrics,
                        wa_rooms.members if wa_rooms is not None else None)
    if inbound is not None and parts.safety.whatsapp is not None:
        inbound.set_report_hook(parts.safety.whatsapp)
    mirror.set_flag_hook(parts.safety.flagger.check)
    token = config.moderation.synapse_admin_token
    accounts = InviteAccounts(db, api, ghosts.bot,
                              SynapseAdmin(http, config.homeserver.url, token) if token else None)
    citizens = CitizenData(config, db, privacy, portals, ghosts, subscriptions, accounts)
    bridge = Bridge(config=config, db=db, http=http, api=api, privacy=privacy, devices=devices,
                    crypto=crypto,
                    ghosts=ghosts, rooms=rooms, relay=relay, trust=trust, portals=portals,
                    outbox=outbox, worker=worker, metrics=metrics, admin=parts.admin,
                    moderation=parts.moderation, invites=parts.invites,
                    citizens=citizens,
                    notices=Notices(config, db, outbox, metrics, subscriptions, ghosts.is_ours),
                    dead_letters=dead_letters,
                    election=election or election_for(config.database.url), safety=parts.safety,
                    pod=await PodLabeler.from_environment(http),
                    receipts=receipts, templates=templates,
                    reidentify=Reidentification(config, db, privacy, citizens),
                    wa_rooms=wa_rooms)
    bridge.ingest = Ingest(config, db, privacy, metrics, worker, bridge.spawn,
                           is_ours=ghosts.is_ours, crypto=crypto,
                           receipts=receipts.handle if receipts is not None else None)
    bridge.webhooks = WebhookIngest(config, db, privacy, metrics, worker, spool=spool)
    return bridge


def _spool(config: Config) -> Spool | None:
    """SQLite with WhatsApp on: the webhook's spool (bridge.db.spool)."""
    path = spool_path(config.database.url) if config.whatsapp.enabled else None
    return Spool(path) if path is not None else None
