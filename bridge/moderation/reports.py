"""Reports: filed from any source, shown to moderators, closed by one action.

`file` stores a report (once per external id), tells the reporter it arrived and posts
a notice to the management rooms with the room, the pseudonyms of author and reporter,
the reason and the commands that act on it. `act` closes it with one of redact, mute,
kick, ban or dismiss, carried out by `Moderation` (which audits the room action) and
audited again as `report.<action>`; the reporter is then told it was handled.
The reason is stored encrypted and shown only in the (end-to-end encrypted) management
room: never in the admin API's list, the audit log or the logs.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote

from bridge.admin.moderation import Moderation
from bridge.db import Database
from bridge.db.reports import AAD_REPORT_REASON, Report, ReportSource
from bridge.errors import Conflict, InvalidParam, NotFound
from bridge.matrix.api import MatrixAPI, MatrixError
from bridge.matrix.rooms import Rooms
from bridge.metrics import Metrics
from bridge.moderation import texts
from bridge.moderation.notify import ManagementRooms, Reporters
from bridge.moderation.rules import ACTIONS, Action, action_of
from bridge.privacy import Cipher
from bridge.types import EventID, RoomID, UserID

log = logging.getLogger(__name__)
MAX_REASON = 1000


class Reports:
    """Files reports and carries out what moderators decide."""

    def __init__(self, db: Database, api: MatrixAPI, rooms: Rooms, bot: UserID,
                 cipher: Cipher, moderation: Moderation, management: ManagementRooms,
                 reporters: Reporters, metrics: Metrics) -> None:
        self._db = db
        self._api = api
        self._rooms = rooms
        self._bot = bot
        self._cipher = cipher
        self._moderation = moderation
        self.management = management
        self._reporters = reporters
        self._metrics = metrics

    async def file(self, *, source: ReportSource, external_id: str, room_id: RoomID,
                   event_id: EventID, reporter: UserID, reason: str | None,
                   language: str | None = None, author: UserID | None = None
                   ) -> Report | None:
        """File a report about an event in an agency room; None if the room is not one of
        the bridge's (the report stays where it came from). Idempotent by `external_id`."""
        room = await self._db.rooms.get(room_id)
        if room is None or room.kind == "management":
            return None
        # The same person reporting the same message again while it is open adds nothing
        # for moderators: it would only flood the management room.
        earlier = await self._db.reports.open_for(event_id, reporter)
        if earlier is not None:
            return earlier
        if author is None:
            author = await self._author(room_id, event_id)
        text = (reason or "").strip()[:MAX_REASON] or None
        lang = language or (await self._reporters.language(reporter)
                            if source == "matrix" else "es")
        report, created = await self._db.reports.add(
            source=source, external_id=external_id, room_id=room_id, event_id=event_id,
            reporter=reporter, author=author, language=lang,
            reason_ct=self._cipher.encrypt(text, aad=AAD_REPORT_REASON) if text else None)
        if not created:
            return report
        self._metrics.reports.labels(source).inc()
        actor = "bridge" if source == "flag" else reporter
        await self._db.audit.append(actor, "flag.open" if source == "flag" else "report.open",
                                    f"report {report.id} {room_id} {event_id}", "ok", None)
        told = source == "flag" or await self._reporters.tell(
            source, reporter, f"report:{report.id}:received", texts.received(lang, report.id))
        names = await self._names(room_id)
        await self.management.post(texts.report_notice(
            report_id=report.id, source=source, room_name=room.name, room_id=room_id,
            event_id=event_id, author=_who(author, names), reporter=_who(reporter, names),
            reason=text, reporter_told=told))
        return report

    async def _author(self, room_id: RoomID, event_id: EventID) -> UserID | None:
        try:
            event = await self._api.request(
                "GET", f"/_matrix/client/v3/rooms/{_q(room_id)}/event/{_q(event_id)}",
                as_user=self._bot)
        except MatrixError as exc:
            log.warning("reported event not readable by the bot (%s)", exc.errcode)
            return None
        sender = event.get("sender")
        return UserID(sender) if isinstance(sender, str) else None

    async def _names(self, room_id: RoomID) -> dict[str, str]:
        try:
            return {m.user_id: m.display_name or "" for m in await self._rooms.members(room_id)}
        except MatrixError:
            return {}

    async def act(self, actor: str, report_id: int, word: str, why: str | None = None
                  ) -> dict[str, Any]:
        """Close an open report with one action; every step is audited under `actor`."""
        action = action_of(word)
        if action is None:
            raise InvalidParam(f"action must be one of {', '.join(ACTIONS)} (or borrar, "
                               "silenciar, expulsar, vetar, descartar)")
        report = await self._db.reports.get(report_id)
        if report is None:
            raise NotFound("no such report")
        if report.status != "open":
            raise Conflict(f"report {report_id} was already handled ({report.status})")
        if action in ("mute", "kick", "ban") and report.author is None:
            raise InvalidParam("the author of the reported message is not known; use redact "
                               "or dismiss")
        reason = f"denuncia {report.id}" + (f": {why.strip()}" if why and why.strip() else "")
        # Claimed first, so two moderators acting at once do not both act.
        if not await self._db.reports.close(report.id, action, actor):
            raise Conflict(f"report {report_id} was already handled")
        try:
            await self._carry_out(actor, report, action, reason)
        except Exception:
            await self._db.reports.reopen(report.id)
            await self._db.audit.append(actor, f"report.{action}", f"report {report.id}",
                                        "error", None)
            raise
        await self._db.audit.append(actor, f"report.{action}", f"report {report.id}", "ok",
                                    why.strip() if why and why.strip() else None)
        self._metrics.report_actions.labels(action).inc()
        told = True
        if report.source != "flag":
            told = await self._reporters.tell(
                report.source, report.reporter, f"report:{report.id}:handled",
                texts.handled(report.language, report.id, action))
        return {"id": report.id, "status": action, "reporter_told": told}

    async def _carry_out(self, actor: str, report: Report, action: Action,
                         reason: str) -> None:
        m, room = self._moderation, report.room_id
        if action == "redact":
            await m.redact(actor, room, report.event_id, reason)
        elif action == "mute":
            await m.mute(actor, room, str(report.author), reason)
        elif action in ("kick", "ban"):
            await m.membership(actor, action, room, str(report.author), reason)

    def reason(self, report: Report) -> str | None:
        """The reporter's words, for the management room only."""
        if report.reason_ct is None:
            return None
        return self._cipher.decrypt_str(report.reason_ct, aad=AAD_REPORT_REASON)

    async def open_reports(self, limit: int = 50) -> list[Report]:
        return await self._db.reports.list(status="open", limit=limit)

    async def listing(self, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Reports for the admin API: pseudonymous IDs and states, never the reason or the
        reported content."""
        return [{"id": r.id, "source": r.source, "status": r.status, "room_id": r.room_id,
                 "event_id": r.event_id, "reporter": r.reporter, "author": r.author,
                 "has_reason": r.reason_ct is not None,
                 "created_at": r.created_at.isoformat(),
                 "handled_by": r.handled_by,
                 "handled_at": r.handled_at.isoformat() if r.handled_at else None}
                for r in await self._db.reports.list(status=status, limit=limit)]


def _who(user_id: str | None, names: dict[str, str]) -> str:
    if user_id is None:
        return "(unknown)"
    name = names.get(user_id)
    return f"{name} ({user_id})" if name else user_id


def _q(value: str) -> str:
    return quote(value, safe="")
