"""The outbox's sender: a batch of claimed sends → Graph, within Meta's rate limits.

It owns everything between the queue and Graph: the recipient's number (decrypted only
here), media (download from Matrix, decrypt, upload to Meta, delete once sent), the
pacing (`bridge.whatsapp.pacing`: the number's sends per second, the least interval
per recipient) and `whatsapp.outbox_concurrency` sends at once. A batch holds at most
one send per citizen (`OutboxQueue.claim`), so a citizen's sends stay in order.

Each send ends in one `Outcome`, which the queue records for the whole batch in one
transaction: `Sent` (the wamid), `Failed` (the exception: a 429, 5xx or network error
is retried with backoff for that send alone, anything else is a dead letter),
`Postponed` (too early for this recipient), `Skipped` (no longer pending when it was
about to go). The in-flight mark (`sending_at`) is written for the whole batch in one
commit, after the media uploads and right before the first POST to /messages
(bridge.whatsapp.outbox: how a crash in between is settled).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from functools import partial

from nio.crypto.attachments import decrypt_attachment

from bridge.db import Citizen, OutboxItem
from bridge.matrix.api import MatrixAPI
from bridge.metrics import Metrics
from bridge.privacy import AAD_IDENTIFIER, AAD_WA_ID, Privacy
from bridge.types import UserID
from bridge.whatsapp.graph import GraphClient, GraphError, Recipient
from bridge.whatsapp.pacing import Pacer
from bridge.whatsapp.payloads import (
    Buttons,
    Envelope,
    ListMessage,
    Location,
    Media,
    Reaction,
    Template,
    Text,
)
from bridge.whatsapp.staff_events import media_kind

log = logging.getLogger(__name__)

MAX_MEDIA_BYTES = 100 * 1024 * 1024
Send = Callable[[], Awaitable[str]]
# Marks a batch in flight, in one committed write; returns the ids still pending.
Begin = Callable[[Collection[int]], Awaitable[set[int]]]
# Clears that mark from sends that never reached Graph (the batch was stopped).
Release = Callable[[Collection[int]], Awaitable[object]]


@dataclass(frozen=True)
class Claim:
    """A due send the queue hands to the sender: its row, what it sends, to whom."""
    item: OutboxItem
    envelope: Envelope
    citizen: Citizen


@dataclass(frozen=True)
class Sent:
    wamid: str


@dataclass(frozen=True)
class Failed:
    error: Exception


@dataclass(frozen=True)
class Postponed:
    seconds: float


@dataclass(frozen=True)
class Skipped:
    """Cancelled, or settled by a delivery status, since the queue claimed it."""


Outcome = Sent | Failed | Postponed | Skipped


CALLBACK_PREFIX = "cb1."


def callback_data(item_id: int) -> str:
    """The `biz_opaque_callback_data` of outbox row `item_id`: no personal data."""
    return f"{CALLBACK_PREFIX}{item_id}"


class OutboxSender:
    def __init__(self, graph: GraphClient, api: MatrixAPI, bot: UserID, privacy: Privacy,
                 metrics: Metrics) -> None:
        self._graph = graph
        self._api = api
        self._bot = bot
        self._privacy = privacy
        self._metrics = metrics
        self._latency = metrics.relay_latency.labels("out")  # observed once per send
        # Meta's rate limits (bridge.whatsapp.pacing); None: no pacing.
        self.pacer: Pacer | None = None
        self.concurrency = 1
        self._batches = itertools.count()  # the order in which batches get the gate

    @property
    def concurrency(self) -> int:
        """Sends in flight at once, to different citizens (whatsapp.outbox_concurrency),
        across every batch being sent."""
        return self._concurrency

    @concurrency.setter
    def concurrency(self, value: int) -> None:
        self._concurrency = value
        self._gate = _Gate(value)

    async def send(self, claims: Sequence[Claim], begin: Begin, release: Release
                   ) -> list[Outcome]:
        """Send a batch (at most one claim per citizen); one outcome per claim. Stopped
        midway, the sends not yet posted are released (due again at once, not waiting
        for a delivery status that cannot come)."""
        outcomes: list[Outcome | None] = [None] * len(claims)
        gate = self._gate
        batch = next(self._batches)
        started = [time.perf_counter()] * len(claims)
        sends: dict[int, Send] = {}
        posted: set[int] = set()

        async def prepare_media(n: int, claim: Claim, media: Media) -> None:
            async with gate.turn(batch):
                started[n] = time.perf_counter()
                try:
                    sends[n] = await self._prepare_media(self._recipient(claim.citizen),
                                                         media, callback_data(claim.item.id))
                except Exception as exc:  # a Matrix media download, decryption, Graph
                    outcomes[n] = Failed(exc)

        media: list[tuple[int, Media]] = []
        for n, claim in enumerate(claims):
            wait = self.pacer.too_early(claim.citizen.id) if self.pacer else 0.0
            if wait > 0:
                outcomes[n] = Postponed(wait)
            elif isinstance(claim.envelope.content, Media):
                media.append((n, claim.envelope.content))
            else:  # nothing to fetch first: no task, no turn at the gate
                try:
                    sends[n] = self._prepare(self._recipient(claim.citizen), claim.envelope,
                                             callback_data(claim.item.id))
                except Exception as exc:  # the number no longer decrypts
                    outcomes[n] = Failed(exc)
        if media:
            await _all(prepare_media(n, claims[n], content) for n, content in media)
        # In flight only from here: a send stopped earlier (say, mid-upload) created no
        # message, so it is due again at once.
        try:
            in_flight = await begin([claims[n].item.id for n in sends])
        except asyncio.CancelledError:
            # Stopped as the mark was written (it may have committed): nothing was
            # posted, so nothing has to wait out the confirmation window.
            await release([claims[n].item.id for n in sends])
            raise

        async def send(n: int, claim: Claim) -> None:
            if claim.item.id not in in_flight:
                outcomes[n] = Skipped()
                return
            if claim.item.sending_at is not None:
                log.warning("outbox #%d: no delivery status within the confirmation window "
                            "after an interrupted send; sending again", claim.item.id)
            async with gate.turn(batch):
                try:
                    if self.pacer is not None:
                        await self.pacer.slot()  # this number's sends per second
                    posted.add(claim.item.id)
                    wamid = await sends[n]()
                except Exception as exc:
                    outcomes[n] = Failed(exc)
                    return
            if self.pacer is not None:
                self.pacer.sent(claim.citizen.id)
            self._latency.observe(time.perf_counter() - started[n])
            outcomes[n] = Sent(wamid)

        # A few workers taking the sends in turn, not a task per send.
        queued = iter(list(sends))

        async def worker() -> None:
            for n in queued:
                await send(n, claims[n])

        try:
            await _all(worker() for _ in range(min(self.concurrency, len(sends))))
        except asyncio.CancelledError:
            await release(in_flight - posted)
            raise
        return [o if o is not None else Skipped() for o in outcomes]

    def _recipient(self, citizen: Citizen) -> Recipient:
        cipher = self._privacy.cipher
        key = cipher.decrypt_str(citizen.identifier_ct, aad=AAD_IDENTIFIER)
        wa_id = cipher.decrypt_str(citizen.wa_id_ct, aad=AAD_WA_ID) if citizen.wa_id_ct else None
        return Recipient(wa_id=wa_id, user_id=key if key != wa_id else None)

    def _prepare(self, to: Recipient, envelope: Envelope, cb: str) -> Send:
        """The send of anything but media (`_prepare_media`): the POST to Graph's
        messages endpoint, the only request that can create a WhatsApp message."""
        graph = self._graph
        match envelope.content:
            case Text(body=body, reply_to=reply_to):
                return partial(graph.send_text, to, body, reply_to, callback_data=cb)
            case Buttons(body=body, buttons=buttons):
                return partial(graph.send_buttons, to, body, buttons, callback_data=cb)
            case ListMessage(body=body, button=button, section=section, rows=rows):
                return partial(graph.send_list, to, body, button, section, rows,
                               callback_data=cb)
            case Template(name=name, language=language, components=components):
                return partial(graph.send_template, to, name, language, components,
                               callback_data=cb)
            case Reaction(message_id=message_id, emoji=emoji):
                return partial(graph.send_reaction, to, message_id, emoji, callback_data=cb)
            case Location() as loc:
                return partial(graph.send_location, to, loc.latitude, loc.longitude,
                               loc.name, loc.address, loc.reply_to, callback_data=cb)
            case Media():
                raise TypeError("media is prepared by _prepare_media")

    async def _prepare_media(self, to: Recipient, media: Media, cb: str) -> Send:
        """Download (and decrypt) the Matrix file, upload it to Meta, and return the send,
        which deletes the upload once Graph has answered (Meta keeps the file for the
        message; our copy there is no longer needed)."""
        data = await self._api.download(self._bot, media.url, MAX_MEDIA_BYTES)
        if media.file:
            f = media.file
            data = decrypt_attachment(data, f["key"]["k"], f["hashes"]["sha256"], f["iv"])
        # The real size may differ from the announced one: a file too big for its kind
        # goes as a document.
        kind = media_kind(media.requested or media.kind, media.mimetype,
                          len(data)) or media.kind
        if kind != media.kind and media.kind != "document":
            log.info("outbox: media sent as %s instead of %s", kind, media.kind)
        media_id = await self._graph.upload_media(data, media.mimetype, media.filename)
        del data
        caption = media.caption if kind not in ("audio", "sticker") else None
        send = partial(self._graph.send_media, to, kind, media_id, caption,
                       media.filename if kind == "document" else None,
                       media.reply_to, callback_data=cb)

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


async def _all(coros: object) -> None:
    """Run these at once; a bug in one is logged (by type only), never lost silently."""
    results = await asyncio.gather(*coros, return_exceptions=True)  # type: ignore[misc]
    for outcome in results:
        if isinstance(outcome, asyncio.CancelledError):
            raise outcome
        if isinstance(outcome, Exception):
            log.error("outbox send error: %s", type(outcome).__name__)


class _Gate:
    """At most `size` sends at once, across the batches in progress; a free turn goes to
    the oldest batch first. A first-come gate would interleave the batches, so that they
    all ended together and Graph sat idle while they were recorded and the next claimed;
    oldest first, one batch ends while the next is still sending."""

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []  # a heap
        self._arrivals = itertools.count()

    def turn(self, batch: int) -> _Turn:
        """`async with gate.turn(batch):` one send's turn (a plain context object, not
        an async generator: it is taken once per send)."""
        return _Turn(self, batch)

    async def _take(self, batch: int) -> None:
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return
        granted = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (batch, next(self._arrivals), granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self._hand_on()  # given a turn as it was cancelled: pass it on
            raise

    def _hand_on(self) -> None:
        while self._waiting:
            granted = heapq.heappop(self._waiting)[2]
            if not granted.done():  # a cancelled waiter's future is done
                granted.set_result(None)
                return
        self._free += 1


class _Turn:
    __slots__ = ("_batch", "_gate")

    def __init__(self, gate: _Gate, batch: int) -> None:
        self._gate = gate
        self._batch = batch

    async def __aenter__(self) -> None:
        await self._gate._take(self._batch)

    async def __aexit__(self, *exc: object) -> None:
        self._gate._hand_on()
