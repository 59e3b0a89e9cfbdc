"""Invite links and the pseudonymous accounts made through them (revision 0002).

A link is stored by the SHA-256 of its token, never the token: a copy of the database
cannot be turned into working links. `claim` takes one use atomically (one UPDATE with
every condition in its WHERE), so two browsers racing for a single-use link cannot
both win, on SQLite or PostgreSQL.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import (
    CheckConstraint,
    ForeignKey,
    Integer,
    String,
    and_,
    delete,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Mapped, mapped_column

from bridge.db.models import HEX64, ID, Base, UTCDateTime, utcnow
from bridge.db.scope import Scope, purge_rows, rowcount
from bridge.types import RoomID, UserID


class InviteLinkRow(Base):
    __tablename__ = "invite_links"
    __table_args__ = (CheckConstraint("uses >= 0 AND uses <= max_uses", name="uses"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(HEX64, unique=True)
    room_id: Mapped[str] = mapped_column(ID, index=True)
    max_uses: Mapped[int] = mapped_column(Integer)
    uses: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class InviteAccountRow(Base):
    __tablename__ = "invite_accounts"

    user_id: Mapped[str] = mapped_column(ID, primary_key=True)
    link_id: Mapped[int | None] = mapped_column(
        ForeignKey("invite_links.id", ondelete="SET NULL"), index=True
    )
    room_id: Mapped[str] = mapped_column(ID)
    display_name: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # When the retention purge found the account in use (logged in or in a room): it is
    # never checked again (revision 0013).
    in_use_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


@dataclass(frozen=True, slots=True)
class InviteLink:
    """A link that lets `max_uses` citizens join `room_id` until `expires_at`."""

    id: int
    token_hash: str
    room_id: RoomID
    max_uses: int
    uses: int
    expires_at: datetime
    created_by: str
    created_at: datetime
    revoked_at: datetime | None

    def usable(self, now: datetime) -> bool:
        return self.revoked_at is None and self.uses < self.max_uses and now < self.expires_at


@dataclass(frozen=True, slots=True)
class InviteAccount:
    """A pseudonymous Matrix account created through an invite link."""

    user_id: UserID
    link_id: int | None
    room_id: RoomID
    display_name: str
    created_at: datetime
    in_use_at: datetime | None = None


class InviteRepo:
    """Invite links (stored hashed) and the accounts they created."""

    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    async def create(
        self, *, token_hash: str, room_id: RoomID, max_uses: int, expires_at: datetime,
        created_by: str,
    ) -> InviteLink:
        row = InviteLinkRow(
            token_hash=token_hash, room_id=room_id, max_uses=max_uses, uses=0,
            expires_at=expires_at, created_by=created_by, created_at=utcnow(),
        )
        async with self._scope.session() as session:
            session.add(row)
            await session.flush()
            return _link(row)

    async def by_hash(self, token_hash: str) -> InviteLink | None:
        stmt = select(InviteLinkRow).where(InviteLinkRow.token_hash == token_hash)
        async with self._scope.session() as session:
            row = await session.scalar(stmt)
            return None if row is None else _link(row)

    async def get(self, link_id: int) -> InviteLink | None:
        async with self._scope.session() as session:
            row = await session.get(InviteLinkRow, link_id)
            return None if row is None else _link(row)

    async def claim(self, link_id: int, now: datetime) -> bool:
        """Take one use if the link is still usable at `now`; False if it is not."""
        stmt = (
            update(InviteLinkRow)
            .where(
                InviteLinkRow.id == link_id,
                InviteLinkRow.uses < InviteLinkRow.max_uses,
                InviteLinkRow.expires_at > now,
                InviteLinkRow.revoked_at.is_(None),
            )
            .values(uses=InviteLinkRow.uses + 1)
        )
        async with self._scope.session() as session:
            return rowcount(await session.execute(stmt)) == 1

    async def release(self, link_id: int) -> None:
        """Give back a use taken by `claim` when the account could not be made."""
        stmt = (
            update(InviteLinkRow)
            .where(InviteLinkRow.id == link_id, InviteLinkRow.uses > 0)
            .values(uses=InviteLinkRow.uses - 1)
        )
        async with self._scope.session() as session:
            await session.execute(stmt)

    async def revoke_room(self, room_id: RoomID) -> int:
        """Revoke every live link of a room (when it closes); returns how many."""
        stmt = (
            update(InviteLinkRow)
            .where(InviteLinkRow.room_id == room_id, InviteLinkRow.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )
        async with self._scope.session() as session:
            return rowcount(await session.execute(stmt))

    async def add_account(
        self, *, user_id: UserID, link_id: int, room_id: RoomID, display_name: str
    ) -> InviteAccount:
        row = InviteAccountRow(
            user_id=user_id, link_id=link_id, room_id=room_id, display_name=display_name,
            created_at=utcnow(),
        )
        async with self._scope.session() as session:
            session.add(row)
            await session.flush()
            return _account(row)

    async def account(self, user_id: UserID) -> InviteAccount | None:
        async with self._scope.session() as session:
            row = await session.get(InviteAccountRow, user_id)
            return None if row is None else _account(row)

    async def purge_links(self, before: datetime, *, dry_run: bool = False) -> int:
        """Delete links that expired, were revoked, or were used up (counted from their
        creation: a link lives at most 30 days) before `before`. Their accounts stay,
        unlinked (SET NULL): they are retired on their own terms (`unused_accounts`)."""
        row = InviteLinkRow
        return await purge_rows(self._scope, row, or_(
            row.expires_at < before, row.revoked_at < before,
            and_(row.uses >= row.max_uses, row.created_at < before)), dry_run=dry_run)

    async def unused_accounts(self, made_before: datetime, limit: int = 100
                              ) -> builtins.list[InviteAccount]:
        """Accounts made before `made_before` not yet found in use, oldest first."""
        stmt = (select(InviteAccountRow)
                .where(InviteAccountRow.created_at < made_before,
                       InviteAccountRow.in_use_at.is_(None))
                .order_by(InviteAccountRow.created_at).limit(limit))
        async with self._scope.session() as session:
            return [_account(r) for r in await session.scalars(stmt)]

    async def mark_in_use(self, user_id: UserID) -> None:
        """The account was used: the retention purge never considers it again."""
        stmt = (update(InviteAccountRow).where(InviteAccountRow.user_id == user_id)
                .values(in_use_at=utcnow()))
        async with self._scope.session() as session:
            await session.execute(stmt)

    async def delete_account(self, user_id: UserID) -> bool:
        """Forget an account (erased, or retired unused); False if there was none."""
        stmt = delete(InviteAccountRow).where(InviteAccountRow.user_id == user_id)
        async with self._scope.session() as session:
            return rowcount(await session.execute(stmt)) > 0

    async def accounts(self, user_ids: builtins.list[str]) -> builtins.list[InviteAccount]:
        """The invite accounts among `user_ids`."""
        if not user_ids:
            return []
        stmt = select(InviteAccountRow).where(InviteAccountRow.user_id.in_(user_ids))
        async with self._scope.session() as session:
            return [_account(r) for r in await session.scalars(stmt)]


def _link(row: InviteLinkRow) -> InviteLink:
    return InviteLink(
        id=row.id, token_hash=row.token_hash, room_id=RoomID(row.room_id),
        max_uses=row.max_uses, uses=row.uses, expires_at=row.expires_at,
        created_by=row.created_by, created_at=row.created_at, revoked_at=row.revoked_at,
    )


def _account(row: InviteAccountRow) -> InviteAccount:
    return InviteAccount(
        user_id=UserID(row.user_id), link_id=row.link_id, room_id=RoomID(row.room_id),
        display_name=row.display_name, created_at=row.created_at, in_use_at=row.in_use_at,
    )
