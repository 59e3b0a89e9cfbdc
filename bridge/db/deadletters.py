"""Dead letters: queued items (inbound or outbox) set aside after a permanent failure.

They stay in their queue row with status "dead", payload still encrypted, until an
admin retries them (back to "pending", with a fresh count of attempts) or discards them
(inbound: "dropped", outbox: "cancelled"; the ordinary retention then removes them), or
until retention.dead_letters_days after their last failure (`purge`). A dead letter's
id names its queue and row: "in-12" (inbound #12) or "out-7" (outbox #7).
"""

from __future__ import annotations

import builtins
import re
from datetime import datetime
from typing import Any, Final, Literal

from sqlalchemy import delete, func, select, update

from bridge.db.models import InboundRow, OutboxRow, utcnow
from bridge.db.queues import NOTICE_KEY_PREFIX
from bridge.db.scope import Scope
from bridge.model import DeadLetter
from bridge.types import RoomID

_ID: Final = re.compile(r"(in|out)-([1-9][0-9]{0,17})")
Queue = Literal["in", "out"]


def parse_id(dead_letter_id: str) -> tuple[Queue, int] | None:
    """("in"|"out", row id) of a dead-letter id; None if it is not one."""
    match = _ID.fullmatch(dead_letter_id)
    if match is None:
        return None
    return ("in" if match.group(1) == "in" else "out"), int(match.group(2))


def inbound_lane_kind(source: str, lane: str) -> str:
    """What an inbound lane is, without naming it: room, citizen, statuses or global."""
    if not lane:
        return "global"
    if source == "matrix":
        return "room"
    if lane.startswith("citizen:"):
        return "citizen"
    return "statuses" if lane.split(":", 1)[0] == "statuses" else "other"


def _from_inbound(row: InboundRow) -> DeadLetter:
    room = RoomID(row.lane) if row.source == "matrix" and row.lane.startswith("!") else None
    at = row.last_failed_at or row.created_at
    return DeadLetter(
        id=f"in-{row.id}", source=row.source, lane_kind=inbound_lane_kind(row.source, row.lane),
        reason=row.dead_reason or "internal", error=row.error, attempts=row.attempts,
        first_failed_at=row.first_failed_at or at, last_failed_at=at, room_id=room,
        citizen_id=row.citizen_id, lane=row.lane)


def _from_outbox(row: OutboxRow) -> DeadLetter:
    if row.idempotency_key.startswith(NOTICE_KEY_PREFIX):
        kind = "notice"
    else:
        kind = "staff" if row.room_id else "system"
    at = row.last_failed_at or row.updated_at
    return DeadLetter(
        id=f"out-{row.id}", source="outbox", lane_kind=kind,
        reason=row.dead_reason or "internal", error=row.last_error, attempts=row.attempts,
        first_failed_at=row.first_failed_at or at, last_failed_at=at,
        room_id=RoomID(row.room_id) if row.room_id else None, citizen_id=row.citizen_id)


class DeadLetterRepo:
    """Lists, counts, retries and discards dead letters of both queues."""

    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    async def list(self, limit: int = 1000) -> list[DeadLetter]:
        """Dead letters, the oldest failure first (at most `limit` of each queue)."""
        async with self._scope.session() as session:
            inbound = await session.scalars(
                select(InboundRow).where(InboundRow.status == "dead")
                .order_by(InboundRow.id).limit(limit))
            letters = [_from_inbound(r) for r in inbound]
            outbox = await session.scalars(
                select(OutboxRow).where(OutboxRow.status == "dead")
                .order_by(OutboxRow.id).limit(limit))
            letters += [_from_outbox(r) for r in outbox]
        return sorted(letters, key=lambda d: (d.first_failed_at, d.id))

    async def count(self) -> int:
        """How many dead letters there are now (the gauge)."""
        async with self._scope.session() as session:
            inbound = await session.scalar(
                select(func.count()).select_from(InboundRow).where(InboundRow.status == "dead"))
            outbox = await session.scalar(
                select(func.count()).select_from(OutboxRow).where(OutboxRow.status == "dead"))
        return int(inbound or 0) + int(outbox or 0)

    async def purge(self, before: datetime, *, dry_run: bool = False) -> builtins.list[str]:
        """Delete dead letters whose last failure was before `before` (nobody retried or
        discarded them within retention.dead_letters_days); returns their ids."""
        inbound_at = func.coalesce(InboundRow.last_failed_at, InboundRow.created_at)
        outbox_at = func.coalesce(OutboxRow.last_failed_at, OutboxRow.updated_at)
        dead_in = (InboundRow.status == "dead", inbound_at < before)
        dead_out = (OutboxRow.status == "dead", outbox_at < before)
        async with self._scope.session() as session:
            ins = list(await session.scalars(select(InboundRow.id).where(*dead_in)))
            outs = list(await session.scalars(select(OutboxRow.id).where(*dead_out)))
            if not dry_run:
                # The same conditions again: a row retried meanwhile is not deleted.
                if ins:
                    await session.execute(delete(InboundRow).where(
                        InboundRow.id.in_(ins), *dead_in))
                if outs:
                    await session.execute(delete(OutboxRow).where(
                        OutboxRow.id.in_(outs), *dead_out))
        return [f"in-{i}" for i in sorted(ins)] + [f"out-{o}" for o in sorted(outs)]

    async def get(self, dead_letter_id: str) -> DeadLetter | None:
        """The dead letter with this id; None if there is none (or it is not dead)."""
        parsed = parse_id(dead_letter_id)
        if parsed is None:
            return None
        queue, row_id = parsed
        async with self._scope.session() as session:
            if queue == "in":
                row = await session.get(InboundRow, row_id)
                return _from_inbound(row) if row is not None and row.status == "dead" else None
            out = await session.get(OutboxRow, row_id)
            return _from_outbox(out) if out is not None and out.status == "dead" else None

    async def retry(self, dead_letter_id: str) -> DeadLetter | None:
        """Put a dead letter back in its queue as pending (a fresh run of attempts);
        returns it as it was, or None if there is no such dead letter."""
        return await self._settle(dead_letter_id, retry=True)

    async def discard(self, dead_letter_id: str) -> DeadLetter | None:
        """Give a dead letter up for good (an admin decided); returns it as it was, or
        None if there is no such dead letter."""
        return await self._settle(dead_letter_id, retry=False)

    async def _settle(self, dead_letter_id: str, *, retry: bool) -> DeadLetter | None:
        parsed = parse_id(dead_letter_id)
        if parsed is None:
            return None
        queue, row_id = parsed
        now = utcnow()
        fresh: dict[str, Any] = {"attempts": 0, "first_failed_at": None,
                                 "last_failed_at": None, "dead_reason": None}
        async with self._scope.session() as session:
            if queue == "in":
                row = await session.get(InboundRow, row_id)
                if row is None or row.status != "dead":
                    return None
                letter = _from_inbound(row)
                values: dict[str, Any] = (
                    {"status": "pending", **fresh} if retry
                    else {"status": "dropped", "processed_at": now})
                await session.execute(update(InboundRow).where(
                    InboundRow.id == row_id, InboundRow.status == "dead").values(**values))
                return letter
            out = await session.get(OutboxRow, row_id)
            if out is None or out.status != "dead":
                return None
            letter = _from_outbox(out)
            values = ({"status": "pending", "next_attempt_at": now, "sending_at": None,
                       **fresh} if retry else {"status": "cancelled"})
            await session.execute(update(OutboxRow).where(
                OutboxRow.id == row_id, OutboxRow.status == "dead")
                .values(updated_at=now, **values))
            return letter
