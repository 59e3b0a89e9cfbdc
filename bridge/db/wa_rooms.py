"""WhatsApp members of agency rooms (revision 0014): memberships, per-room switches,
the window-closed backlog and the per-member wamid map (bridge.rooms_wa)."""

from __future__ import annotations

import builtins
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, delete, func, select, update

from bridge.db.models import (
    OutboxRow,
    RoomBacklogRow,
    RoomMemberRow,
    RoomMessageRow,
    RoomSettingsRow,
    utcnow,
)
from bridge.db.scope import Scope, purge_rows, rowcount
from bridge.model import BacklogEntry, RoomMember, RoomMemberState, RoomSettings
from bridge.types import EventID, RoomID, UserID, WamidHash

# Built once (every outbox batch checks its members), values bound at execution.
_MEMBERS = cast(Table, RoomMemberRow.__table__)
_JOINED_OF = select(_MEMBERS.c.room_id, _MEMBERS.c.citizen_id).where(
    _MEMBERS.c.citizen_id.in_(bindparam("ids", expanding=True)), _MEMBERS.c.state == "joined")


class RoomMemberRepo:
    """Memberships, switches, backlog and message map of WhatsApp room members."""

    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    # --- memberships ------------------------------------------------------------------

    async def invite(self, room_id: RoomID, citizen_id: int, display_name: str,
                     invited_by: str, notice_hash: str) -> RoomMember:
        """Create the invitation, or renew one that is pending, was declined or left (the
        pseudonym drawn the first time stays; the hash is the newest text's, which its
        buttons name); a joined member is returned as is."""
        now = utcnow()
        stmt = (
            self._scope.insert(RoomMemberRow)
            .values(room_id=room_id, citizen_id=citizen_id, state="invited",
                    display_name=display_name, invited_by=invited_by,
                    notice_hash=notice_hash, created_at=now, updated_at=now)
            .on_conflict_do_nothing()
        )
        async with self._scope.session() as session:
            await session.execute(stmt)
            await session.execute(
                update(RoomMemberRow)
                .where(RoomMemberRow.room_id == room_id,
                       RoomMemberRow.citizen_id == citizen_id,
                       RoomMemberRow.state.in_(("left", "declined", "invited")))
                .values(state="invited", invited_by=invited_by, notice_hash=notice_hash,
                        updated_at=now))
            row = await session.scalar(select(RoomMemberRow).where(
                RoomMemberRow.room_id == room_id, RoomMemberRow.citizen_id == citizen_id))
            assert row is not None
            return _member(row)

    async def get(self, member_id: int) -> RoomMember | None:
        async with self._scope.session() as session:
            row = await session.get(RoomMemberRow, member_id)
            return None if row is None else _member(row)

    async def find(self, room_id: RoomID, citizen_id: int) -> RoomMember | None:
        return await self._one(RoomMemberRow.room_id == room_id,
                               RoomMemberRow.citizen_id == citizen_id)

    async def by_ghost(self, user_id: UserID) -> RoomMember | None:
        return await self._one(RoomMemberRow.ghost_user_id == user_id)

    async def of_citizen(self, citizen_id: int, state: RoomMemberState = "joined"
                         ) -> builtins.list[RoomMember]:
        return await self._many(RoomMemberRow.citizen_id == citizen_id,
                                RoomMemberRow.state == state)

    async def in_room(self, room_id: RoomID, state: RoomMemberState = "joined"
                      ) -> builtins.list[RoomMember]:
        return await self._many(RoomMemberRow.room_id == room_id,
                                RoomMemberRow.state == state)

    async def count_joined(self, room_id: RoomID) -> int:
        stmt = select(func.count()).select_from(RoomMemberRow).where(
            RoomMemberRow.room_id == room_id, RoomMemberRow.state == "joined")
        async with self._scope.session() as session:
            return int(await session.scalar(stmt) or 0)

    async def joined_counts(self, citizen_ids: builtins.list[int]) -> dict[int, int]:
        """How many rooms each of these citizens is a member of (absent: none)."""
        if not citizen_ids:
            return {}
        stmt = (select(RoomMemberRow.citizen_id, func.count())
                .where(RoomMemberRow.citizen_id.in_(set(citizen_ids)),
                       RoomMemberRow.state == "joined")
                .group_by(RoomMemberRow.citizen_id))
        async with self._scope.session() as session:
            return {int(c): int(n) for c, n in (await session.execute(stmt)).all()}

    async def is_joined(self, room_id: RoomID, citizen_id: int) -> bool:
        member = await self.find(room_id, citizen_id)
        return member is not None and member.state == "joined"

    async def joined_of(self, citizen_ids: Collection[int]) -> set[tuple[RoomID, int]]:
        """(room, citizen) of every room these citizens are joined members of."""
        if not citizen_ids:
            return set()
        async with self._scope.session() as session:
            result = await session.execute(_JOINED_OF, {"ids": list(citizen_ids)})
            return {(RoomID(r), c) for r, c in result.all()}

    async def ghosts_of(self, citizen_id: int) -> builtins.list[UserID]:
        """Every room pseudonym the citizen ever had (for erasure)."""
        stmt = select(RoomMemberRow.ghost_user_id).where(
            RoomMemberRow.citizen_id == citizen_id, RoomMemberRow.ghost_user_id.is_not(None))
        async with self._scope.session() as session:
            return [UserID(g) for g in await session.scalars(stmt) if g]

    async def set_ghost(self, member_id: int, user_id: UserID) -> None:
        await self._update(member_id, ghost_user_id=user_id)

    async def set_state(self, member_id: int, state: RoomMemberState,
                        *, only_from: tuple[RoomMemberState, ...] | None = None) -> bool:
        """Change the state; with `only_from`, only from one of those (False if not)."""
        stmt = update(RoomMemberRow).where(RoomMemberRow.id == member_id)
        if only_from is not None:
            stmt = stmt.where(RoomMemberRow.state.in_(only_from))
        async with self._scope.session() as session:
            return rowcount(await session.execute(
                stmt.values(state=state, updated_at=utcnow()))) > 0

    async def choose(self, member_id: int, at: datetime) -> None:
        await self._update(member_id, chosen_at=at)

    async def _one(self, *where: Any) -> RoomMember | None:
        async with self._scope.session() as session:
            row = await session.scalar(select(RoomMemberRow).where(*where))
            return None if row is None else _member(row)

    async def _many(self, *where: Any) -> builtins.list[RoomMember]:
        async with self._scope.session() as session:
            rows = await session.scalars(
                select(RoomMemberRow).where(*where).order_by(RoomMemberRow.id))
            return [_member(r) for r in rows]

    async def _update(self, member_id: int, **values: Any) -> None:
        async with self._scope.session() as session:
            await session.execute(update(RoomMemberRow).where(RoomMemberRow.id == member_id)
                                  .values(updated_at=utcnow(), **values))

    # --- per-room switches ------------------------------------------------------------

    async def settings(self, room_id: RoomID) -> RoomSettings | None:
        async with self._scope.session() as session:
            row = await session.get(RoomSettingsRow, room_id)
            return None if row is None else RoomSettings(
                RoomID(row.room_id), row.whatsapp_allowed, row.relay_media)

    async def save_settings(self, settings: RoomSettings) -> None:
        values = {"whatsapp_allowed": settings.whatsapp_allowed,
                  "relay_media": settings.relay_media, "updated_at": utcnow()}
        stmt = (self._scope.insert(RoomSettingsRow)
                .values(room_id=settings.room_id, **values)
                .on_conflict_do_update(index_elements=["room_id"], set_=values))
        async with self._scope.session() as session:
            await session.execute(stmt)

    # --- backlog while the window is closed -------------------------------------------

    async def keep(self, citizen_id: int, room_id: RoomID, event_key: str, payload: str
                   ) -> bool:
        """Keep one payload; False if it was kept before (a redelivered event)."""
        stmt = (self._scope.insert(RoomBacklogRow)
                .values(citizen_id=citizen_id, room_id=room_id, event_key=event_key,
                        payload=payload, created_at=utcnow())
                .on_conflict_do_nothing()
                .returning(RoomBacklogRow.id))
        async with self._scope.session() as session:
            return await session.scalar(stmt) is not None

    async def backlog(self, citizen_id: int) -> builtins.list[BacklogEntry]:
        """Oldest first."""
        stmt = (select(RoomBacklogRow).where(RoomBacklogRow.citizen_id == citizen_id)
                .order_by(RoomBacklogRow.id))
        async with self._scope.session() as session:
            return [BacklogEntry(r.id, r.citizen_id, RoomID(r.room_id), r.event_key, r.payload,
                                 r.created_at) for r in await session.scalars(stmt)]

    async def forget(self, ids: builtins.list[int]) -> None:
        async with self._scope.session() as session:
            await session.execute(delete(RoomBacklogRow).where(RoomBacklogRow.id.in_(ids)))

    async def forget_event(self, key_prefix: str) -> int:
        """A redacted event's kept copies (every part, every member)."""
        async with self._scope.session() as session:
            return rowcount(await session.execute(delete(RoomBacklogRow).where(
                RoomBacklogRow.event_key.startswith(key_prefix, autoescape=True))))

    async def purge_backlog(self, before: datetime, *, dry_run: bool = False) -> int:
        """Room messages kept longer than their retention (the member never wrote back)."""
        return await purge_rows(self._scope, RoomBacklogRow, RoomBacklogRow.created_at < before,
                                dry_run=dry_run)

    async def forget_room(self, citizen_id: int, room_id: RoomID) -> int:
        async with self._scope.session() as session:
            return rowcount(await session.execute(delete(RoomBacklogRow).where(
                RoomBacklogRow.citizen_id == citizen_id, RoomBacklogRow.room_id == room_id)))

    async def cancel_unsent(self, key_prefix: str) -> int:
        """Cancel the pending outbox rows of one relayed room event (its keys start with
        `key_prefix`): it was redacted before it went. One in flight still goes."""
        stmt = (update(OutboxRow)
                .where(OutboxRow.idempotency_key.startswith(key_prefix, autoescape=True),
                       OutboxRow.status == "pending", OutboxRow.sending_at.is_(None))
                .values(status="cancelled", updated_at=utcnow()))
        async with self._scope.session() as session:
            return rowcount(await session.execute(stmt))

    async def older_waiting(self, citizen_id: int, item_id: int, now: datetime
                            ) -> datetime | None:
        """When the oldest room send to `citizen_id` queued before `item_id` is next due,
        if it is still pending and not due yet (backing off); None if none is."""
        stmt = (select(func.min(OutboxRow.next_attempt_at))
                .where(OutboxRow.citizen_id == citizen_id, OutboxRow.id < item_id,
                       OutboxRow.status == "pending", OutboxRow.next_attempt_at > now,
                       OutboxRow.idempotency_key.startswith("wr", autoescape=True)))
        async with self._scope.session() as session:
            return cast(datetime | None, await session.scalar(stmt))

    # --- wamid <-> room event, per member ---------------------------------------------

    async def link(self, wamid: tuple[WamidHash, str], citizen_id: int, room_id: RoomID,
                   event_id: EventID) -> None:
        """Record which room event a member's wamid stands for; the wamid as
        `Privacy.seal_wamid` gives it (keyed hash, ciphertext), never in clear."""
        wamid_hash, wamid_ct = wamid
        stmt = (self._scope.insert(RoomMessageRow)
                .values(wamid_hash=wamid_hash, wamid_ct=wamid_ct, citizen_id=citizen_id,
                        room_id=room_id, event_id=event_id, created_at=utcnow())
                .on_conflict_do_nothing())
        async with self._scope.session() as session:
            await session.execute(stmt)

    async def link_many(self, links: Sequence[tuple[tuple[WamidHash, str], int, RoomID,
                                                   EventID]]) -> None:
        """`link` for a batch (wamid, citizen id, room, event), in one statement."""
        now = utcnow()
        await self._scope.insert_many(RoomMessageRow, [
            {"wamid_hash": w[0], "wamid_ct": w[1], "citizen_id": c, "room_id": r,
             "event_id": e, "created_at": now} for w, c, r, e in links])

    async def by_wamid(self, wamid_hash: WamidHash) -> tuple[RoomID, EventID, int] | None:
        """(room, event, citizen id) of a wamid, by its keyed hash (`KeyedIndex.wamid`)."""
        async with self._scope.session() as session:
            row = await session.scalar(select(RoomMessageRow)
                                       .where(RoomMessageRow.wamid_hash == wamid_hash))
            return None if row is None else (RoomID(row.room_id), EventID(row.event_id),
                                             row.citizen_id)

    async def wamid_for(self, event_id: str, citizen_id: int) -> tuple[WamidHash, str] | None:
        """(hash, ciphertext) of the wamid under which `citizen_id` has room event
        `event_id` (`Privacy.open_wamid` gives the wamid, to quote it)."""
        stmt = (select(RoomMessageRow.wamid_hash, RoomMessageRow.wamid_ct)
                .where(RoomMessageRow.event_id == event_id,
                       RoomMessageRow.citizen_id == citizen_id).limit(1))
        async with self._scope.session() as session:
            row = (await session.execute(stmt)).first()
            return None if row is None else (WamidHash(row[0]), row[1])

    async def purge_messages(self, before: datetime, *, dry_run: bool = False) -> int:
        """Forget pairs linked before `before` (retention.message_map_days)."""
        return await purge_rows(self._scope, RoomMessageRow, RoomMessageRow.created_at < before,
                                dry_run=dry_run)

    async def sealed(self) -> builtins.list[tuple[int, str, str]]:
        """(id, wamid hash, wamid ciphertext) of every pair (for `rekey`)."""
        stmt = select(RoomMessageRow.id, RoomMessageRow.wamid_hash, RoomMessageRow.wamid_ct)
        async with self._scope.session() as session:
            return [(i, h, ct) for i, h, ct in (await session.execute(stmt)).all()]

    async def reseal(self, link_id: int, wamid_hash: str, wamid_ct: str) -> None:
        stmt = (update(RoomMessageRow).where(RoomMessageRow.id == link_id)
                .values(wamid_hash=wamid_hash, wamid_ct=wamid_ct))
        async with self._scope.session() as session:
            await session.execute(stmt)

    # --- a citizen's data (export, erasure) ----------------------------------------

    async def backlog_payloads(self) -> builtins.list[tuple[int, str]]:
        """(id, sealed payload) of every kept room message (for `rekey`)."""
        async with self._scope.session() as session:
            return [(i, p) for i, p in (await session.execute(
                select(RoomBacklogRow.id, RoomBacklogRow.payload))).all()]

    async def reseal_backlog(self, entry_id: int, payload: str) -> None:
        async with self._scope.session() as session:
            await session.execute(update(RoomBacklogRow).where(RoomBacklogRow.id == entry_id)
                                  .values(payload=payload))

    async def of_citizen_all(self, citizen_id: int) -> builtins.list[RoomMember]:
        """Every membership of a citizen, whatever its state (their data export)."""
        return await self._many(RoomMemberRow.citizen_id == citizen_id)

    async def erase_citizen(self, citizen_id: int) -> int:
        """Their memberships, kept backlog and wamid pairs (an erasure); returns how
        many memberships went. The room ghosts are retired by the caller first."""
        async with self._scope.session() as session:
            await session.execute(delete(RoomBacklogRow)
                                  .where(RoomBacklogRow.citizen_id == citizen_id))
            await session.execute(delete(RoomMessageRow)
                                  .where(RoomMessageRow.citizen_id == citizen_id))
            return rowcount(await session.execute(
                delete(RoomMemberRow).where(RoomMemberRow.citizen_id == citizen_id)))


def _member(row: RoomMemberRow) -> RoomMember:
    return RoomMember(
        id=row.id, room_id=RoomID(row.room_id), citizen_id=row.citizen_id,
        state=cast(RoomMemberState, row.state), display_name=row.display_name,
        ghost_user_id=None if row.ghost_user_id is None else UserID(row.ghost_user_id),
        invited_by=row.invited_by, notice_hash=row.notice_hash, chosen_at=row.chosen_at,
        created_at=row.created_at)
