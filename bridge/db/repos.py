"""The message map, small key-value state, and the bundle of all repositories."""

from __future__ import annotations

from datetime import datetime
from typing import cast

from sqlalchemy import delete, select, update

from bridge.auditchain import AuditKeys
from bridge.db.audit import AuditRepo
from bridge.db.crypto import CryptoRepo
from bridge.db.deadletters import DeadLetterRepo
from bridge.db.held import HeldRepo, MuteRepo, ReactionRepo
from bridge.db.invites import InviteRepo
from bridge.db.legacy import LegacyRepo
from bridge.db.models import KVRow, MessageMapRow, utcnow
from bridge.db.notices import NoticeRepo, SubscriptionRepo
from bridge.db.people import CitizenRepo, ConsentRepo, GhostRepo, RoomRepo
from bridge.db.queues import InboundRepo, OutboxRepo, TransactionRepo
from bridge.db.reports import ReportRepo
from bridge.db.roomkeys import RoomKeyRepo
from bridge.db.scope import Scope, purge_rows, rowcount
from bridge.db.sealed import SealedRepo
from bridge.db.wa_rooms import RoomMemberRepo
from bridge.model import Direction, MessageLink
from bridge.types import EventID, RoomID, WamidHash


class MessageRepo:
    """WhatsApp message ids <-> Matrix event ids, so replies, reactions and edits map both ways."""

    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    async def link(
        self, wamid: tuple[WamidHash, str], room_id: RoomID, event_id: EventID,
        direction: Direction,
    ) -> bool:
        """Record a pair, the wamid as `Privacy.seal_wamid` gives it (hash, ciphertext);
        False if either side is already linked (the first link wins)."""
        wamid_hash, wamid_ct = wamid
        stmt = (
            self._scope.insert(MessageMapRow)
            .values(wamid_hash=wamid_hash, wamid_ct=wamid_ct, room_id=room_id,
                    event_id=event_id, direction=direction, created_at=utcnow())
            .on_conflict_do_nothing()
            .returning(MessageMapRow.id)
        )
        async with self._scope.session() as session:
            return await session.scalar(stmt) is not None

    async def by_wamid(self, wamid_hash: WamidHash) -> MessageLink | None:
        """The link of a wamid, by its keyed hash (`KeyedIndex.wamid`)."""
        async with self._scope.session() as session:
            row = await session.scalar(select(MessageMapRow).where(
                MessageMapRow.wamid_hash == wamid_hash))
            return None if row is None else _link(row)

    async def sealed(self) -> list[tuple[int, str, str]]:
        """(id, wamid hash, wamid ciphertext) of every link (for `rekey`)."""
        stmt = select(MessageMapRow.id, MessageMapRow.wamid_hash, MessageMapRow.wamid_ct)
        async with self._scope.session() as session:
            return [(i, h, ct) for i, h, ct in (await session.execute(stmt)).all()]

    async def reseal(self, link_id: int, wamid_ct: str) -> None:
        stmt = (update(MessageMapRow).where(MessageMapRow.id == link_id)
                .values(wamid_ct=wamid_ct))
        async with self._scope.session() as session:
            await session.execute(stmt)

    async def delete_room(self, room_id: RoomID) -> int:
        """Forget every link of a room (a citizen's erasure); returns how many."""
        async with self._scope.session() as session:
            stmt = delete(MessageMapRow).where(MessageMapRow.room_id == room_id)
            return rowcount(await session.execute(stmt))

    async def purge(self, before: datetime, *, dry_run: bool = False) -> int:
        """Forget pairs linked before `before` (retention.message_map_days)."""
        return await purge_rows(self._scope, MessageMapRow, MessageMapRow.created_at < before,
                                dry_run=dry_run)

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
        id=row.id, wamid_hash=WamidHash(row.wamid_hash), wamid_ct=row.wamid_ct,
        room_id=RoomID(row.room_id), event_id=EventID(row.event_id),
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

    async def add(self, key: str, value: str) -> bool:
        """Store `value` unless `key` is already set; True if it was stored (the first
        of two racing writers wins, the other reads what it wrote)."""
        stmt = self._scope.insert(KVRow).values(key=key, value=value).on_conflict_do_nothing()
        async with self._scope.session() as session:
            return rowcount(await session.execute(stmt)) == 1

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
        self.crypto = CryptoRepo(scope)
        self.sealed = SealedRepo(scope)
        self.dead_letters = DeadLetterRepo(scope)
        self.reports = ReportRepo(scope)
        self.wa_rooms = RoomMemberRepo(scope)
        self.legacy = LegacyRepo(scope)
        self.held = HeldRepo(scope)
        self.mutes = MuteRepo(scope)
        self.reactions = ReactionRepo(scope)
