"""Dead letters: what happens when a queued item fails for good, and what admins can do.

The inbound worker and the outbox set such an item aside (status "dead", payload still
encrypted; `bridge.db.deadletters`) and call `announce`: the item is counted
(`civic_bridge_dead_letters_total{source,reason}`, gauge
`civic_bridge_dead_letters_current`), logged by id and reason class, and announced as a
notice in the conversation it concerns (its portal or agency room) or else in the
management room (`admin.management_room`). No notice, log line or listing carries
content or identifiers: only the dead letter's id, source, lane kind and reason class.

Admins list them (`GET /admin/v1/dead-letters`, `civic-bridge admin dead-letters`) and
retry (back to pending, the worker or outbox woken) or discard them, each audited with
who and why. A caller that meets a permanent failure elsewhere can use the same path:
set the row aside in its repository and `await dead_letters.announce(id)`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from bridge.db import Database, DeadLetter
from bridge.errors import NotFound
from bridge.metrics import Metrics
from bridge.texts.matrix import default as mx_text
from bridge.types import RoomID

log = logging.getLogger(__name__)

Notify = Callable[[RoomID, str], Awaitable[Any]]
WakeInbound = Callable[[Any, str], None]  # (source, lane)
WakeOutbox = Callable[[], None]

WHY: Final = mx_text.DEAD_LETTER_WHY
WHAT: Final = mx_text.DEAD_LETTER_WHAT


def notice_text(letter: DeadLetter, detail: str | None = None) -> str:
    """The notice to staff or admins: what failed and why, never content."""
    why = detail or WHY.get(letter.reason, WHY["internal"])
    what = WHAT.get(letter.source, WHAT["matrix"])
    head = (mx_text.DEAD_LETTER_HEAD_OUTBOX if letter.source == "outbox"
            else mx_text.DEAD_LETTER_HEAD).format(what=what, why=why)
    return mx_text.DEAD_LETTER_NOTICE.format(head=head, id=letter.id)


def as_json(letter: DeadLetter) -> dict[str, Any]:
    """What the admin API shows of a dead letter: no payload, room or person."""
    return {"id": letter.id, "source": letter.source, "lane_kind": letter.lane_kind,
            "reason": letter.reason, "error": letter.error, "attempts": letter.attempts,
            "first_failed_at": letter.first_failed_at.isoformat(),
            "last_failed_at": letter.last_failed_at.isoformat()}


class DeadLetters:
    """Announces new dead letters; lists, retries and discards them for admins."""

    def __init__(self, db: Database, metrics: Metrics, notify: Notify,
                 management_room: str | None = None) -> None:
        self._db = db
        self._metrics = metrics
        self._notify = notify
        self._management_room = RoomID(management_room) if management_room else None
        self.wake_inbound: WakeInbound | None = None
        self.wake_outbox: WakeOutbox | None = None

    async def announce(self, dead_letter_id: str, detail: str | None = None) -> None:
        """Count, log and tell the room a new dead letter concerns. Never raises: the
        dead letter is stored already, and a queue must go on whatever this costs."""
        try:
            letter = await self._db.dead_letters.get(dead_letter_id)
            if letter is None:
                return  # retried or discarded meanwhile
            self._metrics.dead_letters.labels(letter.source, letter.reason).inc()
            await self.refresh_gauge()
            room = await self._room_for(letter)
            if room is None:
                log.warning("dead letter %s (%s %s, %s): no room to announce it in",
                            letter.id, letter.source, letter.lane_kind, letter.reason)
                return
            await self._notify(room, notice_text(letter, detail))
        except Exception as exc:
            log.error("could not announce dead letter %s: %s", dead_letter_id,
                      type(exc).__name__)

    async def refresh_gauge(self) -> None:
        self._metrics.dead_letters_current.set(await self._db.dead_letters.count())

    async def _room_for(self, letter: DeadLetter) -> RoomID | None:
        """The open agency room (portal) the item belongs to, else the management room."""
        if letter.room_id is not None:
            room = await self._db.rooms.get(letter.room_id)
            if room is not None and room.closed_at is None:
                return letter.room_id
        citizen_id = letter.citizen_id
        if citizen_id is None and letter.lane.startswith("citizen:"):
            citizen = await self._db.citizens.by_index(letter.lane.removeprefix("citizen:"))
            citizen_id = citizen.id if citizen is not None else None
        if citizen_id is not None:
            portal = await self._db.rooms.portal_for(citizen_id)
            if portal is not None and portal.closed_at is None:
                return RoomID(portal.room_id)
        return self._management_room

    # --- admin verbs ------------------------------------------------------------------

    async def list(self) -> list[dict[str, Any]]:
        return [as_json(d) for d in await self._db.dead_letters.list()]

    async def retry(self, actor: str, dead_letter_id: str, reason: str) -> dict[str, Any]:
        """Back to its queue as pending; audited. NotFound if there is no such letter."""
        letter = await self._db.dead_letters.retry(dead_letter_id)
        await self._audit(actor, "dead_letter.retry", dead_letter_id, letter, reason)
        assert letter is not None
        if letter.source == "outbox":
            if self.wake_outbox is not None:
                self.wake_outbox()
        elif self.wake_inbound is not None:
            self.wake_inbound(letter.source, letter.lane)
        return {**as_json(letter), "status": "pending"}

    async def discard(self, actor: str, dead_letter_id: str, reason: str) -> dict[str, Any]:
        """Give it up for good; audited. NotFound if there is no such letter."""
        letter = await self._db.dead_letters.discard(dead_letter_id)
        await self._audit(actor, "dead_letter.discard", dead_letter_id, letter, reason)
        assert letter is not None
        return {**as_json(letter), "status": "discarded"}

    async def _audit(self, actor: str, action: str, dead_letter_id: str,
                     letter: DeadLetter | None, reason: str) -> None:
        if letter is None:
            raise NotFound("no such dead letter")
        await self._db.audit.append(actor, action, dead_letter_id, "ok", reason)
        await self.refresh_gauge()
        log.info("%s %s by %s", action, dead_letter_id, actor)
