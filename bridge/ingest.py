"""Ingestion: what comes in over HTTP is checked, stored durably, and only then answered.

The two inbound doors:

- `Ingest.transaction(txn_id, raw)` (bridge.web.appservice calls it): an appservice
  transaction, its events sealed one per row (bridge.matrix.queued) in their room's
  lane; our own echoes are dropped;
- WhatsApp's webhook: bridge.webhook_ingest (it runs on the public listener's thread or
  process, so it has a module of its own).

Either way the inbound worker (bridge.worker) is woken for the lanes that got rows and
does the rest; a request is acknowledged only after its rows are stored (a crash in
between loses nothing: Meta and Synapse send again, and rows are deduplicated).

Rows an earlier version queued for WhatsApp held the webhook's value rather than the
parsed item: `normalise_legacy_rows` rewrites them before the worker starts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from typing import Any

from bridge.config import Config
from bridge.db import Database
from bridge.db.queues import event_lane
from bridge.matrix.appservice import parse_transaction, transaction_key
from bridge.matrix.crypto_feed import CryptoFeed
from bridge.matrix.crypto_parts import wrap
from bridge.matrix.queued import seal_event
from bridge.metrics import Metrics
from bridge.privacy import AAD_PAYLOAD, DecryptError, Privacy
from bridge.types import UserID
from bridge.webhook_ingest import Waker
from bridge.whatsapp import stored

log = logging.getLogger(__name__)

# Starts a background task the process keeps track of (bridge.lifecycle).
Spawn = Callable[[Coroutine[Any, Any, None]], None]


@dataclass
class Ingest:
    """Store-then-acknowledge for the appservice transactions."""

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


_PAGE = 500


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
