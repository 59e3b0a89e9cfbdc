"""The durable outbox: every send to WhatsApp is persisted first, then attempted.

Retryable failures (429, 5xx, 130429/131056, network; `bridge.retry.is_transient`)
back off exponentially with jitter, capped at 5 minutes, for as long as it takes.
Permanent ones (Graph refused the send with a 4xx, the payload no longer decrypts, a
media file is gone) set the row aside as a dead letter (`bridge.deadletters`: counted,
announced to staff in the portal, retryable by an admin), so later sends are never
blocked behind it. The idempotency key (the Matrix event id for staff messages) makes a
redelivered event a no-op.

Graph has no idempotency key, so the outcome of a send whose answer the bridge never
read (it crashed or was stopped mid-send) cannot be asked for. Instead every send
carries `biz_opaque_callback_data` naming its row (`cb1.<outbox id>`, no personal
data), which Meta echoes on the message's delivery statuses, and right before the one
request that can create a message (the POST to /{phone_number_id}/messages; a media
download and upload come first) the row is marked in flight (`sending_at`) with its
next attempt pushed `confirm_window` (`whatsapp.outbox_confirm_window_seconds`,
default 10 minutes) ahead, in one committed write. After a restart such a row is not
due until the window has passed; meanwhile a `sent`, `delivered`, `read` or `played`
status carrying its callback data marks it sent with that wamid (the same bookkeeping
as Graph's answer: message map, notice log, metrics), and a `failed` one fails it like
a permanent Graph error.

The guarantee: nothing is lost across a restart, and delivery is at-least-once. A
message goes out twice only if (1) no status with its callback data reaches the bridge
within the window after a send cut short (statuses lost, delayed or the webhook
unreachable that long): it is then sent again, with a warning naming the outbox id;
or (2) Graph accepted it but the answer was a network error or timeout, which is
retried with backoff like any retryable error (that clears the in-flight mark). A send
cut short before it reached Graph's messages endpoint (e.g. stopped during a media
download or upload) is not in flight: it is sent once, without waiting.

System messages (privacy notice, confirmations) go to citizens who have not opted in;
staff messages only while consent is `granted`, notices of availability only while the
`notices` consent is `granted` (both checked again at send time).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Final, Literal, get_args

from nio.crypto.attachments import decrypt_attachment

from bridge.db import Citizen, Database, OutboxItem, Repositories
from bridge.db.queues import NOTICE_KEY_PREFIX
from bridge.matrix.api import MatrixAPI, MatrixError
from bridge.metrics import Metrics
from bridge.privacy import AAD_IDENTIFIER, AAD_PAYLOAD, AAD_WA_ID, Privacy
from bridge.retry import backoff as retry_backoff
from bridge.retry import is_transient, reason_of
from bridge.types import EventID, RoomID, UserID, WamidHash
from bridge.whatsapp.graph import GraphClient, GraphError, Recipient, error_title
from bridge.whatsapp.pacing import Pacer
from bridge.whatsapp.staff_events import (
    TOO_LARGE_ADVICE,
    NotSentReason,
    failure_advice,
    media_kind,
)

log = logging.getLogger(__name__)

MAX_MEDIA_BYTES = 100 * 1024 * 1024
Notify = Callable[[RoomID, str], Awaitable[Any]]
# Told about each new dead letter (its id "out-N", and a staff-facing detail or None).
OnDead = Callable[[str, str | None], Awaitable[None]]
CALLBACK_PREFIX: Final = "cb1."
_CALLBACK = re.compile(r"cb1\.([1-9][0-9]{0,17})")
# Statuses that prove WhatsApp accepted the message.
ACCEPTED_STATUSES: Final = frozenset({"sent", "delivered", "read", "played"})


def callback_data(item_id: int) -> str:
    """The `biz_opaque_callback_data` of outbox row `item_id`: no personal data."""
    return f"{CALLBACK_PREFIX}{item_id}"


def callback_item(data: str | None) -> int | None:
    """The outbox row id in callback data we set; None for anything else."""
    match = _CALLBACK.fullmatch(data) if data else None
    return int(match.group(1)) if match else None


# A system reply answers one citizen message: its key is "<kind>:<that wamid's hash>",
# so a message handled again (a retry, a redelivery) is answered once.
ReplyKind = Literal["notice", "optin", "optout", "notices-text", "notices-in",
                    "notices-out", "report-howto", "report-unknown"]
REPLY_KINDS: Final[tuple[str, ...]] = get_args(ReplyKind)


def reply_key(kind: ReplyKind, wamid_hash: WamidHash) -> str:
    """The outbox key of the system reply of `kind` to the message with this wamid hash."""
    return f"{kind}:{wamid_hash}"


def part_key(event_id: str, part: int) -> str:
    """The outbox key of part `part` of staff message `event_id` (the first: the id)."""
    return event_id if part == 0 else f"{event_id}#{part}"


def backoff(attempts: int) -> timedelta:
    """2, 4, 8 … s (capped at 5 min), jittered (bridge.retry.backoff); never gives up."""
    return timedelta(seconds=retry_backoff(attempts))


class Outbox:
    """Queues sends to WhatsApp and runs the worker that makes them (module docstring).

    `confirm_window` is how long a send cut short by a crash waits for its delivery
    status before it goes again (`whatsapp.outbox_confirm_window_seconds`); tests
    shorten it.
    """

    def __init__(self, db: Database, privacy: Privacy, graph: GraphClient, api: MatrixAPI,
                 bot: UserID, notify: Notify, metrics: Metrics, *,
                 confirm_window: timedelta, on_dead: OnDead | None = None) -> None:
        self._db = db
        self._privacy = privacy
        self._graph = graph
        self._api = api
        self._bot = bot
        self._notify = notify
        self._metrics = metrics
        self.confirm_window = confirm_window
        self.on_dead = on_dead
        # Meta's rate limits (bridge.whatsapp.pacing); None: no pacing.
        self.pacer: Pacer | None = None
        # Sends in flight at once, to different citizens (whatsapp.outbox_concurrency).
        self.concurrency = 1
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

    async def room(self, citizen: Citizen, key: str, payload: dict[str, Any],
                   repos: Repositories | None = None) -> bool:
        """Queue a message for a WhatsApp member of an agency room (bridge.rooms_wa):
        `payload["wa_room"]` names the room; it is sent only while the citizen is a
        member there, and `payload["wr_event"]`, if set, is the room event it relays.
        With `repos`, in the caller's transaction: call `wake()` once it has committed."""
        if repos is None:
            return await self._add(citizen, key, "", payload)
        token = self._privacy.cipher.encrypt_json(payload, aad=AAD_PAYLOAD)
        return await repos.outbox.add(key, citizen.id, RoomID(""), token) is not None

    async def notice(self, repos: Repositories, citizen: Citizen, notice_id: int,
                     template: dict[str, Any]) -> bool:
        """Queue a notice of availability (an approved template) in the caller's
        transaction; call `wake()` once it has committed."""
        token = self._privacy.cipher.encrypt_json(
            {"type": "template", **template, "notice_id": notice_id}, aad=AAD_PAYLOAD)
        key = f"{NOTICE_KEY_PREFIX}{notice_id}"
        return await repos.outbox.add(key, citizen.id, RoomID(""), token) is not None

    async def staff(self, citizen: Citizen, room_id: RoomID, event_id: EventID,
                    payload: dict[str, Any], part: int = 0) -> bool:
        """Queue a staff message (`part` n > 0 of a message sent in several parts gets
        its own key); False if it was queued before."""
        key = part_key(event_id, part)
        extra = {"part": part} if part else {}
        return await self._add(citizen, key, room_id, {**payload, "event_id": event_id, **extra})

    async def queued(self, event_id: str) -> tuple[str, dict[str, Any]] | None:
        """(status, payload) of what staff event `event_id` queued (its first part)."""
        item = await self._db.outbox.by_key(event_id)
        return None if item is None else (item.status, self._payload(item))

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
                    await self._attempt_all(items)
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

    async def _attempt_all(self, items: list[OutboxItem]) -> None:
        """One due batch: in order; with `concurrency` > 1, several citizens' sends at
        once (a room post to many members), each citizen's still one after another."""
        if self.concurrency <= 1:
            for item in items:
                await self._attempt(item)
            return
        lanes: dict[int, list[OutboxItem]] = {}
        for item in items:
            lanes.setdefault(item.citizen_id, []).append(item)
        gate = asyncio.Semaphore(self.concurrency)

        async def lane(queue: list[OutboxItem]) -> None:
            async with gate:
                for queued in queue:
                    await self._attempt(queued)

        for outcome in await asyncio.gather(*(lane(q) for q in lanes.values()),
                                            return_exceptions=True):
            if isinstance(outcome, asyncio.CancelledError):
                raise outcome
            if isinstance(outcome, Exception):
                log.error("outbox send error: %s", type(outcome).__name__)

    async def _attempt(self, item: OutboxItem) -> None:
        try:
            payload = self._payload(item)
        except Exception as exc:  # it will not decrypt next time either: set it aside
            await self._set_aside(item, exc, type(exc).__name__, None)
            return
        citizen = await self._db.citizens.get(item.citizen_id)
        notice_id = payload.get("notice_id")
        if citizen is None or not await self._consented(citizen, payload):
            await self._db.outbox.mark_failed(item.id, "consent withdrawn")
            if payload.get("wa_room") and not payload.get("system"):
                # Left, kicked or banned since it was queued (they were told then).
                self._metrics.room_not_relayed.labels("not_member").inc()
            if notice_id is not None:
                await self._db.notices.mark_failed(notice_id, "consent withdrawn")
                self._metrics.notices.labels("failed").inc()
            return
        if payload.get("part") and not await self._after_previous_part(item, payload):
            return
        if payload.get("wa_room") and not await self._after_older_room_sends(item):
            return
        if self.pacer is not None and (wait := self.pacer.too_early(item.citizen_id)) > 0:
            await self._db.outbox.postpone(item.id, datetime.now(UTC) + timedelta(seconds=wait))
            return
        if item.sending_at is not None:
            log.warning("outbox #%d: no delivery status within the confirmation window "
                        "after an interrupted send; sending again", item.id)
        try:
            with self._metrics.relay_latency.labels("out").time():
                send = await self._prepare(self._recipient(citizen), payload,
                                           callback_data(item.id))
                if self.pacer is not None:
                    await self.pacer.slot()  # this number's sends per second
                # In flight only from here: a send stopped earlier (say, mid-upload)
                # created no message, so it is due again at once.
                if not await self._db.outbox.begin_attempt(
                        item.id, datetime.now(UTC) + self.confirm_window):
                    return  # cancelled, or settled by a delivery status, since `due` read it
                wamid = await send()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Graph, a Matrix media download, decryption, a bug
            # 413 from Matrix: larger than any WhatsApp attachment (size not announced).
            too_large = isinstance(exc, MatrixError) and exc.status == 413
            error = (f"{exc.status} {exc.code}" if isinstance(exc, GraphError)
                     else f"matrix {exc.status}" if isinstance(exc, MatrixError)
                     else type(exc).__name__)
            if is_transient(exc) and not too_large:
                await self._retry(item, error)
            else:
                await self._set_aside(item, exc, error, notice_id, too_large=too_large)
            return
        if self.pacer is not None:
            self.pacer.sent(item.citizen_id)
        if await self._db.outbox.mark_sent(item.id, self._privacy.index.wamid(wamid)):
            await self._accepted(item, payload, wamid)

    async def _after_older_room_sends(self, item: OutboxItem) -> bool:
        """Room messages reach a citizen in order: one waits while an older one to the
        same citizen is backing off (a 429, a 5xx) instead of overtaking it."""
        waiting = await self._db.wa_rooms.older_waiting(item.citizen_id, item.id,
                                                        datetime.now(UTC))
        if waiting is None:
            return True
        await self._db.outbox.postpone(item.id, waiting + timedelta(milliseconds=1))
        return False

    async def _after_previous_part(self, item: OutboxItem, payload: dict[str, Any]) -> bool:
        """Parts of a long message go in order: a part waits while the one before it is
        retrying, and is dropped (staff were told about that one) if it failed."""
        previous = await self._db.outbox.by_key(part_key(payload["event_id"],
                                                         payload["part"] - 1))
        if previous is None or previous.status in ("sent", "cancelled"):
            return True
        if previous.status in ("failed", "dead"):
            await self._db.outbox.mark_failed(item.id, "earlier part failed")
            return False
        later = max(previous.next_attempt_at, datetime.now(UTC)) + timedelta(seconds=1)
        await self._db.outbox.postpone(item.id, later)
        return False

    async def _accepted(self, item: OutboxItem, payload: dict[str, Any], wamid: str) -> None:
        """The bookkeeping of a send WhatsApp accepted as `wamid`, however we learnt it
        (Graph's answer or a delivery status): the notice log, the message map that
        receipts and replies need, metrics."""
        notice_id = payload.get("notice_id")
        if notice_id is not None:
            await self._db.notices.mark_accepted(notice_id, self._privacy.index.wamid(wamid))
            self._metrics.notices.labels("sent").inc()
        if payload.get("event_id"):
            await self._db.messages.link(self._privacy.seal_wamid(wamid), item.room_id,
                                         payload["event_id"], "out")
        if payload.get("wr_event"):  # one room event, one wamid per member
            await self._db.wa_rooms.link(self._privacy.seal_wamid(wamid), item.citizen_id,
                                         RoomID(payload["wa_room"]),
                                         EventID(payload["wr_event"]))
        self._metrics.relayed.labels("out", payload["type"]).inc()

    async def settle_by_status(self, data: str | None, wamid: str, status: str,
                               error_code: int | None = None) -> bool:
        """Apply a delivery status carrying callback data `data` to the send it names,
        if that send is still unconfirmed (in flight, or cut short by a crash): an
        accepting status marks it sent as `wamid`, `failed` fails it like a permanent
        Graph error (`error_code` from the status). True if it settled a send; other
        data, or a row already settled, changes nothing."""
        item_id = callback_item(data)
        if item_id is None:
            return False
        if status in ACCEPTED_STATUSES:
            item = await self._db.outbox.confirm_in_flight(item_id,
                                                           self._privacy.index.wamid(wamid))
            if item is None:
                return False
            log.info("outbox #%d: confirmed by a delivery status", item_id)
            await self._accepted(item, self._payload(item), wamid)
            return True
        if status == "failed":
            item = await self._db.outbox.fail_in_flight(item_id, f"status failed {error_code}")
            if item is None:
                return False
            log.warning("outbox #%d: failed per delivery status %s", item_id, error_code)
            await self._gave_up(item, self._payload(item).get("notice_id"),
                                error_title(error_code), code=error_code)
            return True
        return False

    def _payload(self, item: OutboxItem) -> dict[str, Any]:
        payload: dict[str, Any] = self._privacy.cipher.decrypt_json(item.payload,
                                                                    aad=AAD_PAYLOAD)
        return payload

    async def _consented(self, citizen: Citizen, payload: dict[str, Any]) -> bool:
        if payload.get("system"):
            return True
        if payload.get("wa_room"):  # left, kicked or banned since: not sent
            return await self._db.wa_rooms.is_joined(RoomID(payload["wa_room"]), citizen.id)
        if payload.get("notice_id") is not None:
            sub = await self._db.subscriptions.get(citizen.id)
            return sub is not None and sub.state == "granted"
        return citizen.consent_state == "granted"

    async def _retry(self, item: OutboxItem, error: str) -> None:
        """A transient failure: try again after a backoff, however many attempts it takes.
        `error` is a status/code or exception type only: never content or numbers."""
        attempts = item.attempts + 1
        self._metrics.outbox_retries.inc()
        log.warning("outbox #%d: retryable error %s (attempt %d)", item.id, error, attempts)
        await self._db.outbox.retry_later(item.id, datetime.now(UTC) + backoff(attempts), error)

    async def _set_aside(self, item: OutboxItem, exc: Exception, error: str,
                         notice_id: int | None, *, too_large: bool = False) -> None:
        """A permanent failure: the row becomes a dead letter (an admin may retry it),
        the queue goes on, and whoever waits for the send is told what to do."""
        log.warning("outbox #%d failed for good (%s): set aside as dead letter out-%d",
                    item.id, error, item.id)
        if not await self._db.outbox.set_aside(item.id, reason_of(exc), error):
            return  # cancelled or settled meanwhile
        code: int | None = None
        reason: NotSentReason = "internal"
        if too_large:
            title, reason = "el archivo supera los 100 MB que admite WhatsApp", "too_large"
        elif isinstance(exc, GraphError):
            title, reason = exc.permanent_title or "error de WhatsApp", "graph_error"
            code = exc.code
        elif isinstance(exc, MatrixError):
            title = "no se pudo descargar el archivo de Matrix"
        else:
            title = "error interno del puente"
        await self._gave_up(item, notice_id, title, code=code, reason=reason,
                            dead_letter=f"out-{item.id}")

    async def _gave_up(self, item: OutboxItem, notice_id: int | None, title: str, *,
                       code: int | None = None, reason: NotSentReason = "graph_error",
                       dead_letter: str | None = None) -> None:
        """Tell whoever waits for a send that failed for good: the notice log, staff
        (with what to do, and the dead letter's id when it is one), the not-sent metric."""
        if notice_id is not None:
            await self._db.notices.mark_failed(notice_id, title)
            self._metrics.notices.labels("failed").inc()
        advice = (TOO_LARGE_ADVICE if reason == "too_large" else failure_advice(code))
        if dead_letter is not None and self.on_dead is not None:
            if item.room_id:
                self._metrics.outbound_not_sent.labels(reason).inc()
            # One notice, from bridge.deadletters: the reason, the advice, the id to retry.
            await self.on_dead(dead_letter, f"{title}. {advice}".rstrip("."))
        elif item.room_id:
            self._metrics.outbound_not_sent.labels(reason).inc()
            await self._notify(RoomID(item.room_id),
                               f"Mensaje no enviado a WhatsApp: {title}. {advice}")

    def _recipient(self, citizen: Citizen) -> Recipient:
        cipher = self._privacy.cipher
        key = cipher.decrypt_str(citizen.identifier_ct, aad=AAD_IDENTIFIER)
        wa_id = cipher.decrypt_str(citizen.wa_id_ct, aad=AAD_WA_ID) if citizen.wa_id_ct else None
        return Recipient(wa_id=wa_id, user_id=key if key != wa_id else None)

    async def _prepare(self, to: Recipient, payload: dict[str, Any], cb: str
                       ) -> Callable[[], Awaitable[str]]:
        """Do what must precede the send (for media: download, decrypt, upload) and
        return the send itself: the POST to Graph's messages endpoint, the only request
        that can create a WhatsApp message."""
        kind = payload["type"]
        if kind == "text":
            return partial(self._graph.send_text, to, payload["body"], payload.get("reply_to"),
                           callback_data=cb)
        if kind == "buttons":
            return partial(self._graph.send_buttons, to, payload["body"],
                           [tuple(b) for b in payload["buttons"]], callback_data=cb)
        if kind == "list":
            return partial(self._graph.send_list, to, payload["body"], payload["button"],
                           payload["section"], [tuple(r) for r in payload["rows"]],
                           callback_data=cb)
        if kind == "template":
            return partial(self._graph.send_template, to, payload["name"], payload["language"],
                           payload["components"], callback_data=cb)
        if kind == "reaction":
            return partial(self._graph.send_reaction, to, payload["message_id"],
                           payload["emoji"], callback_data=cb)
        if kind == "location":
            return partial(self._graph.send_location, to, payload["latitude"],
                           payload["longitude"], payload.get("name"), payload.get("address"),
                           payload.get("reply_to"), callback_data=cb)
        if kind == "media":
            return await self._prepare_media(to, payload, cb)
        raise ValueError(f"unknown outbox payload type {kind!r}")

    async def _prepare_media(self, to: Recipient, payload: dict[str, Any], cb: str
                             ) -> Callable[[], Awaitable[str]]:
        """Download (and decrypt) the Matrix file, upload it to Meta, and return the send,
        which deletes the upload once Graph has answered (Meta keeps the file for the
        message; our copy there is no longer needed)."""
        data = await self._api.download(self._bot, payload["url"], MAX_MEDIA_BYTES)
        if payload.get("file"):
            f = payload["file"]
            data = decrypt_attachment(data, f["key"]["k"], f["hashes"]["sha256"], f["iv"])
        # The real size may differ from the announced one: a file too big for its kind
        # goes as a document.
        kind = media_kind(payload.get("requested", payload["kind"]), payload["mimetype"],
                          len(data)) or payload["kind"]
        if kind != payload["kind"] and payload["kind"] != "document":
            log.info("outbox: media sent as %s instead of %s", kind, payload["kind"])
        media_id = await self._graph.upload_media(data, payload["mimetype"],
                                                  payload["filename"])
        caption = payload.get("caption") if kind not in ("audio", "sticker") else None
        send = partial(self._graph.send_media, to, kind, media_id, caption,
                       payload["filename"] if kind == "document" else None,
                       payload.get("reply_to"), callback_data=cb)

        async def send_then_delete() -> str:
            try:
                wamid = await send()
            except GraphError as exc:
                if exc.status is not None:  # refused: the next attempt uploads again
                    await self._delete_upload(media_id)
                raise
            await self._delete_upload(media_id)
            return wamid
        return send_then_delete

    async def _delete_upload(self, media_id: str) -> None:
        try:
            await self._graph.delete_media(media_id)
        except GraphError as exc:  # the send stands; Meta expires uploads after 30 days
            self._metrics.media_delete_failures.inc()
            log.warning("outbox: uploaded media not deleted: http=%s code=%s",
                        exc.status, exc.code)
