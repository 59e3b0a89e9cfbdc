"""Durable queues: appservice transactions, inbound events and the WhatsApp outbox.

Everything that arrives is stored before it is acknowledged, and everything that
leaves is stored before the first attempt; these repositories are that storage.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Final, cast

from sqlalchemy import (
    Row,
    Select,
    Table,
    Update,
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    or_,
    select,
    update,
)

from bridge.db.models import InboundRow, OutboxRow, ProcessedTransactionRow, utcnow
from bridge.db.scope import Scope, purge_rows, rowcount
from bridge.errors import NotFound
from bridge.matrix.crypto_parts import TO_DEVICE_WRAPPER, to_device_key
from bridge.model import InboundItem, InboundSource, InboundStatus, OutboxItem, OutboxStatus
from bridge.types import RoomID, WamidHash

# Finished queue rows (and transaction ids) are kept this long to deduplicate redeliveries
# (purged by bridge.retention).
FINISHED_RETENTION: Final = timedelta(days=7)
# Webhook items sent longer ago than this are replays, acknowledged and never queued
# (bridge.whatsapp.webhook): a row is processed after its item was sent, so its key
# outlives the window; the hour covers a clock of Meta's running ahead of ours.
REPLAY_WINDOW: Final = FINISHED_RETENTION - timedelta(hours=1)
FINISHED: tuple[InboundStatus, ...] = ("done", "failed", "dropped")
SETTLED: tuple[OutboxStatus, ...] = ("sent", "failed", "cancelled")
# Outbox idempotency keys of notices of availability: "availability:{notice id}".
NOTICE_KEY_PREFIX = "availability:"

# The statements every outbox batch runs (a fan-out runs thousands of batches), built
# once with their values bound at execution: SQLAlchemy then neither rebuilds them nor
# computes their cache keys again, which cost more than the rows. Plain rows, not ORM
# objects.
_OUTBOX = cast(Table, OutboxRow.__table__)
_DUE_IN_ORDER = (select(*_OUTBOX.c)
                 .where(_OUTBOX.c.status == "pending",
                        _OUTBOX.c.next_attempt_at <= bindparam("now"))
                 .order_by(_OUTBOX.c.id).limit(bindparam("limit")))
_DUE_IN_ORDER_NOT_BUSY = _DUE_IN_ORDER.where(
    _OUTBOX.c.citizen_id.not_in(bindparam("busy", expanding=True)))
_WAITING_ROOM_SENDS = (
    select(_OUTBOX.c.citizen_id, _OUTBOX.c.id, _OUTBOX.c.next_attempt_at)
    .where(_OUTBOX.c.citizen_id.in_(bindparam("citizens", expanding=True)),
           _OUTBOX.c.status == "pending", _OUTBOX.c.next_attempt_at > bindparam("now"),
           _OUTBOX.c.idempotency_key.startswith("wr", autoescape=True)))
_BEGIN_ATTEMPTS = (update(_OUTBOX)
                   .where(_OUTBOX.c.id.in_(bindparam("ids", expanding=True)),
                          _OUTBOX.c.status == "pending")
                   .values(sending_at=bindparam("now"), next_attempt_at=bindparam("confirm_by"),
                           updated_at=bindparam("now"))
                   .returning(_OUTBOX.c.id))
# A send cancelled while in flight did go out: it is marked sent as well.
_UNSETTLED = (select(_OUTBOX.c.id)
              .where(_OUTBOX.c.id.in_(bindparam("ids", expanding=True)),
                     _OUTBOX.c.status.in_(("pending", "cancelled")))
              .with_for_update())  # PostgreSQL: a delivery status waits for this batch
_MARK_SENT = (update(_OUTBOX)
              .where(_OUTBOX.c.id == bindparam("item"))
              .values(status="sent", wamid_hash=bindparam("wamid"),
                      attempts=_OUTBOX.c.attempts + 1, last_error=None, sending_at=None,
                      updated_at=bindparam("now")))


class TransactionRepo:
    """Appservice transactions from the homeserver, deduplicated by txn id and event id."""

    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    async def store(self, txn_id: str, events: Sequence[Mapping[str, Any]], *,
                    seal: Callable[[str, Mapping[str, Any]], str]) -> bool:
        """Record `txn_id` and queue its events, all in one DB transaction; each row's
        payload is `seal(dedupe key, event)` (bridge.matrix.queued encrypts it).

        Returns False, writing nothing, if the transaction was stored before (also by a
        concurrent request). An event id already queued is skipped: Synapse can send
        the same event in two transactions. Events without an event id (ephemeral or
        to-device data) are keyed by their position in the transaction.
        """
        now = utcnow()
        scope = self._scope
        async with scope.session() as session:
            claim = (
                scope.insert(ProcessedTransactionRow)
                .values(txn_id=txn_id, received_at=now)
                .on_conflict_do_nothing(index_elements=["txn_id"])
                .returning(ProcessedTransactionRow.txn_id)
            )
            if await session.scalar(claim) is None:
                return False
            keys = [_event_key(txn_id, i, event) for i, event in enumerate(events)]
            rows = [
                {
                    "source": "matrix",
                    "dedupe_key": key,
                    "lane": event_lane(event),
                    "payload": seal(key, event),
                    "status": "pending",
                    "attempts": 0,
                    "created_at": now,
                }
                for key, event in zip(keys, events, strict=True)
            ]
            if rows:
                insert = scope.insert(InboundRow).on_conflict_do_nothing(
                    index_elements=["source", "dedupe_key"]
                )
                await session.execute(insert, rows)
        return True

    async def seen(self, txn_id: str) -> bool:
        async with self._scope.session() as session:
            found = await session.get(ProcessedTransactionRow, txn_id)
            return found is not None

    async def purge(self, before: datetime, *, dry_run: bool = False) -> int:
        """Forget transaction ids received before `before`; returns how many."""
        return await purge_rows(self._scope, ProcessedTransactionRow,
                                ProcessedTransactionRow.received_at < before, dry_run=dry_run)


def event_lane(event: Mapping[str, Any]) -> str:
    """The worker lane of an appservice event: its room's events are handled in order;
    a to-device event (bridge.matrix.crypto_feed) in its recipient's lane."""
    to_device = event.get(TO_DEVICE_WRAPPER)
    if isinstance(to_device, dict):
        return f"to-device:{to_device.get('to_user_id')}"
    return str(event.get("room_id") or "")


def _event_key(txn_id: str, index: int, event: Mapping[str, Any]) -> str:
    to_device = event.get(TO_DEVICE_WRAPPER)
    if isinstance(to_device, dict):
        return to_device_key(to_device)
    event_id = event.get("event_id")
    return event_id if isinstance(event_id, str) and event_id else f"txn:{txn_id}:{index}"


class InboundRepo:
    """Events waiting to be handled, from Matrix or from WhatsApp, in arrival order."""

    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    async def enqueue(
        self,
        source: InboundSource,
        key: str,
        payload: str,
        *,
        lane: str = "",
        status: InboundStatus = "pending",
        hold_until: datetime | None = None,
        citizen_id: int | None = None,
    ) -> int | None:
        """Queue an item; returns its id, or None if (source, key) was queued before.

        Items of one `lane` are processed in order; "" runs alone, after all older items.
        """
        stmt = (
            self._scope.insert(InboundRow)
            .values(
                source=source, dedupe_key=key, lane=lane, payload=payload, status=status,
                attempts=0,
                hold_until=hold_until, citizen_id=citizen_id, created_at=utcnow(),
            )
            .on_conflict_do_nothing(index_elements=["source", "dedupe_key"])
            .returning(InboundRow.id)
        )
        async with self._scope.session() as session:
            return cast(int | None, await session.scalar(stmt))

    async def enqueue_many(self, rows: list[tuple[InboundSource, str, str, str]]) -> set[str]:
        """Queue pending items (source, key, payload, lane), in this order, in one
        statement; those queued before are skipped. Returns the lanes that got one."""
        if not rows:
            return set()
        now = utcnow()
        stmt = (
            self._scope.insert(InboundRow)
            .values([dict(source=source, dedupe_key=key, lane=lane, payload=payload,
                          status="pending", attempts=0, hold_until=None,
                          citizen_id=None, created_at=now)
                     for source, key, payload, lane in rows])
            .on_conflict_do_nothing(index_elements=["source", "dedupe_key"])
            .returning(InboundRow.lane)
        )
        async with self._scope.session() as session:
            return set((await session.scalars(stmt)).all())

    async def get(self, item_id: int) -> InboundItem | None:
        async with self._scope.session() as session:
            row = await session.get(InboundRow, item_id)
            return None if row is None else _inbound(row)

    async def pending(
        self, source: InboundSource | None = None, limit: int = 100
    ) -> list[InboundItem]:
        """The oldest pending items, oldest first (optionally of one source)."""
        stmt = select(InboundRow).where(InboundRow.status == "pending")
        if source is not None:
            stmt = stmt.where(InboundRow.source == source)
        async with self._scope.session() as session:
            rows = await session.scalars(stmt.order_by(InboundRow.id).limit(limit))
            return [_inbound(r) for r in rows]

    async def lane_heads(
        self, source: InboundSource, busy: Collection[str] = (), limit: int = 100
    ) -> list[InboundItem]:
        """The oldest pending item of each lane not in `busy`, oldest first — except that
        lanes whose head failed before (a retry) come after the others: a retry keeps
        its place in its lane, not its priority over other lanes (the global lane keeps
        its place: it runs after everything older)."""
        heads = (
            select(func.min(InboundRow.id))
            .where(InboundRow.source == source, InboundRow.status == "pending",
                   InboundRow.lane.not_in(busy))
            .group_by(InboundRow.lane)
        )
        retried = case((and_(InboundRow.attempts > 0, InboundRow.lane != ""), 1), else_=0)
        stmt = (select(InboundRow).where(InboundRow.id.in_(heads))
                .order_by(retried, InboundRow.id))
        async with self._scope.session() as session:
            return [_inbound(r) for r in await session.scalars(stmt.limit(limit))]

    async def complete(
        self, item: InboundItem, status: InboundStatus | None, error: str | None = None,
        *, attempts: int | None = None, running: int | None = None,
    ) -> list[InboundItem]:
        """Record `item`'s outcome (None: its handler already did) and return what its
        lane runs next, in one transaction: the two oldest pending items of the lane or
        of the global lane "" (the global lane runs after everything older), but `item`
        and the item `running` already (bridge.worker overlaps them)."""
        async with self._scope.session() as session:
            if status is not None:
                done = await session.execute(self._status_update(item.id, status, error,
                                                                 attempts))
                if rowcount(done) == 0:
                    raise NotFound(f"inbound item {item.id} not found")
            rows = await session.scalars(_next_in_lane(item, running))
            return [_inbound(row) for row in rows]

    async def set_aside(self, item: InboundItem, reason: str, error: str, attempts: int
                        ) -> list[InboundItem]:
        """Make `item` a dead letter (a permanent failure, class `reason`) and return what
        its lane runs next, in one transaction (as `complete`): the lane goes on."""
        now = utcnow()
        stmt = (
            update(InboundRow).where(InboundRow.id == item.id)
            .values(status="dead", dead_reason=reason, error=error, attempts=attempts,
                    first_failed_at=func.coalesce(InboundRow.first_failed_at, now),
                    last_failed_at=now, processed_at=None)
        )
        async with self._scope.session() as session:
            if rowcount(await session.execute(stmt)) == 0:
                raise NotFound(f"inbound item {item.id} not found")
            rows = await session.scalars(_next_in_lane(item))
            return [_inbound(row) for row in rows]

    async def note_failure(self, item_id: int, error: str, attempts: int) -> None:
        """Record a transient failure of a pending item (it stays pending; the worker
        retries it after a backoff): attempts so far, the error class, when."""
        now = utcnow()
        stmt = (
            update(InboundRow).where(InboundRow.id == item_id)
            .values(attempts=attempts, error=error, last_failed_at=now,
                    first_failed_at=func.coalesce(InboundRow.first_failed_at, now))
        )
        async with self._scope.session() as session:
            if rowcount(await session.execute(stmt)) == 0:
                raise NotFound(f"inbound item {item_id} not found")

    async def count_lane(self, source: InboundSource, lane: str) -> dict[str, int]:
        """How many items of a lane are in each status."""
        stmt = (
            select(InboundRow.status, func.count())
            .where(InboundRow.source == source, InboundRow.lane == lane)
            .group_by(InboundRow.status)
        )
        async with self._scope.session() as session:
            return {status: int(n) for status, n in (await session.execute(stmt)).all()}

    async def delete_lane(self, source: InboundSource, lane: str, *,
                          keep_pending: bool = False) -> int:
        """Delete every item of a lane, whatever its status (erasure), or all but the
        pending ones (`keep_pending`); returns how many."""
        stmt = delete(InboundRow).where(InboundRow.source == source, InboundRow.lane == lane)
        if keep_pending:
            stmt = stmt.where(InboundRow.status != "pending")
        async with self._scope.session() as session:
            return rowcount(await session.execute(stmt))

    async def after(self, item_id: int, limit: int = 100) -> list[InboundItem]:
        """Items with an id above `item_id`, oldest first, whatever their status
        (lets a watcher such as `civic-bridge demo` follow the queue)."""
        stmt = select(InboundRow).where(InboundRow.id > item_id)
        async with self._scope.session() as session:
            rows = await session.scalars(stmt.order_by(InboundRow.id).limit(limit))
            return [_inbound(r) for r in rows]

    async def unsealed(self, source: InboundSource, limit: int = 500) -> list[InboundItem]:
        """Items of `source`, in any status, whose payload is still a JSON object in
        clear (queued by a version that stored it so), oldest first."""
        stmt = (select(InboundRow)
                .where(InboundRow.source == source, InboundRow.payload.startswith("{"))
                .order_by(InboundRow.id).limit(limit))
        async with self._scope.session() as session:
            return [_inbound(r) for r in await session.scalars(stmt)]

    async def unfinished(self, source: InboundSource, after_id: int = 0,
                         limit: int = 500) -> list[InboundItem]:
        """Items of `source` not finished yet (pending, held, dead letters) with an id
        above `after_id`, oldest first: a conversion at start pages through them."""
        stmt = (select(InboundRow)
                .where(InboundRow.source == source, InboundRow.id > after_id,
                       InboundRow.status.not_in(FINISHED))
                .order_by(InboundRow.id).limit(limit))
        async with self._scope.session() as session:
            return [_inbound(r) for r in await session.scalars(stmt)]

    async def reseal(self, payloads: Sequence[tuple[int, str, str]]) -> int:
        """Replace payloads: (item id, old payload, new payload), each only if the row
        still holds the old one; one transaction. Returns how many were replaced."""
        done = 0
        async with self._scope.session() as session:
            for item_id, old, new in payloads:
                stmt = (update(InboundRow)
                        .where(InboundRow.id == item_id, InboundRow.payload == old)
                        .values(payload=new))
                done += rowcount(await session.execute(stmt))
        return done

    async def held_for(self, citizen_id: int) -> list[InboundItem]:
        """A citizen's messages held until they decide on consent, oldest first."""
        stmt = (
            select(InboundRow)
            .where(InboundRow.citizen_id == citizen_id, InboundRow.status == "held")
            .order_by(InboundRow.id)
        )
        async with self._scope.session() as session:
            return [_inbound(r) for r in await session.scalars(stmt)]

    async def hold(self, item_id: int, citizen_id: int, until: datetime) -> None:
        """Park an item for a citizen who has not consented yet, until `until` at most."""
        await self._update(item_id, status="held", citizen_id=citizen_id, hold_until=until)

    async def set_status(
        self, item_id: int, status: InboundStatus, error: str | None = None,
        *, attempts: int | None = None,
    ) -> None:
        """Move an item to `status` (and record `attempts` if given); finished statuses
        record when processing ended."""
        async with self._scope.session() as session:
            result = await session.execute(self._status_update(item_id, status, error, attempts))
            if rowcount(result) == 0:
                raise NotFound(f"inbound item {item_id} not found")

    @staticmethod
    def _status_update(item_id: int, status: InboundStatus, error: str | None,
                       attempts: int | None) -> Update:
        values: dict[str, Any] = {
            "status": status, "error": error,
            "processed_at": utcnow() if status in FINISHED else None,
        }
        if attempts is not None:
            values["attempts"] = attempts
        return update(InboundRow).where(InboundRow.id == item_id).values(**values)

    async def note_attempt(self, item_id: int, error: str) -> int:
        """Count a failed attempt that will be retried; returns the attempts so far."""
        stmt = (
            update(InboundRow)
            .where(InboundRow.id == item_id)
            .values(attempts=InboundRow.attempts + 1, error=error)
            .returning(InboundRow.attempts)
        )
        async with self._scope.session() as session:
            attempts = await session.scalar(stmt)
        if attempts is None:
            raise NotFound(f"inbound item {item_id} not found")
        return int(attempts)

    async def release_held(self, citizen_id: int) -> int:
        """Make a citizen's held items pending again, in their original order; returns how many."""
        stmt = (
            update(InboundRow)
            .where(InboundRow.citizen_id == citizen_id, InboundRow.status == "held")
            .values(status="pending", hold_until=None)
        )
        async with self._scope.session() as session:
            return rowcount(await session.execute(stmt))

    async def purge_expired_holds(self, now: datetime, *, dry_run: bool = False) -> int:
        """Delete held items whose hold ran out (privacy: `consent.hold_hours`)."""
        return await purge_rows(self._scope, InboundRow, InboundRow.status == "held",
                                InboundRow.hold_until < now, dry_run=dry_run)

    async def purge_finished(self, before: datetime, *, dry_run: bool = False) -> int:
        """Delete finished items processed before `before` (they hold message payloads)."""
        return await purge_rows(self._scope, InboundRow, InboundRow.status.in_(FINISHED),
                                InboundRow.processed_at < before, dry_run=dry_run)

    async def of_citizen(self, citizen_id: int, lanes: Collection[str]) -> list[InboundItem]:
        """Every WhatsApp item of a citizen, whatever its status, oldest first: those
        linked to them (held) and those in their `lanes` (their own export)."""
        stmt = select(InboundRow).where(
            or_(InboundRow.citizen_id == citizen_id,
                and_(InboundRow.source == "whatsapp", InboundRow.lane.in_(lanes))))
        async with self._scope.session() as session:
            return [_inbound(r) for r in await session.scalars(stmt.order_by(InboundRow.id))]

    async def _update(self, item_id: int, **values: Any) -> None:
        stmt = update(InboundRow).where(InboundRow.id == item_id).values(**values)
        async with self._scope.session() as session:
            if rowcount(await session.execute(stmt)) == 0:
                raise NotFound(f"inbound item {item_id} not found")


def _next_in_lane(item: InboundItem, running: int | None = None) -> Select[InboundRow]:
    """The two oldest pending items of `item`'s lane or of the global lane, but `item`
    and `running`."""
    return (
        select(InboundRow)
        .where(InboundRow.source == item.source, InboundRow.status == "pending",
               InboundRow.lane.in_({item.lane, ""}),
               InboundRow.id.not_in({item.id, running or item.id}))
        .order_by(InboundRow.id).limit(2)
    )


def _inbound(row: InboundRow) -> InboundItem:
    return InboundItem(
        id=row.id, source=cast(InboundSource, row.source), dedupe_key=row.dedupe_key,
        lane=row.lane, payload=row.payload, status=cast(InboundStatus, row.status),
        attempts=row.attempts,
        error=row.error, hold_until=row.hold_until, citizen_id=row.citizen_id,
        created_at=row.created_at, processed_at=row.processed_at,
    )


class OutboxRepo:
    """Messages to WhatsApp: persisted first, retried with backoff, and marked in flight
    (`sending_at`) while an attempt runs, so that a send cut short by a crash is settled
    by its delivery status instead of being sent again at once (bridge.whatsapp.outbox)."""

    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    async def add(
        self, idempotency_key: str, citizen_id: int, room_id: RoomID, payload: str,
        *, not_before: datetime | None = None,
    ) -> int | None:
        """Queue a send; returns its id, or None if `idempotency_key` was queued before."""
        now = utcnow()
        stmt = (
            self._scope.insert(OutboxRow)
            .values(
                idempotency_key=idempotency_key, citizen_id=citizen_id, room_id=room_id,
                payload=payload, status="pending", attempts=0,
                next_attempt_at=not_before or now, created_at=now, updated_at=now,
            )
            .on_conflict_do_nothing(index_elements=["idempotency_key"])
            .returning(OutboxRow.id)
        )
        async with self._scope.session() as session:
            return cast(int | None, await session.scalar(stmt))

    async def add_many(self, rows: Sequence[tuple[str, int, RoomID, str]]) -> None:
        """Queue many sends, (idempotency key, citizen id, room id, payload) each, in one
        statement and in the given order (a citizen's sends go out in id order); a key
        queued before is skipped."""
        now = utcnow()
        await self._scope.insert_many(OutboxRow, [
            {"idempotency_key": key, "citizen_id": citizen_id, "room_id": room_id,
             "payload": payload, "status": "pending", "attempts": 0,
             "next_attempt_at": now, "created_at": now, "updated_at": now}
            for key, citizen_id, room_id, payload in rows])

    async def get(self, item_id: int) -> OutboxItem | None:
        async with self._scope.session() as session:
            row = await session.get(OutboxRow, item_id)
            return None if row is None else _outbox(row)

    async def by_key(self, idempotency_key: str) -> OutboxItem | None:
        """The send queued under `idempotency_key` (for a staff message: its event id)."""
        async with self._scope.session() as session:
            row = await session.scalar(
                select(OutboxRow).where(OutboxRow.idempotency_key == idempotency_key))
            return None if row is None else _outbox(row)

    async def by_wamid(self, wamid_hash: WamidHash) -> OutboxItem | None:
        """The send a WhatsApp delivery status refers to (by its wamid's keyed hash)."""
        async with self._scope.session() as session:
            row = await session.scalar(select(OutboxRow).where(
                OutboxRow.wamid_hash == wamid_hash))
            return None if row is None else _outbox(row)

    async def sending_to(self, citizen_id: int, since: datetime, until: datetime) -> bool:
        """Whether a send to the citizen that began between `since` and `until` has no
        outcome (the wamid Graph answered) recorded yet."""
        stmt = select(exists().where(
            OutboxRow.citizen_id == citizen_id, OutboxRow.status == "pending",
            OutboxRow.sending_at >= since, OutboxRow.sending_at <= until))
        async with self._scope.session() as session:
            return bool(await session.scalar(stmt))

    async def due(self, now: datetime, limit: int = 50) -> list[OutboxItem]:
        """Pending sends whose time has come, the longest-waiting first."""
        stmt = (
            select(OutboxRow)
            .where(OutboxRow.status == "pending", OutboxRow.next_attempt_at <= now)
            .order_by(OutboxRow.next_attempt_at, OutboxRow.id)
            .limit(limit)
        )
        async with self._scope.session() as session:
            return [_outbox(r) for r in await session.scalars(stmt)]

    async def lane_heads(self, now: datetime, limit: int, busy: Collection[int] = ()
                         ) -> list[OutboxItem]:
        """A batch to send at once: of the first `limit` due sends in queue order to
        citizens not in `busy` (those with a batch still in flight), each citizen's
        oldest (a citizen's sends go one after another, in order). Queue order, not due
        time: a send due again after a wait (a release, a retry) still goes before the
        citizen's later ones."""
        params: dict[str, Any] = {"now": now, "limit": limit}
        if busy:
            params["busy"] = list(busy)
        stmt = _DUE_IN_ORDER_NOT_BUSY if busy else _DUE_IN_ORDER
        heads: dict[int, OutboxItem] = {}
        async with self._scope.session() as session:
            for row in await session.execute(stmt, params):
                if row.citizen_id not in heads:  # a citizen's later rows: not converted
                    heads[row.citizen_id] = _outbox(row)
        return list(heads.values())

    async def waiting_room_sends(self, citizen_ids: Collection[int], now: datetime
                                 ) -> list[tuple[int, int, datetime]]:
        """(citizen id, outbox id, next due) of the room sends to these citizens that
        are pending but not due yet (backing off)."""
        if not citizen_ids:
            return []
        params = {"citizens": list(citizen_ids), "now": now}
        async with self._scope.session() as session:
            return [(c, i, n) for c, i, n in
                    (await session.execute(_WAITING_ROOM_SENDS, params)).all()]

    async def begin_attempts(self, item_ids: Collection[int], confirm_by: datetime
                             ) -> set[int]:
        """`begin_attempt` for a batch, in one write: the ids now in flight (those still
        pending)."""
        if not item_ids:
            return set()
        params = {"ids": list(item_ids), "now": utcnow(), "confirm_by": confirm_by}
        async with self._scope.session() as session:
            return set((await session.scalars(_BEGIN_ATTEMPTS, params)).all())

    async def release(self, item_ids: Collection[int]) -> None:
        """Sends marked in flight that never reached Graph (their batch was stopped):
        due again at once."""
        if not item_ids:
            return
        now = utcnow()
        stmt = (update(OutboxRow)
                .where(OutboxRow.id.in_(item_ids), OutboxRow.status == "pending",
                       OutboxRow.sending_at.is_not(None))
                .values(sending_at=None, next_attempt_at=now, updated_at=now))
        async with self._scope.session() as session:
            await session.execute(stmt)

    async def bring_forward(self, citizen_id: int, after_id: int) -> int:
        """Make a citizen's sends queued after `after_id` and never attempted due now
        (they were postponed behind it; each is checked again before it goes)."""
        now = utcnow()
        stmt = (update(OutboxRow)
                .where(OutboxRow.citizen_id == citizen_id, OutboxRow.id > after_id,
                       OutboxRow.status == "pending", OutboxRow.attempts == 0,
                       OutboxRow.sending_at.is_(None), OutboxRow.next_attempt_at > now)
                .values(next_attempt_at=now, updated_at=now))
        async with self._scope.session() as session:
            return rowcount(await session.execute(stmt))

    async def mark_sent_many(self, sent: Mapping[int, WamidHash]) -> set[int]:
        """`mark_sent` for a batch (outbox id -> wamid hash), in one write: the ids
        marked; the others were settled already (by a delivery status)."""
        if not sent:
            return set()
        now = utcnow()
        async with self._scope.session() as session:
            marked = set((await session.scalars(_UNSETTLED, {"ids": list(sent)})).all())
            if marked:
                # One executemany of one statement (a CASE over the batch was rebuilt
                # for every batch).
                await session.execute(_MARK_SENT, [
                    {"item": i, "wamid": sent[i], "now": now} for i in marked])
        return marked

    async def begin_attempt(self, item_id: int, confirm_by: datetime) -> bool:
        """Record that a send is going out now, in one committed write, right before
        the request that can create the message: `sending_at` is set and the next
        attempt moves to `confirm_by`, so a crash mid-send leaves the row waiting for its
        delivery status until then.

        False (nothing written) if the row is no longer pending (cancelled meanwhile).
        """
        return item_id in await self.begin_attempts([item_id], confirm_by)

    async def mark_sent(self, item_id: int, wamid_hash: WamidHash) -> bool:
        """Graph accepted the send. False, writing nothing, if the row was settled
        already (a delivery status confirmed or failed it first); a send cancelled while
        in flight did go out, so it is marked sent. NotFound if there is no such row."""
        if await self.mark_sent_many({item_id: wamid_hash}):
            return True
        if await self.get(item_id) is None:
            raise NotFound(f"outbox item {item_id} not found")
        return False

    async def retry_later(self, item_id: int, next_at: datetime, error: str) -> None:
        """Count a transient failure (429, 5xx, network) and schedule the next attempt."""
        now = utcnow()
        await self._update(
            item_id, attempts=OutboxRow.attempts + 1, next_attempt_at=next_at, last_error=error,
            sending_at=None, last_failed_at=now,
            first_failed_at=func.coalesce(OutboxRow.first_failed_at, now),
        )

    async def set_aside(self, item_id: int, reason: str, error: str) -> bool:
        """A permanent failure of a pending send (its payload no longer decrypts, Graph
        refused it): a dead letter, until an admin retries or discards it. False,
        writing nothing, if the row is no longer pending."""
        now = utcnow()
        stmt = (
            update(OutboxRow)
            .where(OutboxRow.id == item_id, OutboxRow.status == "pending")
            .values(status="dead", dead_reason=reason, last_error=error, sending_at=None,
                    attempts=OutboxRow.attempts + 1, updated_at=now, last_failed_at=now,
                    first_failed_at=func.coalesce(OutboxRow.first_failed_at, now))
        )
        async with self._scope.session() as session:
            return rowcount(await session.execute(stmt)) > 0
    async def postpone(self, item_id: int, next_at: datetime) -> None:
        """Not attempted now (it waits for another send): no attempt is counted."""
        await self._update(item_id, next_attempt_at=next_at)

    async def mark_failed(self, item_id: int, error: str) -> None:
        """A permanent failure: never retried; staff are told by the caller."""
        await self._update(
            item_id, status="failed", attempts=OutboxRow.attempts + 1, last_error=error,
            sending_at=None,
        )

    async def confirm_in_flight(self, item_id: int, wamid_hash: WamidHash
                                ) -> OutboxItem | None:
        """A delivery status shows that the send in flight was accepted (its wamid's hash):
        mark it sent. None, writing nothing, unless the row is pending with an attempt
        in flight (`sending_at` set) — anything else was settled or never sent."""
        return await self._settle_in_flight(item_id, status="sent", wamid_hash=wamid_hash,
                                            last_error=None)

    async def fail_in_flight(self, item_id: int, error: str) -> OutboxItem | None:
        """A `failed` status for the send in flight: a permanent failure (as
        `confirm_in_flight`, None unless that send was still unconfirmed)."""
        return await self._settle_in_flight(item_id, status="failed", last_error=error)

    async def _settle_in_flight(self, item_id: int, **values: Any) -> OutboxItem | None:
        stmt = (
            update(OutboxRow)
            .where(OutboxRow.id == item_id, OutboxRow.status == "pending",
                   OutboxRow.sending_at.is_not(None))
            .values(attempts=OutboxRow.attempts + 1, sending_at=None, updated_at=utcnow(),
                    **values)
            .returning(OutboxRow)
        )
        async with self._scope.session() as session:
            row = await session.scalar(stmt)
            return None if row is None else _outbox(row)

    async def cancel_for_citizen(self, citizen_id: int, *, notices: bool = False) -> int:
        """Cancel a citizen's unsent messages; returns how many.

        Notices of availability (keys starting with NOTICE_KEY_PREFIX) have a consent of
        their own: `notices=False` (a chat opt-out) cancels everything else, `notices=True`
        (a notices opt-out) cancels only them."""
        is_notice = OutboxRow.idempotency_key.startswith(NOTICE_KEY_PREFIX, autoescape=True)
        stmt = (
            update(OutboxRow)
            .where(OutboxRow.citizen_id == citizen_id, OutboxRow.status == "pending",
                   is_notice if notices else ~is_notice)
            .values(status="cancelled", updated_at=utcnow())
        )
        async with self._scope.session() as session:
            return rowcount(await session.execute(stmt))

    async def purge_settled(self, before: datetime, *, dry_run: bool = False) -> int:
        """Delete sends settled (sent, failed, cancelled) before `before`; never a pending
        one, nor one with an attempt in flight, nor a dead letter (`DeadLetterRepo.purge`)."""
        return await purge_rows(self._scope, OutboxRow, OutboxRow.status.in_(SETTLED),
                                OutboxRow.sending_at.is_(None), OutboxRow.updated_at < before,
                                dry_run=dry_run)

    async def for_citizen(self, citizen_id: int) -> list[OutboxItem]:
        """A citizen's sends, whatever their status, oldest first (their own export)."""
        stmt = select(OutboxRow).where(OutboxRow.citizen_id == citizen_id).order_by(OutboxRow.id)
        async with self._scope.session() as session:
            return [_outbox(r) for r in await session.scalars(stmt)]

    async def depth(self) -> int:
        """How many sends are pending (a metric and a readiness signal)."""
        stmt = select(func.count()).select_from(OutboxRow).where(OutboxRow.status == "pending")
        async with self._scope.session() as session:
            return int(await session.scalar(stmt) or 0)

    async def _update(self, item_id: int, **values: Any) -> None:
        stmt = update(OutboxRow).where(OutboxRow.id == item_id)
        stmt = stmt.values(updated_at=utcnow(), **values)
        async with self._scope.session() as session:
            if rowcount(await session.execute(stmt)) == 0:
                raise NotFound(f"outbox item {item_id} not found")


def _outbox(row: OutboxRow | Row[Any]) -> OutboxItem:
    return OutboxItem(
        id=row.id, idempotency_key=row.idempotency_key, citizen_id=row.citizen_id,
        room_id=RoomID(row.room_id), payload=row.payload, status=cast(OutboxStatus, row.status),
        attempts=row.attempts, next_attempt_at=row.next_attempt_at, last_error=row.last_error,
        wamid_hash=WamidHash(row.wamid_hash) if row.wamid_hash else None,
        created_at=row.created_at, updated_at=row.updated_at,
        sending_at=row.sending_at,
    )
