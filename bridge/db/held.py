"""Held staff messages, mutes and WhatsApp reactions: small per-event and per-member
state with tables of their own, so finding them is a query, not a scan of `kv`."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, or_, select

from bridge.db.models import HeldStaffMessageRow, MuteRow, ReactionRow, utcnow
from bridge.db.scope import Scope, purge_rows, rowcount
from bridge.model import HeldStaffMessage
from bridge.types import EventID, RoomID, UserID


class HeldRepo:
    """Staff messages held until confirmed (bridge.whatsapp.outbound)."""

    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    async def add(self, event_id: EventID, room_id: RoomID, held_at: datetime,
                  payloads_ct: str) -> None:
        """Hold an event (again: the first hold is kept, a retried event holds once)."""
        stmt = (self._scope.insert(HeldStaffMessageRow)
                .values(event_id=event_id, room_id=room_id, held_at=held_at,
                        payloads_ct=payloads_ct)
                .on_conflict_do_nothing())
        async with self._scope.session() as session:
            await session.execute(stmt)

    async def get(self, event_id: EventID) -> HeldStaffMessage | None:
        async with self._scope.session() as session:
            row = await session.get(HeldStaffMessageRow, event_id)
            return None if row is None else _held(row)

    async def delete(self, event_id: EventID) -> bool:
        """Forget a hold; False if there was none (released or dropped already)."""
        stmt = delete(HeldStaffMessageRow).where(HeldStaffMessageRow.event_id == event_id)
        async with self._scope.session() as session:
            return rowcount(await session.execute(stmt)) == 1

    async def purge(self, *, before: datetime | None = None, room_id: RoomID | None = None,
                    dry_run: bool = False) -> int:
        """Drop holds older than `before` or of `room_id` (or count them, `dry_run`)."""
        conditions = []
        if before is not None:
            conditions.append(HeldStaffMessageRow.held_at < before)
        if room_id is not None:
            conditions.append(HeldStaffMessageRow.room_id == room_id)
        if not conditions:
            return 0
        return await purge_rows(self._scope, HeldStaffMessageRow, or_(*conditions),
                                dry_run=dry_run)


def _held(row: HeldStaffMessageRow) -> HeldStaffMessage:
    return HeldStaffMessage(event_id=EventID(row.event_id), room_id=RoomID(row.room_id),
                            held_at=row.held_at, payloads_ct=row.payloads_ct)


class MuteRepo:
    """Muted members and the power level each had before (bridge.admin.moderation)."""

    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    async def add(self, room_id: RoomID, user_id: UserID, previous_level: int | None) -> None:
        stmt = (self._scope.insert(MuteRow)
                .values(room_id=room_id, user_id=user_id, previous_level=previous_level,
                        muted_at=utcnow())
                .on_conflict_do_update(index_elements=["room_id", "user_id"],
                                       set_={"previous_level": previous_level}))
        async with self._scope.session() as session:
            await session.execute(stmt)

    async def previous_level(self, room_id: RoomID, user_id: UserID) -> int | None:
        stmt = select(MuteRow.previous_level).where(MuteRow.room_id == room_id,
                                                    MuteRow.user_id == user_id)
        async with self._scope.session() as session:
            return await session.scalar(stmt)

    async def delete(self, room_id: RoomID, user_id: UserID) -> None:
        stmt = delete(MuteRow).where(MuteRow.room_id == room_id, MuteRow.user_id == user_id)
        async with self._scope.session() as session:
            await session.execute(stmt)

    async def forget_user(self, user_id: UserID) -> int:
        """Every mute of a user (an erased citizen's ghost); returns how many."""
        async with self._scope.session() as session:
            return rowcount(await session.execute(delete(MuteRow).where(
                MuteRow.user_id == user_id)))


class ReactionRepo:
    """For each event a ghost reacted to, the Matrix reaction it sent (bridge.whatsapp.mirror)."""

    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    async def set(self, ghost: UserID, target: EventID, reaction: EventID) -> None:
        """One reaction per ghost and target: a new emoji replaces the one recorded."""
        stmt = (self._scope.insert(ReactionRow)
                .values(ghost_user_id=ghost, target_event_id=target, reaction_event_id=reaction)
                .on_conflict_do_update(index_elements=["ghost_user_id", "target_event_id"],
                                       set_={"reaction_event_id": reaction}))
        async with self._scope.session() as session:
            await session.execute(stmt)

    async def get(self, ghost: UserID, target: EventID) -> EventID | None:
        stmt = select(ReactionRow.reaction_event_id).where(
            ReactionRow.ghost_user_id == ghost, ReactionRow.target_event_id == target)
        async with self._scope.session() as session:
            found = await session.scalar(stmt)
            return None if found is None else EventID(found)

    async def delete(self, ghost: UserID, target: EventID) -> None:
        stmt = delete(ReactionRow).where(ReactionRow.ghost_user_id == ghost,
                                         ReactionRow.target_event_id == target)
        async with self._scope.session() as session:
            await session.execute(stmt)

    async def forget_ghost(self, ghost: UserID) -> int:
        """Every reaction recorded for a ghost (an erased citizen's); returns how many."""
        async with self._scope.session() as session:
            return rowcount(await session.execute(delete(ReactionRow).where(
                ReactionRow.ghost_user_id == ghost)))
