"""Reports and flags: what moderators are asked to look at, and what they did about it.

One row per report, whatever its source: the client's report button (read from
Synapse's event reports), a WhatsApp citizen's DENUNCIAR, or a message the bridge
flagged. `external_id` makes each arrival idempotent (a Synapse report id, a keyed hash
of the citizen's wamid, the flagged event id), so re-polling or a redelivered webhook
never files a report twice. The reason is whatever the reporter wrote: it is stored
only encrypted (privacy Cipher, AAD_REPORT_REASON).
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import (
    CheckConstraint,
    Integer,
    String,
    Text,
    case,
    cast,
    literal,
    select,
    update,
)
from sqlalchemy.orm import Mapped, mapped_column

from bridge.db.models import ID, Base, UTCDateTime, one_of, utcnow
from bridge.db.scope import Scope, purge_rows, rowcount
from bridge.types import EventID, RoomID, UserID

# Additional data of a sealed reason: a ciphertext cannot be moved to another column.
AAD_REPORT_REASON = b"report.reason"
ReportSource = Literal["matrix", "whatsapp", "flag"]
REPORT_SOURCES: tuple[str, ...] = ("matrix", "whatsapp", "flag")
# "open", or the one action that closed it.
REPORT_STATUSES: tuple[str, ...] = ("open", "redact", "mute", "kick", "ban", "dismiss")
ERASED = "(erased)"  # the reporter of a report whose reporter was erased (GDPR art. 17)


class ReportRow(Base):
    __tablename__ = "reports"
    __table_args__ = (CheckConstraint(one_of("source", REPORT_SOURCES), name="source"),
                      CheckConstraint(one_of("status", REPORT_STATUSES), name="status"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(16))
    external_id: Mapped[str] = mapped_column(ID, unique=True)
    room_id: Mapped[str] = mapped_column(ID)
    event_id: Mapped[str] = mapped_column(ID)
    # Matrix user IDs: pseudonymous accounts, ghosts, staff, or the bot for a flag.
    reporter: Mapped[str] = mapped_column(ID)
    author: Mapped[str | None] = mapped_column(ID)
    reason_ct: Mapped[str | None] = mapped_column(Text)
    language: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)
    handled_by: Mapped[str | None] = mapped_column(String(255))
    handled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


@dataclass(frozen=True, slots=True)
class Report:
    id: int
    source: ReportSource
    external_id: str
    room_id: RoomID
    event_id: EventID
    reporter: UserID
    author: UserID | None
    reason_ct: str | None
    language: str
    status: str
    handled_by: str | None
    handled_at: datetime | None
    created_at: datetime


class ReportRepo:
    """Reports, filed once per external id and closed once."""

    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    async def add(self, *, source: ReportSource, external_id: str, room_id: RoomID,
                  event_id: EventID, reporter: UserID, author: UserID | None,
                  reason_ct: str | None, language: str) -> tuple[Report, bool]:
        """File a report; (the report, True) if new, (the earlier one, False) if known."""
        stmt = (
            self._scope.insert(ReportRow)
            .values(source=source, external_id=external_id, room_id=room_id,
                    event_id=event_id, reporter=reporter, author=author, reason_ct=reason_ct,
                    language=language, status="open", created_at=utcnow())
            .on_conflict_do_nothing()
            .returning(ReportRow.id)
        )
        async with self._scope.session() as session:
            new_id = await session.scalar(stmt)
            found = select(ReportRow).where(ReportRow.external_id == external_id)
            row = await session.get(ReportRow, new_id) if new_id is not None else \
                await session.scalar(found)
            assert row is not None
            return _report(row), new_id is not None

    async def known(self, external_ids: builtins.list[str]) -> set[str]:
        """Which of `external_ids` were filed already."""
        if not external_ids:
            return set()
        stmt = select(ReportRow.external_id).where(ReportRow.external_id.in_(external_ids))
        async with self._scope.session() as session:
            return set(await session.scalars(stmt))

    async def open_for(self, event_id: EventID, reporter: UserID) -> Report | None:
        """The reporter's open report about this event, if any."""
        stmt = select(ReportRow).where(ReportRow.event_id == event_id,
                                       ReportRow.reporter == reporter,
                                       ReportRow.status == "open").limit(1)
        async with self._scope.session() as session:
            row = await session.scalar(stmt)
            return None if row is None else _report(row)

    async def get(self, report_id: int) -> Report | None:
        async with self._scope.session() as session:
            row = await session.get(ReportRow, report_id)
            return None if row is None else _report(row)

    async def list(self, *, status: str | None = None, limit: int = 100,
                   before_id: int | None = None) -> builtins.list[Report]:
        """Newest first; `status` "open" for what still waits for a moderator."""
        stmt = select(ReportRow).order_by(ReportRow.id.desc()).limit(limit)
        if status is not None:
            stmt = stmt.where(ReportRow.status == status)
        if before_id is not None:
            stmt = stmt.where(ReportRow.id < before_id)
        async with self._scope.session() as session:
            return [_report(r) for r in await session.scalars(stmt)]

    async def close(self, report_id: int, action: str, actor: str) -> bool:
        """Record the action that closed an open report; False if it was not open."""
        stmt = (update(ReportRow)
                .where(ReportRow.id == report_id, ReportRow.status == "open")
                .values(status=action, handled_by=actor, handled_at=utcnow()))
        async with self._scope.session() as session:
            return rowcount(await session.execute(stmt)) == 1

    async def sealed(self) -> builtins.list[tuple[int, str]]:
        """(id, reason ciphertext) of every report with a reason (for `rekey`)."""
        stmt = select(ReportRow.id, ReportRow.reason_ct).where(ReportRow.reason_ct.is_not(None))
        async with self._scope.session() as session:
            return [(i, str(ct)) for i, ct in (await session.execute(stmt)).all()]

    async def reseal(self, report_id: int, reason_ct: str) -> None:
        stmt = update(ReportRow).where(ReportRow.id == report_id).values(reason_ct=reason_ct)
        async with self._scope.session() as session:
            await session.execute(stmt)

    async def forget_reporter(self, user_id: UserID) -> int:
        """An erased citizen's reports stay for the moderators, without their reason and
        with the reporter replaced by ERASED; returns how many. A WhatsApp report's
        external id (the keyed hash of the citizen's message) becomes `erased:<id>`,
        so nothing links the report to that message any more."""
        erased_id = case((ReportRow.source == "whatsapp",
                          literal("erased:") + cast(ReportRow.id, String)),
                         else_=ReportRow.external_id)
        stmt = (update(ReportRow).where(ReportRow.reporter == user_id)
                .values(reporter=ERASED, reason_ct=None, external_id=erased_id))
        async with self._scope.session() as session:
            return rowcount(await session.execute(stmt))

    async def purge(self, handled_before: datetime, *, dry_run: bool = False) -> int:
        """Delete reports handled before `handled_before` (retention); returns how many."""
        return await purge_rows(self._scope, ReportRow, ReportRow.status != "open",
                                ReportRow.handled_at < handled_before, dry_run=dry_run)

    async def reopen(self, report_id: int) -> None:
        """Undo `close` when the action itself then failed on the homeserver."""
        stmt = (update(ReportRow).where(ReportRow.id == report_id)
                .values(status="open", handled_by=None, handled_at=None))
        async with self._scope.session() as session:
            await session.execute(stmt)


def _report(row: ReportRow) -> Report:
    return Report(
        id=row.id, source=row.source,  # type: ignore[arg-type]
        external_id=row.external_id, room_id=RoomID(row.room_id),
        event_id=EventID(row.event_id), reporter=UserID(row.reporter),
        author=UserID(row.author) if row.author else None, reason_ct=row.reason_ct,
        language=row.language, status=row.status, handled_by=row.handled_by,
        handled_at=row.handled_at, created_at=row.created_at)
