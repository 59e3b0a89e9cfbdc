"""The process's life: elected, started, leading, halted, closed; and its background
tasks, the scheduled retention purge among them.

`Lifecycle` is the behaviour of the composition root's `Bridge` (bridge.services), which
holds the parts named below; kept apart so that the root only builds and wires.
Order matters and is why this is one place: queued rows an earlier version wrote are
converted before the worker reads any; the worker and the outbox start only once the
bot device is up; on a lost election everything stops before the lock is given up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp

from bridge.admin.citizens import CitizenData
from bridge.auditanchor import AnchorPublisher
from bridge.config import Config
from bridge.db import Database
from bridge.deadletters import DeadLetters
from bridge.ingest import Ingest, normalise_legacy_rows
from bridge.leader import Election, Role
from bridge.matrix.api import MatrixAPI, MatrixError
from bridge.matrix.crypto_feed import CryptoFeed
from bridge.matrix.devices import Devices
from bridge.matrix.ghosts import Ghosts
from bridge.matrix.queued import seal_unsealed
from bridge.matrix.relay import Relay
from bridge.matrix.trust import Trust
from bridge.metrics import Metrics
from bridge.moderation.wiring import ModerationParts
from bridge.podlabel import PodLabeler
from bridge.privacy import Privacy
from bridge.retention import EVERY_SECONDS, Retention
from bridge.webhook_ingest import WebhookIngest
from bridge.whatsapp.outbox import Outbox
from bridge.worker import InboundWorker

log = logging.getLogger(__name__)

# The E2EE transport the last start found ("appservice" or "sync"): a restart or a
# takeover starts with it at once instead of waiting for the probe.
TRANSPORT_KEY = "e2ee_transport"


class Lifecycle:
    """Start, lead, stop and purge; mixed into `bridge.services.Bridge`."""

    # The parts it starts and stops (fields of the Bridge).
    config: Config
    db: Database
    http: aiohttp.ClientSession
    api: MatrixAPI
    privacy: Privacy
    devices: Devices
    crypto: CryptoFeed
    ghosts: Ghosts
    relay: Relay
    trust: Trust
    outbox: Outbox
    worker: InboundWorker
    ingest: Ingest
    webhooks: WebhookIngest
    metrics: Metrics
    citizens: CitizenData
    dead_letters: DeadLetters
    safety: ModerationParts | None
    # Its state (bridge.leader): only the elected process starts and processes.
    ready: asyncio.Event
    tasks: set[asyncio.Task[Any]]
    election: Election
    pod: PodLabeler | None
    role: Role
    lost: asyncio.Event
    # Why processing stopped for good (set with `lost`): the process should exit.
    stop_reason: str

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

    async def nudge_homeserver(self) -> bool:
        """Have Synapse ping us (MSC2659): after a takeover or a restart it then retries
        the queued transactions at once rather than after its exponential backoff, and
        sends to-device events again (bridge.matrix.as_recovery)."""
        return self.crypto.recovery is not None and await self.crypto.recovery.ping()

    async def start(self) -> None:
        """Bring up the bot device, then process queued work; retries until Synapse answers."""
        try:  # before the worker reads them: rows an earlier version queued in clear
            await seal_unsealed(self.db, self.privacy.cipher)
        except Exception as exc:
            log.warning("could not seal Matrix events queued in clear (%s); they are "
                        "read as they are", type(exc).__name__)
        if self.config.whatsapp.enabled:
            try:  # and WhatsApp rows that hold a webhook's value rather than the item
                await normalise_legacy_rows(self.db, self.privacy,
                                            self.config.whatsapp.phone_number_id)
            except Exception as exc:
                log.warning("could not convert WhatsApp items queued by an earlier "
                            "version (%s); they are converted as they run",
                            type(exc).__name__)
        if self.devices.file_stores is not None:
            # Before any device opens: the nio files of earlier versions move into the
            # database (bridge.matrix.crypto.legacy). One that fails is moved when its
            # device opens, which fails meanwhile rather than get a new account.
            try:
                await self.devices.file_stores.migrate_all()
            except Exception as exc:
                log.error("E2EE file stores not moved into the database (%s)",
                          type(exc).__name__)
        delay = 1.0
        while True:
            try:
                bot = await self.ghosts.ensure_bot()
                # Before the worker starts: how every device learns of to-device events.
                # Alongside: the ping makes Synapse retry what it queued while the
                # bridge was away at once (ends its backoff); the probe is sent again
                # once it did. Not awaited: a ping that fails retries for up to 30 s.
                if not self.crypto.decided.is_set():
                    pinged = asyncio.create_task(self.nudge_homeserver())
                    self.tasks.add(pinged)
                    pinged.add_done_callback(self.tasks.discard)
                    probe = partial(self.decide_transport, bot.user_id,
                                    bot.client.device_id, partial(asyncio.shield, pinged))
                    # As the last process found it, checked in the background; else
                    # the probe decides now (up to PROBE_SECONDS).
                    if self.crypto.start_as(await self.db.kv.get(TRANSPORT_KEY)):
                        self.spawn(probe(recheck=True))
                    else:
                        await probe(recheck=False)
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
        self.spawn(self.close_idle_devices())
        self.spawn(self.relay.retry_parked())
        if self.safety and self.safety.poller:
            self.spawn(self.safety.poller.run())
        if self.config.audit.anchor_command:
            self.spawn(AnchorPublisher(self.db, self.config.audit.anchor_command,
                                       self.metrics).run())
        self.ready.set()
        log.info("bridge ready")

    async def decide_transport(self, bot: str, device: str,
                               recovered: Callable[[], Awaitable[bool]], *,
                               recheck: bool) -> None:
        """Probe how the homeserver feeds the devices (bridge.matrix.crypto_feed) and
        keep the answer for the next start."""
        if recheck:
            await self.crypto.recheck(self.api, bot, device, recovered=recovered)
        else:
            await self.crypto.probe(self.api, bot, device, recovered=recovered)
        await self.db.kv.set(TRANSPORT_KEY, self.crypto.mode)

    async def close_idle_devices(self) -> None:
        """Close ghost devices unused for `appservice.device_idle_seconds` (a timer in
        the bridge only: no request to the homeserver)."""
        idle = self.config.appservice.device_idle_seconds
        while True:
            await asyncio.sleep(min(idle, 60.0))
            if closed := await self.devices.evict_idle(idle):
                log.info("closed %d idle device(s)", closed)

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
        if self.webhooks.spool is not None:  # the public listener has stopped (bridge.app)
            self.webhooks.spool.close()
