"""Staff read receipts and typing in a portal → read ticks and "escribiendo…" on WhatsApp.

They arrive as ephemeral events in appservice transactions (`receive_ephemeral` in the
registration): `m.receipt` (`m.read` only; private receipts stay private) and
`m.typing`. Only staff count, never the bridge's own users (bot, ghosts). A read receipt
marks the citizen's newest message up to the event staff read (Graph's `status: read`,
which also marks the earlier ones; an event the message map does not know, such as a
bridge notice, counts as newer than every message); typing sends the typing indicator on
the citizen's newest message (it marks that read too), at most once per citizen every
TYPING_SECONDS (WhatsApp shows it for up to 25 s) and only while a free-form answer is
possible. What was last marked read is remembered per room as the message map's row id
(no identifier), so a repeated receipt sends nothing. Ephemeral events are not stored:
losing one costs a tick, not a message. `whatsapp.send_read_receipts: false` turns both
off.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

from bridge.db import Database
from bridge.metrics import Metrics
from bridge.privacy import Privacy
from bridge.types import EventID, RoomID, UserID
from bridge.whatsapp.graph import GraphClient, GraphError
from bridge.whatsapp.outbound import within_window

log = logging.getLogger(__name__)

READ_KEY: Final = "read-out:"  # + room id -> message_map.id last marked read
TYPING_SECONDS: Final = 20.0


@dataclass(frozen=True)
class StaffSignal:
    """A staff member read up to `event_id` in `room_id`, or is typing there."""

    kind: Literal["read", "typing"]
    room_id: RoomID
    user_id: UserID
    event_id: EventID | None = None


def staff_signals(ephemeral: list[dict[str, Any]], is_ours: Callable[[str], bool]
                  ) -> list[StaffSignal]:
    """The staff read receipts and typing notifications in a transaction's ephemeral
    events (malformed ones are skipped)."""
    found: list[StaffSignal] = []
    for event in ephemeral:
        room_id, content = event.get("room_id"), event.get("content")
        if not isinstance(room_id, str) or not isinstance(content, dict):
            continue
        if event.get("type") == "m.receipt":
            for event_id, receipts in content.items():
                readers = receipts.get("m.read") if isinstance(receipts, dict) else None
                for user in readers if isinstance(readers, dict) else ():
                    if isinstance(user, str) and not is_ours(user):
                        found.append(StaffSignal("read", RoomID(room_id), UserID(user),
                                                 EventID(str(event_id))))
        elif event.get("type") == "m.typing":
            users = content.get("user_ids")
            staff = [u for u in users if isinstance(u, str) and not is_ours(u)] \
                if isinstance(users, list) else []
            if staff:
                found.append(StaffSignal("typing", RoomID(room_id), UserID(staff[0])))
    return found


class StaffReceipts:
    """Sends staff read receipts and typing on to WhatsApp (module docstring)."""

    def __init__(self, db: Database, privacy: Privacy, graph: GraphClient, metrics: Metrics,
                 is_ours: Callable[[str], bool],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._db = db
        self._privacy = privacy
        self._graph = graph
        self._metrics = metrics
        self._is_ours = is_ours
        self._clock = clock
        self._typing: dict[int, float] = {}  # citizen id -> when the last indicator went
        # One lock per portal (bounded by the number of portals): concurrent
        # transactions must not both send the same receipt.
        self._locks: dict[RoomID, asyncio.Lock] = {}

    async def handle(self, ephemeral: list[dict[str, Any]]) -> None:
        """Process a transaction's ephemeral events; never raises (it runs detached)."""
        for signal in staff_signals(ephemeral, self._is_ours):
            try:
                outcome = await self._one(signal)
            except asyncio.CancelledError:
                raise
            except GraphError as exc:
                outcome = "failed"
                log.warning("%s receipt not sent: graph code=%s retryable=%s", signal.kind,
                            exc.code, exc.retryable)
            except Exception as exc:  # the database, a bug: a lost tick, logged
                outcome = "failed"
                log.warning("%s receipt not sent: %s", signal.kind, type(exc).__name__)
            if outcome is not None:
                self._metrics.receipts.labels(signal.kind, outcome).inc()

    async def _one(self, signal: StaffSignal) -> str | None:
        """Send one signal; its outcome for the metric, None if not about a portal."""
        room = await self._db.rooms.get(signal.room_id)
        if room is None or room.kind != "portal" or room.closed_at is not None \
                or room.citizen_id is None:
            return None
        citizen = await self._db.citizens.get(room.citizen_id)
        if citizen is None or citizen.consent_state != "granted":
            return None
        lock = self._locks.setdefault(signal.room_id, asyncio.Lock())
        async with lock:
            typing = signal.kind == "typing"
            now = self._clock()
            if typing:
                if not within_window(citizen, datetime.now(UTC)):
                    return "window_closed"  # staff cannot answer: no false promise
                if now - self._typing.get(citizen.id, float("-inf")) < TYPING_SECONDS:
                    return "rate_limited"
            link = await self._db.messages.latest_inbound(signal.room_id, signal.event_id)
            if link is None:
                return "no_message"
            done = await self._db.kv.get(READ_KEY + signal.room_id)
            if not typing and done is not None and int(done) >= link.id:
                return "repeat"
            await self._graph.mark_read(self._privacy.open_wamid(link.wamid_hash, link.wamid_ct),
                                        typing=typing)
            if typing:
                self._forget_old_typing(now)
                self._typing[citizen.id] = now
            if done is None or int(done) < link.id:
                await self._db.kv.set(READ_KEY + signal.room_id, str(link.id))
            return "sent"

    def _forget_old_typing(self, now: float) -> None:
        if len(self._typing) > 1000:
            self._typing = {c: t for c, t in self._typing.items()
                            if now - t < TYPING_SECONDS}
