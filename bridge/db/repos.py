"""The message map, small key-value state, and the bundle of all repositories."""

from __future__ import annotations

from typing import cast

from sqlalchemy import delete, select

from bridge.auditchain import AuditKeys
from bridge.db.audit import AuditRepo
from bridge.db.deadletters import DeadLetterRepo
from bridge.db.invites import InviteRepo
from bridge.db.models import KVRow, MessageMapRow
from bridge.db.notices import NoticeRepo, SubscriptionRepo
from bridge.db.people import CitizenRepo, ConsentRepo, GhostRepo, RoomRepo
from bridge.db.queues import InboundRepo, OutboxRepo, TransactionRepo
from bridge.db.records import Direction, MessageLink
from bridge.db.reports import ReportRepo
from bridge.db.roomkeys import RoomKeyRepo
from bridge.db.scope import Scope, rowcount
from bridge.db.wa_rooms import RoomMemberRepo
from bridge.types import EventID, RoomID


class MessageRepo:
    """WhatsApp message ids <-> Matrix event ids, so replies, reactions and edits map both ways."""

    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    async def link(
        self, wamid: str, room_id: RoomID, event_id: EventID, direction: Direction
    ) -> bool:
        """Record a pair; False if either side is already linked (the first link wins)."""
        stmt = (
            self._scope.insert(MessageMapRow)
            .values(wamid=wamid, room_id=room_id, event_id=event_id, direction=direction)
            .on_conflict_do_nothing()
            .returning(MessageMapRow.id)
        )
        async with self._scope.session() as session:
            return await session.scalar(stmt) is not None

    async def by_wamid(self, wamid: str) -> MessageLink | None:
        async with self._scope.session() as session:
            row = await session.scalar(select(MessageMapRow).where(MessageMapRow.wamid == wamid))
            return None if row is None else _link(row)

    async def delete_room(self, room_id: RoomID) -> int:
        """Forget every link of a room (a citizen's erasure); returns how many."""
        async with self._scope.session() as session:
            stmt = delete(MessageMapRow).where(MessageMapRow.room_id == room_id)
            return rowcount(await session.execute(stmt))

    async def by_event(self, event_id: EventID) -> MessageLink | None:
        async with self._scope.session() as session:
            stmt = select(MessageMapRow).where(MessageMapRow.event_id == event_id)
            row = await session.scalar(stmt)
            return None if row is None else _link(row)

    async def latest_inbound(self, room_id: RoomID, up_to: EventID | None = None
                             ) -> MessageLink | None:
        """The room's newest message from the citizen; with `up_to` (an event of the
        room that is in the map), the newest one linked no later than that event."""
        stmt = (select(MessageMapRow)
                .where(MessageMapRow.room_id == room_id, MessageMapRow.direction == "in")
                .order_by(MessageMapRow.id.desc()).limit(1))
        async with self._scope.session() as session:
            if up_to is not None:
                bound = await session.scalar(select(MessageMapRow.id).where(
                    MessageMapRow.event_id == up_to, MessageMapRow.room_id == room_id))
                if bound is not None:
                    stmt = stmt.where(MessageMapRow.id <= bound)
            row = await session.scalar(stmt)
            return None if row is None else _link(row)


def _link(row: MessageMapRow) -> MessageLink:
    return MessageLink(
        id=row.id, wamid=row.wamid, room_id=RoomID(row.room_id), event_id=EventID(row.event_id),
        direction=cast(Direction, row.direction),
    )


class KVRepo:
    """Small bridge state (e.g. a sync token); not for anything that has its own table."""

    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    async def get(self, key: str) -> str | None:
        async with self._scope.session() as session:
            row = await session.get(KVRow, key)
            return None if row is None else row.value

    async def set(self, key: str, value: str) -> None:
        stmt = (
            self._scope.insert(KVRow)
            .values(key=key, value=value)
            .on_conflict_do_update(index_elements=["key"], set_={"value": value})
        )
        async with self._scope.session() as session:
            await session.execute(stmt)

    async def delete(self, key: str) -> None:
        async with self._scope.session() as session:
            await session.execute(delete(KVRow).where(KVRow.key == key))

    async def with_prefix(self, prefix: str) -> list[tuple[str, str]]:
        """(key, value) of every key starting with `prefix` (for small sets only)."""
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        stmt = select(KVRow).where(KVRow.key.like(escaped + "%", escape="\\"))
        async with self._scope.session() as session:
            return [(row.key, row.value) for row in await session.scalars(stmt)]


class Repositories:
    """Every repository over one scope (see `Scope`)."""

    def __init__(self, scope: Scope, audit_keys: AuditKeys | None = None) -> None:
        self.transactions = TransactionRepo(scope)
        self.inbound = InboundRepo(scope)
        self.citizens = CitizenRepo(scope)
        self.ghosts = GhostRepo(scope)
        self.rooms = RoomRepo(scope)
        self.consent = ConsentRepo(scope)
        self.outbox = OutboxRepo(scope)
        self.messages = MessageRepo(scope)
        self.audit = AuditRepo(scope, audit_keys)
        self.kv = KVRepo(scope)
        self.invites = InviteRepo(scope)
        self.subscriptions = SubscriptionRepo(scope)
        self.notices = NoticeRepo(scope)
        self.room_keys = RoomKeyRepo(scope)
        self.dead_letters = DeadLetterRepo(scope)
        self.reports = ReportRepo(scope)
        self.wa_rooms = RoomMemberRepo(scope)
