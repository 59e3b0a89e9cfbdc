"""The scheduled retention purge, which must outlive any one bad row.

Each step (one kind of data past its retention period) runs on its own: a step that
raises is counted as failed and the others still run; rows a step cannot read are
skipped and counted, and the rest go. Every run ends with one report line and the
`civic_bridge_retention_*` metrics; the loop runs again whatever happened.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final

from bridge.config import Config
from bridge.db import Database
from bridge.metrics import Metrics
from bridge.privacy import Cipher
from bridge.whatsapp.outbound import WINDOW, drop_held_report

log = logging.getLogger(__name__)

# Finished queue rows (and transaction ids) are kept this long to deduplicate redeliveries.
FINISHED_RETENTION: Final = timedelta(days=7)
EVERY_SECONDS: Final = 600.0

# (what the report says, metric label) per step, in the order they run.
STEPS: Final = (
    ("expired held messages", "held_inbound"),
    ("finished queue rows", "finished_queue_rows"),
    ("transaction ids", "transaction_ids"),
    ("unconfirmed staff messages", "held_staff_messages"),
    ("notice log entries", "notice_log"),
    ("handled reports", "handled_reports"),
    ("undelivered room messages", "room_backlog"),
)

# A step returns (rows deleted, rows it could not handle).
Step = Callable[[datetime], Awaitable[tuple[int, int]]]


@dataclass
class PurgeReport:
    deleted: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)  # rows (or the whole step: 1)

    def line(self) -> str:
        parts = [f"{n} {what}" for what, n in self.deleted.items() if n]
        parts += [f"{what}: {n} failed" for what, n in self.failed.items()]
        return ", ".join(parts) or "nothing to delete"


class Retention:
    """Runs the purge once (`run`) or for ever (`loop`)."""

    def __init__(self, db: Database, cipher: Cipher, config: Config,
                 metrics: Metrics | None = None) -> None:
        self._metrics = metrics
        notice_days = timedelta(days=config.notices.log_retention_days)
        report_days = timedelta(days=config.moderation.reports_retention_days)

        async def counted(n: Awaitable[int]) -> tuple[int, int]:
            return await n, 0

        self._steps: dict[str, Step] = {
            "expired held messages": lambda now: counted(db.inbound.purge_expired_holds(now)),
            "finished queue rows": lambda now: counted(
                db.inbound.purge_finished(now - FINISHED_RETENTION)),
            "transaction ids": lambda now: counted(
                db.transactions.purge(now - FINISHED_RETENTION)),
            "unconfirmed staff messages": lambda now: drop_held_report(
                db, cipher, before=now - WINDOW),
            "notice log entries": lambda now: counted(db.notices.purge(now - notice_days)),
            "handled reports": lambda now: counted(db.reports.purge(now - report_days)),
            "undelivered room messages": lambda now: counted(db.wa_rooms.purge_backlog(
                now - timedelta(days=config.rooms.backlog_days))),
        }

    async def run(self, now: datetime) -> PurgeReport:
        report = PurgeReport()
        for what, label in STEPS:
            try:
                deleted, failed = await self._steps[what](now)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The kind only: a database error can quote the rows' values.
                log.error("retention purge: %s failed (%s)", what, type(exc).__name__)
                deleted, failed = 0, 1
            report.deleted[what] = deleted
            if failed:
                report.failed[what] = failed
            if self._metrics is not None:
                self._metrics.retention_purged.labels(label).inc(deleted)
                self._metrics.retention_failures.labels(label).inc(failed)
        if self._metrics is not None:
            self._metrics.retention_runs.inc()
            self._metrics.retention_last_run.set(now.timestamp())
        level = logging.WARNING if report.failed else logging.INFO
        log.log(level, "retention purge: %s", report.line())
        return report

    async def loop(self, every: float = EVERY_SECONDS) -> None:
        """Purge every `every` seconds until cancelled; a failed run is retried next time."""
        while True:
            try:
                await self.run(datetime.now(UTC))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # run() contains its steps; this is the last net
                log.error("retention purge run failed (%s)", type(exc).__name__)
            await asyncio.sleep(every)
