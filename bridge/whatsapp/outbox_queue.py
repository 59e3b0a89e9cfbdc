"""The outbox's queue: the database side of sending (bridge.whatsapp.outbox).

Claims a batch of due sends (one per citizen: each citizen's oldest), checks in bulk
what must hold at send time (consent or membership, parts in order, a room send not
overtaking an older one that backs off), and records the sender's outcomes for the whole
batch in one transaction: sent (with the message map, the notice log, the room links),
retried with backoff, postponed, or set aside as a dead letter, whose notice goes out
once that transaction has committed. A batch costs a handful of round trips, not a
handful per send.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from bridge.db import Database, OutboxItem, Repositories
from bridge.matrix.api import MatrixError
from bridge.metrics import Metrics
from bridge.privacy import AAD_PAYLOAD, Privacy
from bridge.retry import backoff as retry_backoff
from bridge.retry import is_transient, reason_of
from bridge.texts.matrix import default as mx_text
from bridge.types import EventID, RoomID, WamidHash
from bridge.whatsapp.graph import GraphError, error_title
from bridge.whatsapp.outbox_sender import Claim, Failed, Outcome, Postponed, Sent, Skipped
from bridge.whatsapp.payloads import Envelope, decode, encode
from bridge.whatsapp.staff_events import TOO_LARGE_ADVICE, NotSentReason, failure_advice

log = logging.getLogger(__name__)

Notify = Callable[[RoomID, str], Awaitable[Any]]
# Told about each new dead letter (its id "out-N", and a staff-facing detail or None).
OnDead = Callable[[str, str | None], Awaitable[None]]
# Statuses that prove WhatsApp accepted the message.
ACCEPTED_STATUSES = frozenset({"sent", "delivered", "read", "played"})


def part_key(event_id: str, part: int) -> str:
    """The outbox key of part `part` of staff message `event_id` (the first: the id)."""
    return event_id if part == 0 else f"{event_id}#{part}"


def backoff(attempts: int) -> timedelta:
    """2, 4, 8 … s (capped at 5 min), jittered (bridge.retry.backoff); never gives up."""
    return timedelta(seconds=retry_backoff(attempts))


@dataclass
class _GaveUp:
    """A send that failed for good, told about once the batch has committed."""
    item: OutboxItem
    notice_id: int | None
    title: str
    code: int | None = None
    reason: NotSentReason = "graph_error"
    dead_letter: str | None = None


class OutboxQueue:
    def __init__(self, db: Database, privacy: Privacy, notify: Notify, metrics: Metrics,
                 on_dead: OnDead | None = None) -> None:
        self._db = db
        self._privacy = privacy
        self._notify = notify
        self._metrics = metrics
        self.on_dead = on_dead

    # --- the payload, sealed ------------------------------------------------------------

    def seal(self, envelope: Envelope) -> str:
        return self._privacy.cipher.encrypt_json(encode(envelope), aad=AAD_PAYLOAD)

    def envelope(self, item: OutboxItem) -> Envelope:
        return decode(self._privacy.cipher.decrypt_json(item.payload, aad=AAD_PAYLOAD))

    # --- claiming -----------------------------------------------------------------------

    async def claim(self, now: datetime, limit: int, busy: Collection[int] = ()
                    ) -> tuple[list[Claim], int]:
        """The next batch to send, to citizens not in `busy` (a batch of theirs is still
        in flight), and how many due rows it settled or postponed without sending (0 and
        0: nothing was due)."""
        claims: list[Claim] = []
        gave_up: list[_GaveUp] = []
        async with self._db.transaction() as repos:
            heads = await repos.outbox.lane_heads(now, limit, busy)
            if not heads:
                return [], 0
            citizens = await repos.citizens.get_many({i.citizen_id for i in heads})
            joined = await repos.wa_rooms.joined_of(citizens)
            waiting = await repos.outbox.waiting_room_sends(citizens, now)
            # A fan-out's members share one sealed payload per post: opened once here.
            opened: dict[str, Envelope] = {}
            for item in heads:
                try:
                    envelope = opened.get(item.payload)
                    if envelope is None:
                        envelope = opened[item.payload] = self.envelope(item)
                except Exception as exc:  # it will not decrypt next time either
                    gave_up += await self._set_aside(repos, item, exc, type(exc).__name__, None)
                    continue
                citizen = citizens.get(item.citizen_id)
                if citizen is None or not await self._consented(repos, citizen.id, envelope,
                                                                citizen.consent_state, joined):
                    await self._withdrawn(repos, item, envelope)
                    continue
                if envelope.part and not await self._after_previous_part(repos, item,
                                                                         envelope):
                    continue
                if envelope.wa_room and (later := min(
                        (due for c, i, due in waiting if c == item.citizen_id and i < item.id),
                        default=None)):
                    # Room messages reach a citizen in order: this one waits while an
                    # older one is backing off (a 429, a 5xx) instead of overtaking it.
                    await repos.outbox.postpone(item.id, later + timedelta(milliseconds=1))
                    continue
                claims.append(Claim(item, envelope, citizen))
        await self._told(gave_up)
        return claims, len(heads) - len(claims)

    async def _consented(self, repos: Repositories, citizen_id: int, envelope: Envelope,
                         consent: str, joined: set[tuple[RoomID, int]]) -> bool:
        if envelope.system:
            return True
        if envelope.wa_room:  # left, kicked or banned since: not sent
            return (RoomID(envelope.wa_room), citizen_id) in joined
        if envelope.notice_id is not None:
            sub = await repos.subscriptions.get(citizen_id)
            return sub is not None and sub.state == "granted"
        return consent == "granted"

    async def _withdrawn(self, repos: Repositories, item: OutboxItem, envelope: Envelope
                         ) -> None:
        await repos.outbox.mark_failed(item.id, "consent withdrawn")
        if envelope.wa_room and not envelope.system:
            # Left, kicked or banned since it was queued (they were told then).
            self._metrics.room_not_relayed.labels("not_member").inc()
        if envelope.notice_id is not None:
            await repos.notices.mark_failed(envelope.notice_id, "consent withdrawn")
            self._metrics.notices.labels("failed").inc()

    async def _after_previous_part(self, repos: Repositories, item: OutboxItem,
                                   envelope: Envelope) -> bool:
        """Parts of a long message go in order: a part waits while the one before it is
        retrying, and is dropped (staff were told about that one) if it failed."""
        assert envelope.event_id is not None
        previous = await repos.outbox.by_key(part_key(envelope.event_id, envelope.part - 1))
        if previous is None or previous.status in ("sent", "cancelled"):
            return True
        if previous.status in ("failed", "dead"):
            await repos.outbox.mark_failed(item.id, "earlier part failed")
            return False
        later = max(previous.next_attempt_at, datetime.now(UTC)) + timedelta(seconds=1)
        await repos.outbox.postpone(item.id, later)
        return False

    # --- in flight ----------------------------------------------------------------------

    def begin(self, confirm_window: timedelta) -> Callable[[Collection[int]],
                                                           Awaitable[set[int]]]:
        async def begin(item_ids: Collection[int]) -> set[int]:
            return await self._db.outbox.begin_attempts(
                item_ids, datetime.now(UTC) + confirm_window)
        return begin

    async def release(self, item_ids: Collection[int]) -> None:
        await self._db.outbox.release(item_ids)

    # --- recording ----------------------------------------------------------------------

    async def record(self, claims: Sequence[Claim], outcomes: Sequence[Outcome]) -> None:
        """The outcomes of a batch, in one transaction; then whoever must be told."""
        gave_up: list[_GaveUp] = []
        retried = 0
        async with self._db.transaction() as repos:
            wamids = {c.item.id: o.wamid for c, o in zip(claims, outcomes, strict=True)
                      if isinstance(o, Sent)}
            hashes = {i: self._privacy.index.wamid(w) for i, w in wamids.items()}
            marked = await repos.outbox.mark_sent_many(hashes)
            accepted = [(c.item, c.envelope, wamids[c.item.id], hashes[c.item.id])
                        for c in claims if c.item.id in marked]
            await self._accepted(repos, accepted)
            for claim, outcome in zip(claims, outcomes, strict=True):
                item = claim.item
                match outcome:
                    case Postponed(seconds=seconds):
                        await repos.outbox.postpone(
                            item.id, datetime.now(UTC) + timedelta(seconds=seconds))
                    case Failed(error=exc):
                        # 413 from Matrix: larger than any WhatsApp attachment.
                        too_large = isinstance(exc, MatrixError) and exc.status == 413
                        error = (f"{exc.status} {exc.code}" if isinstance(exc, GraphError)
                                 else f"matrix {exc.status}" if isinstance(exc, MatrixError)
                                 else type(exc).__name__)
                        if is_transient(exc) and not too_large:
                            await self._retry(repos, item, error)
                            retried += 1
                        else:
                            gave_up += await self._set_aside(
                                repos, item, exc, error, claim.envelope.notice_id,
                                too_large=too_large)
                    case Sent() | Skipped():
                        pass
        self._metrics.outbox_retries.inc(retried)
        self._count(envelope for _, envelope, _, _ in accepted)
        await self._told(gave_up)

    async def _accepted(self, repos: Repositories,
                        accepted: Sequence[tuple[OutboxItem, Envelope, str, WamidHash]]
                        ) -> None:
        """The bookkeeping of sends WhatsApp accepted (each with its wamid and the
        wamid's keyed hash), however we learnt it (Graph's answer or a delivery status):
        the notice log, the message map that receipts and replies need (counted by
        `_count` once committed)."""
        room_links = []
        seal = self._privacy.seal_wamid
        for item, envelope, wamid, wamid_hash in accepted:
            if envelope.notice_id is not None:
                await repos.notices.mark_accepted(envelope.notice_id, wamid_hash)
            if envelope.event_id:
                await repos.messages.link(seal(wamid, wamid_hash), item.room_id,
                                          EventID(envelope.event_id), "out")
            if envelope.wr_event and envelope.wa_room:  # one room event, one wamid per member
                room_links.append((seal(wamid, wamid_hash), item.citizen_id,
                                   RoomID(envelope.wa_room), EventID(envelope.wr_event)))
        await repos.wa_rooms.link_many(room_links)

    def _count(self, envelopes: Iterable[Envelope]) -> None:
        notices = 0
        kinds: Counter[str] = Counter()
        for envelope in envelopes:
            notices += envelope.notice_id is not None
            kinds[envelope.type] += 1
        if notices:
            self._metrics.notices.labels("sent").inc(notices)
        for kind, sent in kinds.items():  # one increment per kind, not per send
            self._metrics.relayed.labels("out", kind).inc(sent)

    async def settle_by_status(self, item_id: int, wamid: str, status: str,
                               error_code: int | None = None) -> bool:
        """Apply a delivery status to outbox row `item_id` if its send is still
        unconfirmed (bridge.whatsapp.outbox.Outbox.settle_by_status)."""
        if status in ACCEPTED_STATUSES:
            async with self._db.transaction() as repos:
                wamid_hash = self._privacy.index.wamid(wamid)
                item = await repos.outbox.confirm_in_flight(item_id, wamid_hash)
                if item is None:
                    return False
                envelope = self.envelope(item)
                await self._accepted(repos, [(item, envelope, wamid, wamid_hash)])
                # Later sends to this citizen may wait behind it (in order): no longer.
                await repos.outbox.bring_forward(item.citizen_id, item.id)
            log.info("outbox #%d: confirmed by a delivery status", item_id)
            self._count([envelope])
            return True
        if status == "failed":
            item = await self._db.outbox.fail_in_flight(item_id, f"status failed {error_code}")
            if item is None:
                return False
            log.warning("outbox #%d: failed per delivery status %s", item_id, error_code)
            await self._told([_GaveUp(item, self.envelope(item).notice_id,
                                      error_title(error_code), code=error_code)])
            return True
        return False

    # --- failures -----------------------------------------------------------------------

    async def _retry(self, repos: Repositories, item: OutboxItem, error: str) -> None:
        """A transient failure: try again after a backoff, however many attempts it takes.
        `error` is a status/code or exception type only: never content or numbers."""
        attempts = item.attempts + 1
        log.warning("outbox #%d: retryable error %s (attempt %d)", item.id, error, attempts)
        await repos.outbox.retry_later(item.id, datetime.now(UTC) + backoff(attempts), error)

    async def _set_aside(self, repos: Repositories, item: OutboxItem, exc: Exception,
                         error: str, notice_id: int | None, *, too_large: bool = False
                         ) -> list[_GaveUp]:
        """A permanent failure: the row becomes a dead letter (an admin may retry it),
        the queue goes on, and whoever waits for the send is told what to do."""
        log.warning("outbox #%d failed for good (%s): set aside as dead letter out-%d",
                    item.id, error, item.id)
        if not await repos.outbox.set_aside(item.id, reason_of(exc), error):
            return []  # cancelled or settled meanwhile
        code: int | None = None
        reason: NotSentReason = "internal"
        if too_large:
            title, reason = mx_text.OUTBOX_TOO_LARGE, "too_large"
        elif isinstance(exc, GraphError):
            title, reason = exc.permanent_title or mx_text.OUTBOX_GRAPH_ERROR, "graph_error"
            code = exc.code
        elif isinstance(exc, MatrixError):
            title = mx_text.OUTBOX_MATRIX_DOWNLOAD_FAILED
        else:
            title = mx_text.OUTBOX_INTERNAL_ERROR
        return [_GaveUp(item, notice_id, title, code=code, reason=reason,
                        dead_letter=f"out-{item.id}")]

    async def _told(self, gave_up: Sequence[_GaveUp]) -> None:
        """Tell whoever waits for a send that failed for good: the notice log, staff
        (with what to do, and the dead letter's id when it is one), the not-sent metric."""
        for g in gave_up:
            if g.notice_id is not None:
                await self._db.notices.mark_failed(g.notice_id, g.title)
                self._metrics.notices.labels("failed").inc()
            advice = TOO_LARGE_ADVICE if g.reason == "too_large" else failure_advice(g.code)
            if g.dead_letter is not None and self.on_dead is not None:
                if g.item.room_id:
                    self._metrics.outbound_not_sent.labels(g.reason).inc()
                # One notice, from bridge.deadletters: the reason, the advice, the id.
                await self.on_dead(g.dead_letter, f"{g.title}. {advice}".rstrip("."))
            elif g.item.room_id:
                self._metrics.outbound_not_sent.labels(g.reason).inc()
                await self._notify(RoomID(g.item.room_id), mx_text.OUTBOX_NOT_SENT_NOTICE.format(
                    title=g.title, advice=advice))
