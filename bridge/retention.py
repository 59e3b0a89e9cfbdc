"""The scheduled retention purge, which must outlive any one bad row.

Every kind of kept data has a period (`retention.*`, and the older
`consent.hold_hours`, `notices.log_retention_days`, `moderation.reports_retention_days`).
Each step (one kind of data past its period) runs on its own: a step that raises is
counted as failed and the others still run; rows a step cannot handle are skipped and
counted, and the rest go. Every run ends with one report line and the
`civic_bridge_retention_*` metrics; the loop runs again whatever happened.

A dry run (`civic-bridge purge --dry-run`) goes through the same steps with the same
conditions and only counts. An offline run (`civic-bridge purge`, next to a running
bridge) leaves the few rows whose removal needs the bridge's own Matrix devices (a
contact with a ghost or a portal) to the running bridge, and says so.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final, NamedTuple, Protocol

from bridge.config import Config
from bridge.db import Citizen, Database
from bridge.db.queues import FINISHED_RETENTION
from bridge.invites.rights import InviteAccounts
from bridge.metrics import Metrics
from bridge.privacy import Cipher
from bridge.whatsapp.outbound import WINDOW
from bridge.whatsapp.webhook_parse import citizen_lane

log = logging.getLogger(__name__)

EVERY_SECONDS: Final = 600.0
BATCH: Final = 500  # contacts erased per run at most; the next run goes on

# (what the report says, metric label) per step, in the order they run.
STEPS: Final = (
    ("expired held messages", "held_inbound"),
    ("finished queue rows", "finished_queue_rows"),
    ("transaction ids", "transaction_ids"),
    ("unconfirmed staff messages", "held_staff_messages"),
    ("notice log entries", "notice_log"),
    ("handled reports", "handled_reports"),
    ("settled outbox sends", "outbox"),
    ("message map pairs", "message_map"),
    ("never-consented contacts", "never_consented"),
    ("spent invite links", "invite_links"),
    ("unused invite accounts", "unused_invite_accounts"),
    ("dead letters", "dead_letters"),
    ("undelivered room messages", "room_backlog"),
    ("room message map pairs", "room_message_map"),
)
# Where each step deletes, for the per-table report of `civic-bridge purge`.
TABLES: Final = {
    "held_inbound": "inbound", "finished_queue_rows": "inbound",
    "transaction_ids": "processed_transactions",
    "held_staff_messages": "held_staff_messages",
    "notice_log": "notices", "handled_reports": "reports", "outbox": "outbox",
    "message_map": "message_map", "never_consented": "citizens",
    "invite_links": "invite_links", "unused_invite_accounts": "invite_accounts",
    "dead_letters": "inbound+outbox", "room_backlog": "wa_room_backlog",
    "room_message_map": "wa_room_messages",
}


class Outcome(NamedTuple):
    deleted: int
    failed: int = 0  # rows the step could not handle (or the whole step: 1)
    left: int = 0  # rows deliberately left for now, see `why`
    why: str = ""


Step = Callable[[datetime, bool], Awaitable[Outcome]]


class ContactEraser(Protocol):
    """The erasure path (bridge.admin.citizens.CitizenData.erase_citizen)."""

    async def erase_citizen(self, citizen: Citizen, actor: str, reason: str | None, *,
                            keep_new_messages: bool = False) -> object: ...


@dataclass
class PurgeReport:
    dry_run: bool = False
    deleted: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    left: dict[str, tuple[int, str]] = field(default_factory=dict)

    def line(self) -> str:
        parts = [f"{n} {what}" for what, n in self.deleted.items() if n]
        parts += [f"{what}: {n} failed" for what, n in self.failed.items()]
        parts += [f"{what}: {n} left ({why})" for what, (n, why) in self.left.items()]
        return ", ".join(parts) or "nothing to delete"

    def lines(self) -> list[str]:
        """One line per step: the table, what, how many (for `civic-bridge purge`)."""
        verb = "would be deleted" if self.dry_run else "deleted"
        out = []
        for what, label in STEPS:
            if what not in self.deleted:
                continue
            text = f"{TABLES[label]}: {self.deleted[what]} {what} {verb}"
            if self.failed.get(what):
                text += f", {self.failed[what]} failed"
            if what in self.left:
                n, why = self.left[what]
                text += f", {n} left ({why})"
            out.append(text)
        return out


def _count(n: int) -> Outcome:
    return Outcome(n)


class Retention:
    """Runs the purge once (`run`) or for ever (`loop`).

    `contacts` erases never-consented contacts and `accounts` retires unused invite
    accounts; a Retention built without them (storage tests) leaves those steps out.
    """

    def __init__(self, db: Database, cipher: Cipher, config: Config,
                 metrics: Metrics | None = None, *, contacts: ContactEraser | None = None,
                 accounts: InviteAccounts | None = None, offline: bool = False) -> None:
        self._db = db
        self._metrics = metrics
        self._contacts = contacts
        self._offline = offline
        notice_days = timedelta(days=config.notices.log_retention_days)
        report_days = timedelta(days=config.moderation.reports_retention_days)
        r = config.retention
        self._silent = timedelta(days=r.never_consented_days)

        async def dead_letters(now: datetime, dry: bool) -> Outcome:
            ids = await db.dead_letters.purge(now - timedelta(days=r.dead_letters_days),
                                              dry_run=dry)
            if ids and not dry:
                # Ids only ("in-12", "out-7"): they name queue rows, never a person.
                await db.audit.append("retention", "dead_letters.purge", "dead-letters",
                                      "ok", ("older than retention.dead_letters_days: "
                                             + ", ".join(ids))[:2000])
            return _count(len(ids))

        self._steps: dict[str, Step] = {
            "held_inbound": lambda now, dry: self._n(
                db.inbound.purge_expired_holds(now, dry_run=dry)),
            "finished_queue_rows": lambda now, dry: self._n(
                db.inbound.purge_finished(now - FINISHED_RETENTION, dry_run=dry)),
            "transaction_ids": lambda now, dry: self._n(
                db.transactions.purge(now - FINISHED_RETENTION, dry_run=dry)),
            "held_staff_messages": lambda now, dry: self._n(
                db.held.purge(before=now - WINDOW, dry_run=dry)),
            "notice_log": lambda now, dry: self._n(
                db.notices.purge(now - notice_days, dry_run=dry)),
            "handled_reports": lambda now, dry: self._n(
                db.reports.purge(now - report_days, dry_run=dry)),
            "outbox": lambda now, dry: self._n(db.outbox.purge_settled(
                now - timedelta(days=r.outbox_days), dry_run=dry)),
            "message_map": lambda now, dry: self._n(db.messages.purge(
                now - timedelta(days=r.message_map_days), dry_run=dry)),
            "invite_links": lambda now, dry: self._n(db.invites.purge_links(
                now - timedelta(days=r.invite_links_days), dry_run=dry)),
            "dead_letters": dead_letters,
            "room_backlog": lambda now, dry: self._n(db.wa_rooms.purge_backlog(
                now - timedelta(days=config.rooms.backlog_days), dry_run=dry)),
            "room_message_map": lambda now, dry: self._n(db.wa_rooms.purge_messages(
                now - timedelta(days=r.message_map_days), dry_run=dry)),
        }
        if contacts is not None:
            self._steps["never_consented"] = self._never_consented
        if accounts is not None:
            made = timedelta(days=r.unused_invite_accounts_days)

            async def unused(now: datetime, dry: bool) -> Outcome:
                retired, failed, unchecked = await accounts.purge_unused(now - made,
                                                                         dry_run=dry)
                return Outcome(retired, failed, unchecked,
                               "cannot tell without moderation.synapse_admin_token")

            self._steps["unused_invite_accounts"] = unused

    @staticmethod
    async def _n(count: Awaitable[int]) -> Outcome:
        return Outcome(await count)

    async def _never_consented(self, now: datetime, dry_run: bool) -> Outcome:
        """Contacts who never consented to anything and have been silent for
        retention.never_consented_days go the way of an erasure (audited each)."""
        assert self._contacts is not None
        deleted = failed = left = 0
        days = self._silent.days
        for citizen in await self._db.citizens.never_consented(now - self._silent, BATCH):
            lane = await self._db.inbound.count_lane("whatsapp", citizen_lane(citizen.index_hash))
            if lane.get("pending"):
                continue  # they just wrote again: that message is handled first
            if self._offline and (citizen.ghost_user_id is not None
                                  or await self._db.rooms.portal_for(citizen.id)):
                left += 1  # retiring a ghost needs the running bridge's devices
                continue
            if dry_run:
                deleted += 1
                continue
            try:
                await self._contacts.erase_citizen(
                    citizen, "retention", f"never consented; silent for {days} days "
                    "(retention.never_consented_days)", keep_new_messages=True)
                deleted += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("never-consented contact not erased (%s)", type(exc).__name__)
                failed += 1
        return Outcome(deleted, failed, left, "they have a portal: the running bridge "
                                              "erases them")

    async def run(self, now: datetime, *, dry_run: bool = False) -> PurgeReport:
        report = PurgeReport(dry_run=dry_run)
        for what, label in STEPS:
            step = self._steps.get(label)
            if step is None:
                continue
            try:
                outcome = await step(now, dry_run)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The kind only: a database error can quote the rows' values.
                log.error("retention purge: %s failed (%s)", what, type(exc).__name__)
                outcome = Outcome(0, 1)
            report.deleted[what] = outcome.deleted
            if outcome.failed:
                report.failed[what] = outcome.failed
            if outcome.left:
                report.left[what] = (outcome.left, outcome.why)
            if self._metrics is not None and not dry_run:
                self._metrics.retention_purged.labels(label).inc(outcome.deleted)
                self._metrics.retention_failures.labels(label).inc(outcome.failed)
        if dry_run:
            log.info("retention purge (dry run): %s", report.line())
            return report
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
