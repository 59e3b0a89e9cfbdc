"""Notices of availability (revision 0004): citizens' subscriptions and the notice log.

The log is informative: it records what the bridge asked WhatsApp to deliver and what
WhatsApp reported back, never the notification itself, and it is no proof of notification.
"""

from __future__ import annotations

import builtins
from datetime import datetime
from typing import Any, cast

from sqlalchemy import select, update

from bridge.db.models import NoticeRow, NoticeSubscriptionRow, utcnow
from bridge.db.scope import Scope, purge_rows, rowcount
from bridge.errors import Conflict
from bridge.model import ConsentState, Notice, NoticeSubscription
from bridge.types import Pseudonym, WamidHash

# Webhook status -> the column it fills (the first report wins: redeliveries are no-ops).
STATUS_COLUMNS = {"sent": "sent_at", "delivered": "delivered_at", "read": "read_at",
                  "failed": "failed_at"}


class SubscriptionRepo:
    """One row per citizen who ever asked for notices; the state mirrors the newest
    `notices` consent record (the evidence is in `ConsentRepo`)."""

    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    async def get(self, citizen_id: int) -> NoticeSubscription | None:
        async with self._scope.session() as session:
            row = await session.get(NoticeSubscriptionRow, citizen_id)
            return None if row is None else _subscription(row)

    async def by_code(self, code: str) -> NoticeSubscription | None:
        stmt = select(NoticeSubscriptionRow).where(NoticeSubscriptionRow.code == code)
        async with self._scope.session() as session:
            row = await session.scalar(stmt)
            return None if row is None else _subscription(row)

    async def get_or_create(self, citizen_id: int, code: str) -> NoticeSubscription:
        """The citizen's subscription, created (state `unknown`) with `code` if new.

        Raises Conflict if only the code collides (draw another)."""
        stmt = (
            self._scope.insert(NoticeSubscriptionRow)
            .values(citizen_id=citizen_id, code=code, state="unknown", updated_at=utcnow())
            .on_conflict_do_nothing()
            .returning(NoticeSubscriptionRow)
        )
        async with self._scope.session() as session:
            row = await session.scalar(stmt)
            if row is None:
                row = await session.get(NoticeSubscriptionRow, citizen_id)
            if row is None:
                raise Conflict("subscription code already in use")
            return _subscription(row)

    async def set_state(self, citizen_id: int, state: ConsentState,
                        only_from: ConsentState | None = None) -> bool:
        """Set the state (only if it is `only_from`, when given); False if unchanged."""
        stmt = (update(NoticeSubscriptionRow)
                .where(NoticeSubscriptionRow.citizen_id == citizen_id)
                .values(state=state, updated_at=utcnow()))
        if only_from is not None:
            stmt = stmt.where(NoticeSubscriptionRow.state == only_from)
        async with self._scope.session() as session:
            return rowcount(await session.execute(stmt)) > 0


def _subscription(row: NoticeSubscriptionRow) -> NoticeSubscription:
    return NoticeSubscription(citizen_id=row.citizen_id, code=row.code,
                              state=cast(ConsentState, row.state), updated_at=row.updated_at)


class NoticeRepo:
    """The notice log: one row per (pseudonym, reference), updated by delivery statuses."""

    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    async def add(self, *, reference: str, citizen_id: int, pseudonym: Pseudonym,
                  template_name: str, template_language: str, template_version: str,
                  requested_by: str) -> tuple[Notice, bool]:
        """The notice for (pseudonym, reference), created if new; the flag says whether."""
        stmt = (
            self._scope.insert(NoticeRow)
            .values(reference=reference, citizen_id=citizen_id, pseudonym=pseudonym,
                    template_name=template_name, template_language=template_language,
                    template_version=template_version, requested_by=requested_by,
                    created_at=utcnow())
            .on_conflict_do_nothing(index_elements=["pseudonym", "reference"])
            .returning(NoticeRow)
        )
        async with self._scope.session() as session:
            row = await session.scalar(stmt)
            if row is not None:
                return _notice(row), True
            existing = await session.scalar(select(NoticeRow).where(
                NoticeRow.pseudonym == pseudonym, NoticeRow.reference == reference))
            assert existing is not None  # the conflict was on exactly this pair
            return _notice(existing), False

    async def find(self, pseudonym: Pseudonym, reference: str) -> Notice | None:
        return await self._one(NoticeRow.pseudonym == pseudonym, NoticeRow.reference == reference)

    async def get(self, notice_id: int) -> Notice | None:
        return await self._one(NoticeRow.id == notice_id)

    async def list(self, *, reference: str | None = None, pseudonym: Pseudonym | None = None,
                   citizen_id: int | None = None, limit: int = 100) -> builtins.list[Notice]:
        """Entries, newest first."""
        stmt = select(NoticeRow)
        if reference is not None:
            stmt = stmt.where(NoticeRow.reference == reference)
        if pseudonym is not None:
            stmt = stmt.where(NoticeRow.pseudonym == pseudonym)
        if citizen_id is not None:
            stmt = stmt.where(NoticeRow.citizen_id == citizen_id)
        async with self._scope.session() as session:
            rows = await session.scalars(stmt.order_by(NoticeRow.id.desc()).limit(limit))
            return [_notice(r) for r in rows]

    async def mark_accepted(self, notice_id: int, wamid_hash: WamidHash) -> None:
        """Graph accepted the template message: its wamid's hash, and the send time."""
        stmt = (update(NoticeRow).where(NoticeRow.id == notice_id)
                .values(wamid_hash=wamid_hash, sent_at=utcnow()))
        async with self._scope.session() as session:
            await session.execute(stmt)

    async def mark_failed(self, notice_id: int, error: str) -> None:
        """The notice will not be sent (permanent error, consent withdrawn, erasure)."""
        await self._fail(error, NoticeRow.id == notice_id)

    async def fail_unsent(self, citizen_id: int, error: str) -> int:
        """Mark a citizen's notices not yet accepted by WhatsApp as failed; returns how many."""
        return await self._fail(error, NoticeRow.citizen_id == citizen_id,
                                NoticeRow.wamid_hash.is_(None))

    async def forget_wamids(self, citizen_id: int) -> int:
        """Unlink a citizen's entries from their messages (erasure): the wamid hashes go,
        the entries stay (by pseudonym). Returns how many entries had one."""
        stmt = (update(NoticeRow)
                .where(NoticeRow.citizen_id == citizen_id, NoticeRow.wamid_hash.is_not(None))
                .values(wamid_hash=None))
        async with self._scope.session() as session:
            return rowcount(await session.execute(stmt))

    async def record_status(self, wamid_hash: WamidHash, status: str, at: datetime,
                            error: str | None = None) -> bool:
        """Apply a webhook status to the notice whose wamid has this hash; True if that
        changed its entry. The first report of each status wins: a redelivery changes
        nothing."""
        column = STATUS_COLUMNS.get(status)
        if column is None:
            return False
        values: dict[str, Any] = {column: at}
        if status == "failed":
            values["error"] = (error or "error")[:255]
        stmt = (update(NoticeRow)
                .where(NoticeRow.wamid_hash == wamid_hash, getattr(NoticeRow, column).is_(None))
                .values(**values))
        async with self._scope.session() as session:
            return rowcount(await session.execute(stmt)) > 0

    async def purge(self, before: datetime, *, dry_run: bool = False) -> int:
        """Delete log entries created before `before` (retention); returns how many."""
        return await purge_rows(self._scope, NoticeRow, NoticeRow.created_at < before,
                                dry_run=dry_run)

    async def _fail(self, error: str, *where: Any) -> int:
        stmt = (update(NoticeRow)
                .where(*where, NoticeRow.failed_at.is_(None))
                .values(failed_at=utcnow(), error=error[:255]))
        async with self._scope.session() as session:
            return rowcount(await session.execute(stmt))

    async def _one(self, *where: Any) -> Notice | None:
        async with self._scope.session() as session:
            row = await session.scalar(select(NoticeRow).where(*where))
            return None if row is None else _notice(row)


def _notice(row: NoticeRow) -> Notice:
    return Notice(
        id=row.id, reference=row.reference, citizen_id=row.citizen_id,
        pseudonym=Pseudonym(row.pseudonym), template_name=row.template_name,
        template_language=row.template_language, template_version=row.template_version,
        wamid_hash=WamidHash(row.wamid_hash) if row.wamid_hash else None,
        requested_by=row.requested_by, created_at=row.created_at,
        sent_at=row.sent_at, delivered_at=row.delivered_at, read_at=row.read_at,
        failed_at=row.failed_at, error=row.error,
    )
