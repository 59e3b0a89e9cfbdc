"""The WhatsApp door of ingestion: a webhook delivery is verified, parsed once, split into
one encrypted row per message or status (bridge.whatsapp.webhook) in its lane (a citizen,
or the statuses of sends to one recipient), stored durably, and only then answered
(bridge.web.whatsapp). The inbound worker (bridge.worker) is then woken for the lanes
that got rows. A crash before the answer loses nothing: Meta sends again, and rows are
deduplicated by their keys.

Apart from bridge.ingest (the appservice transactions) because it runs apart: on the
public listener's thread or process (bridge.web.ingest_thread, bridge.web.ingest_child),
which build it with a database, waker and metrics of their own. It imports nothing of the
Matrix side, so the ingest process stays small.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from bridge.config import Config, WhatsAppConfig
from bridge.db import Database, InboundSource
from bridge.db.queues import REPLAY_WINDOW
from bridge.db.spool import Spool
from bridge.errors import BadRequest, Forbidden, NotFound, Unauthorized
from bridge.metrics import Metrics
from bridge.privacy import Privacy
from bridge.whatsapp.webhook import NotJSON, prepare_delivery, signature_valid

log = logging.getLogger(__name__)


class Waker(Protocol):
    def wake(self, source: InboundSource, *lanes: str) -> None: ...


@dataclass
class WebhookIngest:
    """Store-then-acknowledge for WhatsApp's webhook."""

    config: Config
    db: Database
    privacy: Privacy
    metrics: Metrics
    worker: Waker
    # SQLite: where a webhook answered off the bridge's loop commits its rows
    # (bridge.db.spool; the worker takes them into the queue, `take_spooled`).
    spool: Spool | None = None
    # This copy runs on the public listener's thread or process, not the bridge's loop.
    off_loop: bool = False

    def handshake(self, mode: str | None, token: str, challenge: str) -> str:
        """Meta's subscription check: the challenge back, or Forbidden."""
        cfg = self._whatsapp()
        if mode != "subscribe" or not hmac.compare_digest(token.encode(),
                                                          cfg.verify_token.encode()):
            raise Forbidden("verification failed")
        return challenge

    async def whatsapp(self, raw: bytes, signature: str | None) -> None:
        """Verify, parse and store a delivery; Unauthorized for a bad signature,
        BadRequest for a body refused whole."""
        with self.metrics.webhook_latency.time():
            await self._whatsapp_delivery(raw, signature)

    async def _whatsapp_delivery(self, raw: bytes, signature: str | None) -> None:
        cfg = self._whatsapp()
        if not signature_valid(cfg.app_secret, raw, signature):
            self.metrics.webhook_rejects.labels("signature").inc()
            raise Unauthorized("missing or invalid X-Hub-Signature-256")
        try:
            delivery = prepare_delivery(raw, cfg.phone_number_id, self.privacy.index,
                                        self.privacy.cipher,
                                        oldest=time.time() - REPLAY_WINDOW.total_seconds())
        except NotJSON:
            self.metrics.webhook_rejects.labels("json").inc()
            raise
        except BadRequest:
            self.metrics.webhook_rejects.labels("format").inc()
            raise
        for reason in delivery.ignored:
            log.info("webhook: ignored %s", reason)
        for error in delivery.errors:
            # About the business number, not a citizen's message: there is no portal to
            # tell, so operators learn it from the log and the metric.
            log.warning("webhook: WhatsApp reports an error for this number (code %s)",
                        error.code)
            self.metrics.inbound_not_relayed.labels("account_error").inc()
        if delivery.ignored:
            self.metrics.ignored_parts.labels("whatsapp").inc(len(delivery.ignored))
        for part in delivery.replays:
            # Its dedupe key may be purged already: handling it could relay it twice.
            log.info("webhook: ignored a %s sent before the replay window", part)
            self.metrics.webhook_replays.labels(part).inc()
        if self.off_loop and self.spool is not None:
            # Not the queue: its writer is busy with the bridge's loop most of the time.
            if delivery.rows:
                self.spool.put([("whatsapp", key, payload, lane)
                                for key, payload, lane in delivery.rows])
                self.worker.wake("whatsapp", *{lane for _, _, lane in delivery.rows})
            return
        with self.db.urgent():
            lanes = await self.db.inbound.enqueue_many(
                [("whatsapp", key, payload, lane) for key, payload, lane in delivery.rows])
        if lanes:
            self.worker.wake("whatsapp", *lanes)

    def _whatsapp(self) -> WhatsAppConfig:
        cfg = self.config.whatsapp
        if not cfg.enabled:
            raise NotFound("WhatsApp is not enabled")
        return cfg


SPOOL_BATCH = 200  # spooled rows taken into the queue per transaction


async def take_spooled(db: Database, spool: Spool) -> set[str]:
    """Move the spool's rows into the `inbound` queue, oldest first (the worker, before
    each round of WhatsApp work); returns the lanes that got new rows.

    Queued, then removed from the spool: a crash in between queues them again, which
    the queue's dedupe key makes a no-op (bridge.db.spool).

    Takes what it finds, and goes on only while a batch came full (a backlog): rows
    spooled meanwhile each wake the worker, so the next round takes them. Taking until
    the spool was empty meant that no lane started before a burst of webhooks ended."""
    lanes: set[str] = set()
    while True:
        rows = await asyncio.to_thread(spool.head, SPOOL_BATCH)
        if not rows:
            return lanes
        # One statement: the queue's writer (SQLite's only one) is held briefly.
        lanes |= await db.inbound.enqueue_many(
            [(row.source, row.dedupe_key, row.payload, row.lane) for row in rows])
        await asyncio.to_thread(spool.remove, [row.id for row in rows])
        if len(rows) < SPOOL_BATCH:
            return lanes
