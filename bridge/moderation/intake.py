"""Where reports come from: Synapse's event reports (the client's report button),
WhatsApp citizens' DENUNCIAR, and messages matching `moderation.flag_terms`.

The bot's device decrypts every event in agency rooms (it is a member of each), so
flagging reads the same plaintext staff read; nothing is ever deleted automatically.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

import aiohttp

from bridge.config import Config
from bridge.db import Citizen, Database
from bridge.matrix.api import MatrixError
from bridge.matrix.relay import StaffEvent
from bridge.metrics import Metrics
from bridge.moderation import texts
from bridge.moderation.reports import Reports
from bridge.moderation.rules import flagged_term, report_request
from bridge.moderation.synapse_admin import SynapseAdmin
from bridge.privacy import Privacy
from bridge.texts.management import default as mgmt_text
from bridge.types import EventID, RoomID, UserID
from bridge.whatsapp.outbox import Outbox, reply_key
from bridge.whatsapp.webhook_parse import InboundMessage

log = logging.getLogger(__name__)
T = TypeVar("T")
SEEN_KEY = "reports:synapse_seen"  # the highest Synapse report id already looked at
MAX_PAGES = 50


class ReportPoller:
    """Reads Synapse's event reports every `moderation.reports_poll_seconds` (leader only).

    Synapse numbers reports in order; the highest id looked at is kept, so each poll
    reads only what is new, and a restart resumes where it stopped. Reports about rooms
    that are not the bridge's are left in Synapse's list, untouched.

    A poll touches the database only when Synapse has something new, and that work is
    finished before a cancellation (shutdown) takes effect: a statement cancelled
    half-way can leave SQLite's write lock held, and the next start would find the
    database locked.
    """

    def __init__(self, db: Database, admin: SynapseAdmin, reports: Reports,
                 every: float, metrics: Metrics) -> None:
        self._db = db
        self._admin = admin
        self._reports = reports
        self._every = every
        self._metrics = metrics
        self._seen: int | None = None

    async def poll_once(self) -> int:
        """File every new report; returns how many were filed."""
        if self._seen is None:
            self._seen = await _uncancelled(self._read_seen())
        new = await self._fetch_new(self._seen)
        return await _uncancelled(self._file(new)) if new else 0

    async def _read_seen(self) -> int:
        return int(await self._db.kv.get(SEEN_KEY) or 0)

    async def _fetch_new(self, seen: int) -> list[dict[str, Any]]:
        new: list[dict[str, Any]] = []
        start: int | None = 0
        for _ in range(MAX_PAGES):
            assert start is not None
            page, start = await self._admin.event_reports(start)
            fresh = [r for r in page if isinstance(r.get("id"), int) and int(r["id"]) > seen]
            new.extend(fresh)
            if start is None or len(fresh) < len(page):
                break
        return sorted(new, key=lambda r: int(r["id"]))

    async def _file(self, new: list[dict[str, Any]]) -> int:
        filed = 0
        for raw in new:
            report = await self._reports.file(
                source="matrix", external_id=f"synapse:{raw['id']}",
                room_id=RoomID(str(raw.get("room_id", ""))),
                event_id=EventID(str(raw.get("event_id", ""))),
                reporter=UserID(str(raw.get("user_id", ""))),
                reason=raw["reason"] if isinstance(raw.get("reason"), str) else None,
                author=UserID(str(raw["sender"])) if isinstance(raw.get("sender"), str)
                else None)
            filed += report is not None
            await self._db.kv.set(SEEN_KEY, str(raw["id"]))
            self._seen = int(raw["id"])
        return filed

    async def run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except (MatrixError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                # e.g. a token that is not an admin's: M_FORBIDDEN, every poll, loudly.
                self._metrics.moderation_undelivered.labels("poll").inc()
                log.warning("reading Synapse's event reports failed (%s); check "
                            "moderation.synapse_admin_token", getattr(exc, "errcode",
                                                                      type(exc).__name__))
            await asyncio.sleep(self._every)


async def _uncancelled(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to its end even if the caller is cancelled meanwhile (then re-raise)."""
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


class WhatsAppReports:
    """A citizen replies to a message in their portal with DENUNCIAR [reason]."""

    def __init__(self, db: Database, privacy: Privacy, outbox: Outbox,
                 reports: Reports) -> None:
        self._db = db
        self._privacy = privacy
        self._outbox = outbox
        self._reports = reports

    async def __call__(self, citizen: Citizen, room_id: RoomID, msg: InboundMessage) -> bool:
        """True if the message was a report (then it is not mirrored)."""
        if msg.kind != "text" or not msg.text or citizen.ghost_user_id is None:
            return False
        request = report_request(msg.text)
        if request is None:
            return False
        language, reason = request
        index = self._privacy.index
        link = await self._db.messages.by_wamid(index.wamid(msg.context_id)) \
            if msg.context_id else None
        if msg.context_id is None:
            await self._outbox.system_text(citizen, reply_key("report-howto",
                                                              index.wamid(msg.wamid)),
                                           texts.how_to_report(language))
            return True
        if link is None or link.room_id != room_id or link.direction != "out":
            # Only what reached them from the room can be reported: their own messages
            # or unknown ids are answered, not filed.
            await self._outbox.system_text(citizen, reply_key("report-unknown",
                                                              index.wamid(msg.wamid)),
                                           texts.not_found(language))
            return True
        await self._reports.file(
            source="whatsapp", external_id="wa:" + index.wamid(msg.wamid),
            room_id=room_id, event_id=link.event_id, reporter=citizen.ghost_user_id,
            reason=reason, language=language)
        return True


class Flagger:
    """A relay StaffHandler: flags messages in agency rooms that match the room's terms."""

    def __init__(self, config: Config, db: Database, reports: Reports, bot: UserID,
                 metrics: Metrics) -> None:
        self._config = config.moderation
        self._db = db
        self._reports = reports
        self._bot = bot
        self._metrics = metrics

    async def __call__(self, event: StaffEvent) -> None:
        if event.type != "m.room.message":
            return
        edited = event.content.get("m.new_content")
        body = (edited if isinstance(edited, dict) else event.content).get("body")
        if isinstance(body, str):
            await self.check(event.room_id, event.event_id, event.sender, body)

    async def check(self, room_id: RoomID, event_id: EventID, author: UserID,
                    body: str) -> None:
        """Flag `body` (posted as `event_id` by `author`) if it matches the room's terms.

        Also called by the WhatsApp mirror with the text a citizen wrote: the bridge
        posts it as their ghost, whose echo the relay does not read back.
        """
        terms = self._config.terms_for(room_id)
        term = flagged_term(body, terms) if terms else None
        if term is None:
            return
        report = await self._reports.file(
            source="flag", external_id=f"flag:{event_id}", room_id=room_id,
            event_id=event_id, reporter=self._bot, reason=mgmt_text.FLAG_REASON.format(term=term),
            author=author)
        if report is not None:
            self._metrics.flags.inc()
