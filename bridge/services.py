"""The composition root: every long-lived object is built here, once, and passed in."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from bridge.admin.citizens import CitizenData
from bridge.admin.moderation import Moderation
from bridge.admin.notices import Notices
from bridge.admin.reidentify import Reidentification
from bridge.admin.service import AdminService
from bridge.admin.wiring import build_admin
from bridge.auditanchor import AnchorPublisher
from bridge.auditchain import AuditKeys
from bridge.config import Config
from bridge.db import Database, InboundItem, InboundSource
from bridge.deadletters import DeadLetters
from bridge.invites.rights import InviteAccounts
from bridge.invites.service import InviteLinks
from bridge.leader import Election, Role, SingleProcess, election_for
from bridge.legacy_wamids import key_legacy_wamids
from bridge.matrix.api import MatrixAPI, MatrixError
from bridge.matrix.bot_invites import BotInvitePolicy
from bridge.matrix.devices import Devices
from bridge.matrix.devicetrust import CrossSignedDevices
from bridge.matrix.ghosts import Ghosts
from bridge.matrix.keystore import RoomKeyStore
from bridge.matrix.queued import open_event, seal_unsealed
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
from bridge.retention import EVERY_SECONDS, Retention
from bridge.rooms_wa.wiring import WhatsAppRooms, build_rooms_wa
from bridge.types import RoomID, UserID
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
class Bridge:
    """Everything the HTTP routes and background tasks need."""

    config: Config
    db: Database
    http: aiohttp.ClientSession
    api: MatrixAPI
    privacy: Privacy
    devices: Devices
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
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
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

    async def lead(self) -> None:
        """Wait to be elected, then start; stop processing the moment the lock is lost.

        A standby has not touched the crypto store nor the homeserver's bot device.
        After a loss `lost` is set and the process is expected to exit (a supervisor
        restarts it as a standby): its half-started state is not worth reusing.
        """
        try:
            if self.pod:
                self.pod.set("standby")  # a restarted container keeps its pod's old label
            await self.election.acquire()
            self.role = "active"
            self.metrics.active.set(1)
            if self.pod:
                self.pod.set("active")
            log.info("elected: this process is the active bridge")
            await self._lead_until_lost_or_failed()
        except Exception:
            log.exception("leader election failed")
        self.role = "lost"
        self.metrics.active.set(0)
        log.error("%s: stopping all processing", self.stop_reason)
        await self.halt()
        if self.pod:
            self.pod.set("standby")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(3):
                    await self.pod.settle()
        self.lost.set()

    async def _lead_until_lost_or_failed(self) -> None:
        """Start, and keep leading until the lock is lost. A start that fails for good
        (not a network error) gives the lock up, so that a standby, or this process
        restarted by its supervisor, can try, instead of holding it while not ready."""
        start = asyncio.create_task(self.start(), name="start")
        watch = asyncio.create_task(self.election.watch(), name="leader watch")
        try:
            done, _ = await asyncio.wait({start, watch}, return_when=asyncio.FIRST_COMPLETED)
            if start in done and (failure := start.exception()) is not None:
                self.stop_reason = f"the bridge could not start ({type(failure).__name__})"
                log.error("start failed: %s", failure)
                return
            await watch
        finally:
            for task in (start, watch):
                task.cancel()
            await asyncio.gather(start, watch, return_exceptions=True)

    async def halt(self) -> None:
        """Stop processing now: background tasks, workers, the outbox, the devices."""
        current = asyncio.current_task()
        others = [t for t in self.tasks if t is not current]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        await self.worker.stop()
        await self.outbox.stop()
        await self.devices.close()

    async def nudge_homeserver(self, attempts: int = 5) -> None:
        """Have Synapse ping us (MSC2659): after a takeover it then retries the queued
        transactions at once rather than after its exponential backoff."""
        for attempt in range(attempts):
            try:
                await self.api.ping_appservice(self.config.appservice.id)
                return
            except (MatrixError, aiohttp.ClientError, OSError) as exc:
                # 502/504: e.g. the Service does not route to this pod yet. Not fatal:
                # Synapse retries on its own, only later.
                log.info("homeserver ping failed (%s)", exc)
                if isinstance(exc, MatrixError) and exc.status < 500:
                    return  # an older homeserver without MSC2659, or no `url` registered
            await asyncio.sleep(2.0 * (attempt + 1))

    async def start(self) -> None:
        """Bring up the bot device, then process queued work; retries until Synapse answers."""
        try:  # before the worker reads them: rows an earlier version queued in clear
            await seal_unsealed(self.db, self.privacy.cipher)
        except Exception as exc:
            log.warning("could not seal Matrix events queued in clear (%s); they are "
                        "read as they are", type(exc).__name__)
        delay = 1.0
        while True:
            try:
                await self.ghosts.ensure_bot()
                await self.ghosts.resume_unregistered()
                await self.trust.upgrade_existing(Path(self.config.appservice.store_dir))
                break
            except (aiohttp.ClientError, OSError, MatrixError) as exc:
                if isinstance(exc, MatrixError) and exc.status < 500 and exc.status != 429:
                    raise  # e.g. a wrong as_token: retrying cannot help
                log.warning("homeserver not reachable (%s); retrying in %.0fs",
                            type(exc).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        try:  # dead letters left from before the start show at once in the gauge
            await self.dead_letters.refresh_gauge()
        except Exception as exc:
            log.warning("could not count dead letters: %s", type(exc).__name__)
        self.worker.start()
        if self.config.whatsapp.enabled:
            self.outbox.start()
        self.spawn(self.retention())
        self.spawn(self.relay.retry_parked())
        if self.safety and self.safety.poller:
            self.spawn(self.safety.poller.run())
        if self.config.audit.anchor_command:
            self.spawn(AnchorPublisher(self.db, self.config.audit.anchor_command,
                                       self.metrics).run())
        self.ready.set()
        log.info("bridge ready")
        self.spawn(self.nudge_homeserver())

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Track a background task: keep a reference, log its failure."""
        task = asyncio.create_task(coro)
        self.tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self.tasks.discard(t)
            if not t.cancelled() and t.exception():
                log.error("background task failed: %s", type(t.exception()).__name__)

        task.add_done_callback(done)

    def retention_job(self, *, offline: bool = False) -> Retention:
        """The retention purge over every kind of kept data (bridge.retention); `offline`
        for `civic-bridge purge` next to a running bridge."""
        return Retention(self.db, self.privacy.cipher, self.config,
                         None if offline else self.metrics, contacts=self.citizens,
                         accounts=self.citizens.accounts, offline=offline)

    async def retention(self, every: float = EVERY_SECONDS) -> None:
        """Scheduled purge, every `every` seconds; survives failures (bridge.retention)."""
        await self.retention_job().loop(every)

    async def purge(self, now: datetime) -> dict[str, int]:
        """One purge run now; logs and returns how many rows of each kind went (failures:
        see bridge.retention)."""
        return (await self.retention_job().run(now)).deleted

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.worker.stop()
        await self.outbox.stop()
        await self.devices.close()
        if self.pod:
            await self.pod.close()
        await self.election.release()  # after the workers stopped: then a standby may go
        await self.http.close()
        await self.db.close()


async def build_bridge(config: Config) -> Bridge:
    """Open the database (refusing a wrong schema) and wire every service."""
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
    devices = Devices(api, store_dir, pickle_passphrase(store_key), on_ready=trust,
                      long_poll_user=UserID(config.bot_mxid),
                      room_keys=RoomKeyStore(db.room_keys, privacy.cipher),
                      key_trust=CrossSignedDevices(api, metrics)
                      if config.e2ee.forward_keys_to == "cross-signed" else None)
    ghosts = Ghosts(db, api, devices, privacy, config.appservice.ghost_prefix,
                    config.homeserver.domain)
    rooms = Rooms(api, ghosts.bot, RoomPolicy(federate=config.rooms.federate,
                                              admins=tuple(config.admin.users)))

    async def managed(room_id: RoomID) -> bool:
        return await db.rooms.get(room_id) is not None

    relay = Relay(api, ghosts, BotInvitePolicy(
        [*config.admin.users, *config.portals.staff], managed, metrics.bot_invites_declined),
        UndecryptableStore(db, privacy.cipher, config.appservice.undecryptable_retry_seconds),
        metrics.undecryptable)

    async def handle_matrix(item: InboundItem) -> None:
        await relay.handle_event(open_event(privacy.cipher, item))

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
    worker = InboundWorker(db, handlers, metrics=metrics, on_dead=dead_letters.announce)
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
    return Bridge(config=config, db=db, http=http, api=api, privacy=privacy, devices=devices,
                  ghosts=ghosts, rooms=rooms, relay=relay, trust=trust, portals=portals,
                  outbox=outbox, worker=worker, metrics=metrics, admin=parts.admin,
                  moderation=parts.moderation, invites=parts.invites,
                  citizens=citizens,
                  notices=Notices(config, db, outbox, metrics, subscriptions, ghosts.is_ours),
                  dead_letters=dead_letters,
                  election=election_for(config.database.url), safety=parts.safety,
                  pod=await PodLabeler.from_environment(http),
                  receipts=receipts, templates=templates,
                  reidentify=Reidentification(config, db, privacy, citizens),
                  wa_rooms=wa_rooms)
