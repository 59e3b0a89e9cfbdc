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

The work is split as Synapse splits its appservice scheduler: `OutboxQueue`
(bridge.whatsapp.outbox_queue) is the database side (claims, checks at send time,
outcomes, retries, dead letters), `OutboxSender` (bridge.whatsapp.outbox_sender) the
Graph side (media, pacing, 429 back-off, concurrency); `Outbox` queues and runs the loop
that hands batches from one to the other. A batch holds each citizen's oldest due send
(so a citizen's sends stay in order), is marked in flight in one write, sent
concurrently within the rate limits, and recorded in one transaction. If the bridge
crashes mid-batch, its sends not yet posted wait out the confirmation window like the
one cut short (a clean stop releases them at once); none is sent twice.

What a row sends is an `Envelope` (bridge.whatsapp.payloads), sealed as before.

System messages (privacy notice, confirmations) go to citizens who have not opted in;
staff messages only while consent is `granted`, notices of availability only while the
`notices` consent is `granted` (both checked again at send time).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, get_args

from bridge.db import Citizen, Database, Repositories
from bridge.db.queues import NOTICE_KEY_PREFIX
from bridge.matrix.api import MatrixAPI
from bridge.metrics import Metrics
from bridge.privacy import Privacy
from bridge.types import EventID, RoomID, UserID, WamidHash
from bridge.whatsapp.graph import GraphClient
from bridge.whatsapp.outbox_queue import (
    ACCEPTED_STATUSES,
    Notify,
    OnDead,
    OutboxQueue,
    backoff,
    part_key,
)
from bridge.whatsapp.outbox_sender import CALLBACK_PREFIX, Claim, OutboxSender, callback_data
from bridge.whatsapp.pacing import Pacer
from bridge.whatsapp.payloads import Buttons, Envelope, Template, Text, envelope_of

__all__ = ["ACCEPTED_STATUSES", "Outbox", "backoff", "callback_data", "callback_item",
           "part_key", "reply_key"]

log = logging.getLogger(__name__)

_CALLBACK = re.compile(re.escape(CALLBACK_PREFIX) + r"([1-9][0-9]{0,17})")
# The most sends in one batch (each citizen's oldest due one), whatever the concurrency.
MAX_BATCH: Final = 256
# Batches in progress at once (one sending while the next is claimed, the last recorded).
PIPELINE: Final = 3


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
        self._metrics = metrics
        self.queue = OutboxQueue(db, privacy, notify, metrics, on_dead)
        self.sender = OutboxSender(graph, api, bot, privacy, metrics)
        self.confirm_window = confirm_window
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.idle = asyncio.Event()

    @property
    def on_dead(self) -> OnDead | None:
        return self.queue.on_dead

    @on_dead.setter
    def on_dead(self, value: OnDead | None) -> None:
        self.queue.on_dead = value

    @property
    def pacer(self) -> Pacer | None:
        """Meta's rate limits (bridge.whatsapp.pacing); None: no pacing."""
        return self.sender.pacer

    @pacer.setter
    def pacer(self, value: Pacer | None) -> None:
        self.sender.pacer = value

    @property
    def concurrency(self) -> int:
        """Sends in flight at once, to different citizens (whatsapp.outbox_concurrency)."""
        return self.sender.concurrency

    @concurrency.setter
    def concurrency(self, value: int) -> None:
        self.sender.concurrency = value

    @property
    def batch_size(self) -> int:
        """Sends claimed at once: small enough that a crash leaves few to settle by
        status (those posted whose outcome was not yet recorded), large enough that the
        database work is shared by many sends."""
        return min(MAX_BATCH, max(8, 16 * self.concurrency))

    # --- queueing ---------------------------------------------------------------------

    async def _add(self, citizen: Citizen, key: str, room_id: str,
                   payload: Envelope | dict[str, Any],
                   repos: Repositories | None = None) -> bool:
        token = self.queue.seal(envelope_of(payload))
        added = await (repos or self._db).outbox.add(key, citizen.id, RoomID(room_id),
                                                      token) is not None
        if added and repos is None:
            self.wake()
        return added

    async def system_text(self, citizen: Citizen, key: str, body: str) -> bool:
        return await self._add(citizen, key, "", Envelope(Text(body), system=True))

    async def system_buttons(self, citizen: Citizen, key: str, body: str,
                             buttons: list[tuple[str, str]]) -> bool:
        return await self._add(citizen, key, "", Envelope(Buttons(body, tuple(buttons)),
                                                          system=True))

    async def room(self, citizen: Citizen, key: str, payload: Envelope | dict[str, Any],
                   repos: Repositories | None = None) -> bool:
        """Queue a message for a WhatsApp member of an agency room (bridge.rooms_wa):
        `wa_room` names the room; it is sent only while the citizen is a member there,
        and `wr_event`, if set, is the room event it relays. With `repos`, in the
        caller's transaction: call `wake()` once it has committed."""
        return await self._add(citizen, key, "", payload, repos)

    async def room_many(self, sends: Sequence[tuple[Citizen, str, dict[str, Any]]],
                        repos: Repositories) -> None:
        """`room` for many (citizen, key, payload) at once, in the caller's transaction
        and in this order: one statement for a whole fan-out batch. Call `wake()` once
        it has committed."""
        # Members given the same payload object share one sealed copy: the plaintext is
        # the same, and the row's key names the member. (`sends` keeps every payload
        # alive, so no id is reused while this runs.)
        sealed: dict[int, str] = {}
        rows = []
        for citizen, key, payload in sends:
            if id(payload) not in sealed:
                sealed[id(payload)] = self.queue.seal(envelope_of(payload))
            rows.append((key, citizen.id, RoomID(""), sealed[id(payload)]))
        await repos.outbox.add_many(rows)

    async def notice(self, repos: Repositories, citizen: Citizen, notice_id: int,
                     template: dict[str, Any]) -> bool:
        """Queue a notice of availability (an approved template) in the caller's
        transaction; call `wake()` once it has committed."""
        content = Template(template["name"], template["language"],
                           tuple(template.get("components", ())))
        return await self._add(citizen, f"{NOTICE_KEY_PREFIX}{notice_id}", "",
                               Envelope(content, notice_id=notice_id), repos)

    async def staff(self, citizen: Citizen, room_id: RoomID, event_id: EventID,
                    payload: Envelope | dict[str, Any], part: int = 0) -> bool:
        """Queue a staff message (`part` n > 0 of a message sent in several parts gets
        its own key); False if it was queued before."""
        envelope = envelope_of(payload)
        return await self._add(citizen, part_key(event_id, part), room_id,
                               Envelope(envelope.content, event_id=event_id, part=part,
                                        extra=envelope.extra))

    async def queued(self, event_id: str) -> tuple[str, Envelope] | None:
        """(status, envelope) of what staff event `event_id` queued (its first part)."""
        item = await self._db.outbox.by_key(event_id)
        return None if item is None else (item.status, self.queue.envelope(item))

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
                await self._drain()
                self._metrics.outbox_depth.set(await self._db.outbox.depth())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("outbox loop error: %s", type(exc).__name__)
            self.idle.set()
            # Poll as well: retries come due without anyone waking us. asyncio.timeout,
            # not wait_for: 3.11's wait_for can lose a stop() that comes as it is woken.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._wake.wait()
            self._wake.clear()

    async def _drain(self) -> None:
        """Claim, send and record batches until nothing is due. Up to PIPELINE batches
        run at once, to different citizens, so that Graph is kept busy while the database
        claims the next batch and records the last (the sender's concurrency bounds the
        sends in flight across them); a citizen with a batch in flight is left out of the
        next claims until it is recorded, so their sends stay in order."""
        running: dict[asyncio.Task[None], set[int]] = {}
        try:
            while True:
                busy = set().union(*running.values())
                claims, settled = await self.queue.claim(datetime.now(UTC), self.batch_size,
                                                         busy)
                if claims:
                    task = asyncio.create_task(self._send_and_record(claims),
                                               name="outbox-batch")
                    running[task] = {c.citizen.id for c in claims}
                if not running:
                    if settled:
                        continue
                    return
                if len(running) >= PIPELINE or not (claims or settled):
                    done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        del running[task]
                        task.result()  # a database error ends the drain (logged by _run)
        finally:
            for task in running:
                task.cancel()  # a stop: each batch releases what it had not posted
            await asyncio.gather(*running, return_exceptions=True)

    async def _send_and_record(self, claims: list[Claim]) -> None:
        outcomes = await self.sender.send(claims, self.queue.begin(self.confirm_window),
                                          self.queue.release)
        await self.queue.record(claims, outcomes)

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
        settled = await self.queue.settle_by_status(item_id, wamid, status, error_code)
        if settled:
            self.wake()
        return settled
