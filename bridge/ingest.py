"""Ingestion: what comes in over HTTP is checked, stored durably, and only then answered.

The two inbound doors (bridge.web.whatsapp and bridge.web.appservice call them):

- `Ingest.whatsapp(raw, signature)`: a WhatsApp webhook delivery, verified, parsed once
  and split into one encrypted row per message or status (bridge.whatsapp.webhook), in
  its lane (a citizen, or the statuses of sends to one recipient);
- `Ingest.transaction(txn_id, raw)`: an appservice transaction, its events sealed one
  per row (bridge.matrix.queued) in their room's lane; our own echoes are dropped.

Either way the inbound worker (bridge.worker) is woken for the lanes that got rows and
does the rest; a request is acknowledged only after its rows are stored (a crash in
between loses nothing: Meta and Synapse send again, and rows are deduplicated).

Rows an earlier version queued for WhatsApp held the webhook's value rather than the
parsed item: `normalise_legacy_rows` rewrites them before the worker starts.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from bridge.config import Config, WhatsAppConfig
from bridge.db import Database, InboundSource
from bridge.db.queues import event_lane
from bridge.db.spool import Spool
from bridge.errors import BadRequest, Forbidden, NotFound, Unauthorized
from bridge.matrix.appservice import parse_transaction, transaction_key
from bridge.matrix.crypto_feed import CryptoFeed
from bridge.matrix.crypto_parts import wrap
from bridge.matrix.queued import seal_event
from bridge.metrics import Metrics
from bridge.privacy import AAD_PAYLOAD, DecryptError, Privacy
from bridge.retention import REPLAY_WINDOW
from bridge.types import UserID
from bridge.whatsapp import stored
from bridge.whatsapp.webhook import NotJSON, prepare_delivery, signature_valid

log = logging.getLogger(__name__)

# Starts a background task the process keeps track of (bridge.lifecycle).
Spawn = Callable[[Coroutine[Any, Any, None]], None]


class Waker(Protocol):
    def wake(self, source: InboundSource, *lanes: str) -> None: ...


@dataclass
class Ingest:
    """Store-then-acknowledge for the webhook and the appservice transactions."""

    config: Config
    db: Database
    privacy: Privacy
    metrics: Metrics
    worker: Waker
    spawn: Spawn
    # Whether a Matrix user is one of ours (echoes of our own messages are dropped).
    is_ours: Callable[[str], bool]
    # To-device events, device lists and key counts (MSC2409/MSC3202) for our devices,
    # and the ping that ends Synapse's hold after an error answer.
    crypto: CryptoFeed
    # Staff read receipts and typing → WhatsApp; None when off.
    receipts: Callable[[list[dict[str, Any]]], Coroutine[Any, Any, None]] | None = None
    # SQLite: where a webhook answered off the bridge's loop commits its rows
    # (bridge.db.spool; the worker takes them into the queue, `take_spooled`).
    spool: Spool | None = None
    # This copy runs on the ingest thread (bridge.web.ingest_thread), not the bridge's loop.
    off_loop: bool = False

    # --- the homeserver ---------------------------------------------------------------

    @property
    def hs_token(self) -> str:
        """The token the homeserver presents (appservice registration)."""
        return self.config.appservice.hs_token

    async def transaction(self, txn_id: str, raw: bytes) -> None:
        """Store a transaction's events (a repeated one is a no-op); BadRequest if it is
        malformed."""
        with self.metrics.transaction_latency.time():
            txn = parse_transaction(raw)
            if txn.ignored:
                log.warning("transaction: %d event(s) nested too deeply, ignored", txn.ignored)
                self.metrics.ignored_parts.labels("matrix").inc(txn.ignored)
            # Our own messages come back as echoes; only membership matters from those.
            events = [e for e in txn.events if e["type"] == "m.room.member"
                      or not self.is_ours(str(e.get("sender", "")))]
            to_device, dropped = self.crypto.observe(txn.crypto)
            stored_now = False
            if events or to_device:  # nothing to process, nothing to deduplicate: no write
                with self.db.urgent():
                    stored_now = await self.db.transactions.store(
                        transaction_key(txn_id, txn.events, to_device),
                        [*events, *(wrap(item) for item in to_device)],
                        seal=partial(seal_event, self.privacy.cipher))
            if dropped and (stored_now or not (events or to_device)):
                self.crypto.count_dropped(dropped)
        self.crypto.apply(txn.crypto)
        if txn.ephemeral and self.receipts is not None:
            # Not stored: a lost read tick is no lost message; don't hold the transaction.
            self.spawn(self.receipts(txn.ephemeral))
        if stored_now:
            self.metrics.transactions.inc()
            self.worker.wake("matrix", *{event_lane(e) for e in events},
                             *{event_lane(wrap(item)) for item in to_device})

    def transaction_answered(self, status: int) -> None:
        """How a transaction ended (its HTTP status; 500 when cancelled or crashed): an
        error answer makes Synapse hold the bridge DOWN, so ping it (as_recovery)."""
        recovery = self.crypto.recovery
        # 401/403: not Synapse (a wrong token); it holds nothing against us.
        if recovery is not None and status not in (401, 403):
            ping = recovery.after_transaction(failed=status >= 400)
            if ping is not None:
                self.spawn(ping)

    async def known_ghost(self, user_id: str) -> bool:
        """Whether the homeserver's user query names one of our ghosts."""
        return await self.db.ghosts.get(UserID(user_id)) is not None

    # --- WhatsApp ---------------------------------------------------------------------

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


_PAGE = 500
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


async def normalise_legacy_rows(db: Database, privacy: Privacy, phone_number_id: str) -> int:
    """Rewrite the WhatsApp rows an earlier version queued (the webhook's value for one
    item) to hold the parsed item, if not finished yet; returns how many.

    Runs before the worker starts (bridge.lifecycle), so nothing else reads these rows;
    a row that changed meanwhile is left as it is (`load` still reads the old format).
    """
    cipher, total, after = privacy.cipher, 0, 0
    while page := await db.inbound.unfinished("whatsapp", after, _PAGE):
        after = page[-1].id
        rewrites = []
        for item in page:
            try:
                value = cipher.decrypt_json(item.payload, aad=AAD_PAYLOAD)
            except DecryptError:  # the worker makes it a dead letter, as before
                log.warning("inbound #%d does not decrypt; left as it is", item.id)
                continue
            if not stored.is_legacy(value):
                continue
            parsed = stored.from_legacy(value, phone_number_id)
            if parsed is not None:
                rewrites.append((item.id, item.payload,
                                 cipher.encrypt_json(stored.dump(parsed), aad=AAD_PAYLOAD)))
        if rewrites:
            total += await db.inbound.reseal(rewrites)
    if total:
        log.info("stored %d WhatsApp item(s) queued by an earlier version as parsed", total)
    return total
