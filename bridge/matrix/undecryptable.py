"""Staff events the bot cannot decrypt yet wait here, aside from the inbound queue.

An encrypted event whose Megolm key has not reached the bot must not hold its room's
lane while it waits: anyone able to send such events (a client that withholds its
keys, a session the bot never receives) would otherwise stall the relay and the
management room for minutes. The relay tries for a moment, then parks the event here
(durably, encrypted, in the key-value table) and moves on. Parked events are retried
on a schedule, with a room-key request to the sender's device each time; when the
last try fails, staff are told in the room and `civic_bridge_undecryptable_events`
counts it. Parked events are retried out of order with what came after them.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import nio

from bridge.db import Database
from bridge.privacy import AAD_PAYLOAD, Cipher

log = logging.getLogger(__name__)

KEY_PREFIX = "undecryptable:"  # + event id -> the encrypted event and its retry state


@dataclass(frozen=True)
class Parked:
    key: str
    event: dict[str, Any]
    attempts: int  # tries after parking so far
    parked_at: datetime
    due: datetime


class UndecryptableStore:
    """Parked events and their retry schedule (`delays[i]` after the i-th try)."""

    def __init__(self, db: Database, cipher: Cipher, delays: Sequence[float]) -> None:
        self._db = db
        self._cipher = cipher
        self.delays = tuple(delays)

    async def park(self, event: dict[str, Any], now: datetime) -> Parked:
        parked = Parked(KEY_PREFIX + str(event["event_id"]), event, 0, now,
                        now + timedelta(seconds=self.delays[0]))
        await self._save(parked)
        return parked

    async def _save(self, parked: Parked) -> None:
        await self._db.kv.set(parked.key, self._cipher.encrypt_json({
            "event": parked.event, "attempts": parked.attempts,
            "parked_at": parked.parked_at.isoformat(), "due": parked.due.isoformat(),
        }, aad=AAD_PAYLOAD))

    async def all(self) -> list[Parked]:
        """Every parked event; one that cannot be read is dropped (logged): it could
        never be retried, and it must not stop the others."""
        found = []
        for key, sealed in await self._db.kv.with_prefix(KEY_PREFIX):
            try:
                data = self._cipher.decrypt_json(sealed, aad=AAD_PAYLOAD)
                found.append(Parked(key, dict(data["event"]), int(data["attempts"]),
                                    datetime.fromisoformat(data["parked_at"]),
                                    datetime.fromisoformat(data["due"])))
            except Exception as exc:
                log.error("parked undecryptable event unreadable (%s); dropped",
                          type(exc).__name__)
                await self._db.kv.delete(key)
        return found

    async def retry_later(self, parked: Parked, now: datetime) -> bool:
        """Count a failed try; False when it was the last (the caller gives up)."""
        attempts = parked.attempts + 1
        if attempts >= len(self.delays):
            return False
        await self._save(Parked(parked.key, parked.event, attempts, parked.parked_at,
                                now + timedelta(seconds=self.delays[attempts])))
        return True

    async def postpone(self, parked: Parked, now: datetime) -> None:
        """Try again later without counting a try (the failure was not the key's)."""
        delay = self.delays[min(parked.attempts, len(self.delays) - 1)]
        await self._save(Parked(parked.key, parked.event, parked.attempts, parked.parked_at,
                                now + timedelta(seconds=delay)))

    async def forget(self, parked: Parked) -> None:
        await self._db.kv.delete(parked.key)


def next_due(parked: Sequence[Parked]) -> datetime | None:
    return min((p.due for p in parked), default=None)


def utcnow() -> datetime:
    return datetime.now(UTC)


async def request_key(client: nio.AsyncClient, event: dict[str, Any]) -> None:
    """Ask the sender's device for the event's room key (m.room_key_request); best
    effort: the answer, if any, arrives as a forwarded room key like any other."""
    parsed = nio.Event.parse_event(event)
    if not isinstance(parsed, nio.MegolmEvent) or not client.device_id:
        return
    message = parsed.as_key_request(parsed.sender, client.device_id,
                                    request_id=uuid.uuid4().hex, device_id=parsed.device_id)
    try:
        response = await client.to_device(message)
    except Exception as exc:
        log.info("room key request not sent (%s)", type(exc).__name__)
        return
    if isinstance(response, nio.ToDeviceError):
        log.info("room key request refused (%s)", response.status_code)
