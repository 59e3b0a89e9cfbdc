"""The durable outbox: every send to WhatsApp is persisted first, then attempted.

Retryable failures (429, 5xx, 130429/131056, network) back off exponentially with
jitter; permanent ones are reported to staff in the portal. The idempotency key (the
Matrix event id for staff messages) makes a redelivered event a no-op. What remains:
a crash after Graph accepted a message but before `mark_sent` resends it once on
restart — Graph offers no idempotency key to close that window.

System messages (privacy notice, confirmations) go to citizens who have not opted in;
staff messages only while consent is `granted`, notices of availability only while the
`notices` consent is `granted` (both checked again at send time).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from nio.crypto.attachments import decrypt_attachment

from bridge.db import Citizen, Database, OutboxItem, Repositories
from bridge.db.queues import NOTICE_KEY_PREFIX
from bridge.matrix.api import MatrixAPI
from bridge.metrics import Metrics
from bridge.privacy import AAD_IDENTIFIER, AAD_PAYLOAD, AAD_WA_ID, Privacy
from bridge.types import EventID, RoomID, UserID
from bridge.whatsapp.graph import GraphClient, GraphError, Recipient

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 8
MAX_MEDIA_BYTES = 100 * 1024 * 1024
WHATSAPP_KIND = {"m.image": "image", "m.video": "video", "m.audio": "audio",
                 "m.file": "document"}
Notify = Callable[[RoomID, str], Awaitable[Any]]


def backoff(attempts: int) -> timedelta:
    """2, 4, 8 … s (capped at 5 min) times a random factor in [0.5, 1.5)."""
    base = min(2.0 ** attempts, 300.0)
    return timedelta(seconds=base * (0.5 + secrets.randbelow(1000) / 1000))


class Outbox:
    def __init__(self, db: Database, privacy: Privacy, graph: GraphClient, api: MatrixAPI,
                 bot: UserID, notify: Notify, metrics: Metrics) -> None:
        self._db = db
        self._privacy = privacy
        self._graph = graph
        self._api = api
        self._bot = bot
        self._notify = notify
        self._metrics = metrics
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.idle = asyncio.Event()

    # --- queueing ---------------------------------------------------------------------

    async def _add(self, citizen: Citizen, key: str, room_id: str, payload: dict[str, Any]
                   ) -> bool:
        token = self._privacy.cipher.encrypt_json(payload, aad=AAD_PAYLOAD)
        added = await self._db.outbox.add(key, citizen.id, RoomID(room_id), token) is not None
        if added:
            self.wake()
        return added

    async def system_text(self, citizen: Citizen, key: str, body: str) -> bool:
        return await self._add(citizen, key, "", {"type": "text", "body": body, "system": True})

    async def system_buttons(self, citizen: Citizen, key: str, body: str,
                             buttons: list[tuple[str, str]]) -> bool:
        return await self._add(citizen, key, "", {"type": "buttons", "body": body,
                                                  "buttons": buttons, "system": True})

    async def notice(self, repos: Repositories, citizen: Citizen, notice_id: int,
                     template: dict[str, Any]) -> bool:
        """Queue a notice of availability (an approved template) in the caller's
        transaction; call `wake()` once it has committed."""
        token = self._privacy.cipher.encrypt_json(
            {"type": "template", **template, "notice_id": notice_id}, aad=AAD_PAYLOAD)
        key = f"{NOTICE_KEY_PREFIX}{notice_id}"
        return await repos.outbox.add(key, citizen.id, RoomID(""), token) is not None

    async def staff(self, citizen: Citizen, room_id: RoomID, event_id: EventID,
                    payload: dict[str, Any]) -> bool:
        """Queue a staff message; False if this Matrix event was queued before."""
        return await self._add(citizen, event_id, room_id, {**payload, "event_id": event_id})

    # --- worker -----------------------------------------------------------------------

    def wake(self) -> None:
        self.idle.clear()
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outbox")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                while items := await self._db.outbox.due(datetime.now(UTC)):
                    for item in items:
                        await self._attempt(item)
                self._metrics.outbox_depth.set(await self._db.outbox.depth())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("outbox loop error: %s", type(exc).__name__)
            self.idle.set()
            # Poll as well: retries come due without anyone waking us.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            self._wake.clear()

    async def _attempt(self, item: OutboxItem) -> None:
        payload = self._privacy.cipher.decrypt_json(item.payload, aad=AAD_PAYLOAD)
        citizen = await self._db.citizens.get(item.citizen_id)
        notice_id = payload.get("notice_id")
        if citizen is None or not await self._consented(citizen, payload):
            await self._db.outbox.mark_failed(item.id, "consent withdrawn")
            if notice_id is not None:
                await self._db.notices.mark_failed(notice_id, "consent withdrawn")
                self._metrics.notices.labels("failed").inc()
            return
        try:
            with self._metrics.relay_latency.labels("out").time():
                wamid = await self._send(self._recipient(citizen), payload)
        except GraphError as exc:
            await self._failed(item, exc.retryable, f"{exc.status} {exc.code}",
                               exc.permanent_title or "error de WhatsApp", notice_id)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Matrix media download, decryption, a bug: retry, then report
            await self._failed(item, True, type(exc).__name__, "error interno del puente",
                               notice_id)
            return
        await self._db.outbox.mark_sent(item.id, wamid)
        if notice_id is not None:
            await self._db.notices.mark_accepted(notice_id, wamid)
            self._metrics.notices.labels("sent").inc()
        if payload.get("event_id"):
            await self._db.messages.link(wamid, item.room_id, payload["event_id"], "out")
        self._metrics.relayed.labels("out", payload["type"]).inc()

    async def _consented(self, citizen: Citizen, payload: dict[str, Any]) -> bool:
        if payload.get("system"):
            return True
        if payload.get("notice_id") is not None:
            sub = await self._db.subscriptions.get(citizen.id)
            return sub is not None and sub.state == "granted"
        return citizen.consent_state == "granted"

    async def _failed(self, item: OutboxItem, retryable: bool, error: str, title: str,
                      notice_id: int | None = None) -> None:
        """`error` is a status/code or exception type only: never content or numbers."""
        attempts = item.attempts + 1
        if retryable and attempts < MAX_ATTEMPTS:
            self._metrics.outbox_retries.inc()
            log.warning("outbox #%d: retryable error %s (attempt %d)", item.id, error, attempts)
            await self._db.outbox.retry_later(item.id, datetime.now(UTC) + backoff(attempts),
                                              error)
            return
        log.warning("outbox #%d: giving up: %s", item.id, error)
        await self._db.outbox.mark_failed(item.id, error)
        if notice_id is not None:
            await self._db.notices.mark_failed(notice_id, title)
            self._metrics.notices.labels("failed").inc()
        if item.room_id:
            await self._notify(RoomID(item.room_id), f"Mensaje no enviado a WhatsApp: {title}")

    def _recipient(self, citizen: Citizen) -> Recipient:
        cipher = self._privacy.cipher
        key = cipher.decrypt_str(citizen.identifier_ct, aad=AAD_IDENTIFIER)
        wa_id = cipher.decrypt_str(citizen.wa_id_ct, aad=AAD_WA_ID) if citizen.wa_id_ct else None
        return Recipient(wa_id=wa_id, user_id=key if key != wa_id else None)

    async def _send(self, to: Recipient, payload: dict[str, Any]) -> str:
        kind = payload["type"]
        if kind == "text":
            return await self._graph.send_text(to, payload["body"], payload.get("reply_to"))
        if kind == "buttons":
            return await self._graph.send_buttons(
                to, payload["body"], [tuple(b) for b in payload["buttons"]])
        if kind == "template":
            return await self._graph.send_template(to, payload["name"], payload["language"],
                                                   payload["components"])
        if kind == "reaction":
            return await self._graph.send_reaction(to, payload["message_id"], payload["emoji"])
        if kind == "media":
            data = await self._api.download(self._bot, payload["url"], MAX_MEDIA_BYTES)
            if payload.get("file"):
                f = payload["file"]
                data = decrypt_attachment(data, f["key"]["k"], f["hashes"]["sha256"], f["iv"])
            media_id = await self._graph.upload_media(
                data, payload["mimetype"], payload["filename"])
            caption = payload.get("caption") if payload["kind"] not in ("audio",) else None
            return await self._graph.send_media(to, payload["kind"], media_id, caption,
                                                payload["filename"]
                                                if payload["kind"] == "document" else None,
                                                payload.get("reply_to"))
        raise ValueError(f"unknown outbox payload type {kind!r}")
