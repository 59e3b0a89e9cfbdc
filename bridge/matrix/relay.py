"""The relay primitive: "ghost X says Y in room R" and "staff event E in room R".

Outbound goes through the ghost's own E2EE device. Inbound Matrix events arrive in
appservice transactions (stored durably first, see bridge.worker); encrypted ones are
decrypted with the bot's device, which is a member of every agency room.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import nio
from prometheus_client import Counter

from bridge.matrix.api import MatrixAPI, MatrixError
from bridge.matrix.bot_invites import BotInvitePolicy
from bridge.matrix.devices import Device
from bridge.matrix.ghosts import Ghosts
from bridge.matrix.undecryptable import (
    Parked,
    UndecryptableStore,
    next_due,
    request_key,
    utcnow,
)
from bridge.model import Room
from bridge.texts.matrix import default as mx_text
from bridge.types import EventID, RoomID, UserID

log = logging.getLogger(__name__)

# Room keys come in a transaction (or the bot's /sync), usually within milliseconds of
# the event; past this the bot's device fetches its inbox once (bridge.matrix.catchup),
# then the event waits aside (bridge.matrix.undecryptable) and frees its lane.
KEY_WAIT_SECONDS = 1.0
NOTICE_QUIET_SECONDS = 600.0  # at most one undecryptable notice per sender and room
# State that decides who may read a room's messages: devices re-read it before they
# next encrypt there (they do not sync rooms; see bridge.matrix.devices).
ROOM_KEY_STATE = ("m.room.member", "m.room.history_visibility")


@dataclass(frozen=True)
class StaffEvent:
    """A (decrypted) event sent by someone outside the bridge's namespace."""

    room_id: RoomID
    sender: UserID
    event_id: EventID
    type: str
    content: dict[str, Any]
    origin_server_ts: int
    encrypted: bool
    # The bridge's record of the room (None: one it did not create, such as a
    # management room): read once per event, for every handler.
    room: Room | None
    state_key: str | None = None  # set on state events (a room name, a pinned event...)
    redacts: str | None = None  # what an m.room.redaction removes (any room version)


StaffHandler = Callable[[StaffEvent], Awaitable[None]]
# Sees every m.room.member event (the raw event; member events are never encrypted).
MemberHandler = Callable[[dict[str, Any]], Awaitable[None]]


def _redacted_id(event: dict[str, Any], content: dict[str, Any]) -> str | None:
    """The event a redaction removes: in `content` from room version 11 on, at the top
    level before (Synapse sends both to clients of newer rooms)."""
    target = content.get("redacts") or event.get("redacts")
    return target if isinstance(target, str) else None


async def _decrypt_within(device: Device, event: dict[str, Any],
                          seconds: float) -> nio.Event | None:
    """Try to decrypt until the key is there or `seconds` have passed."""
    delay, waited = 0.05, 0.0
    while True:
        decrypted = device.decrypt(event)
        if decrypted is not None or waited >= seconds:
            return decrypted
        await asyncio.sleep(delay)
        waited += delay
        delay = min(delay * 2, 0.5)


class UndecryptableEvent(Exception):
    """The room key did not arrive in time; the event stays queued for retry."""


class Relay:
    def __init__(self, api: MatrixAPI, ghosts: Ghosts,
                 room_of: Callable[[RoomID], Awaitable[Room | None]],
                 bot_invites: BotInvitePolicy | None = None,
                 parked: UndecryptableStore | None = None,
                 undecryptable: Counter | None = None) -> None:
        self._api = api
        self._ghosts = ghosts
        self._room_of = room_of
        # None: the bot accepts no invite at all (only rooms it creates itself).
        self._bot_invites = bot_invites
        # None: an undecryptable event fails its queue item (retried there) instead.
        self._parked = parked
        self._undecryptable = undecryptable
        self._parked_changed = asyncio.Event()
        self._next_retry: datetime | None = None  # when the retry loop wakes next
        self._told: dict[tuple[RoomID, str], float] = {}  # (room, sender) -> last notice
        self._handlers: list[StaffHandler] = []
        self._member_handlers: list[MemberHandler] = []

    def add_handler(self, handler: StaffHandler) -> None:
        self._handlers.append(handler)

    def add_member_handler(self, handler: MemberHandler) -> None:
        self._member_handlers.append(handler)

    async def send_as(self, user_id: UserID, room_id: RoomID, content: dict[str, Any],
                      event_type: str = "m.room.message", txn_id: str | None = None) -> EventID:
        """Ghost (or bot) `user_id` sends `content` into `room_id`, encrypted by its device.

        `txn_id` makes the send idempotent on the homeserver (retries after a crash
        return the same event instead of a duplicate).
        """
        device = await self._ghosts.device(user_id)
        return EventID(await device.send(self._api, room_id, event_type, content, txn_id))

    async def handle_event(self, event: dict[str, Any]) -> None:
        """Process one room event from a transaction."""
        sender = str(event.get("sender", ""))
        etype = event.get("type")
        if etype in ROOM_KEY_STATE:
            self._ghosts.room_changed(str(event.get("room_id")))
        if etype == "m.room.member":
            if not self._ghosts.is_ours(str(event.get("state_key", ""))) and \
                    event.get("content", {}).get("membership") in ("join", "invite"):
                # Someone who may be owed earlier room keys arrived.
                await self._ghosts.open_keepers(RoomID(str(event.get("room_id"))))
            if not self._ghosts.is_ours(sender):
                await self._on_member(event)
            for member_handler in self._member_handlers:
                await member_handler(event)
            return
        if self._ghosts.is_ours(sender) or not isinstance(etype, str):
            return  # our own echo
        content = event.get("content")
        if not isinstance(content, dict):
            return
        if etype != "m.room.encrypted":
            await self._dispatch(event, etype, content, encrypted=False)
            return
        plain = await self._decrypt(event)
        if plain is not None:
            await self._dispatch(event, plain, encrypted=True)

    async def _dispatch(self, event: dict[str, Any], etype: str | nio.Event,
                        content: dict[str, Any] | None = None, *, encrypted: bool) -> None:
        if not isinstance(etype, str):
            # Decrypted: type and content from inside. nio returns a BadEvent, which is
            # no nio.Event, for content its schemas refuse (an m.file with a plain
            # `url` in an encrypted room): it is still staff's message, and gets the
            # same handling (a send, or a notice saying why not).
            plain = etype.source
            etype, content = str(plain.get("type", "")), dict(plain.get("content", {}))
        content = content or {}
        state_key = event.get("state_key")
        room_id = RoomID(str(event["room_id"]))
        staff_event = StaffEvent(
            room_id=room_id, sender=UserID(str(event.get("sender"))),
            event_id=EventID(str(event["event_id"])), type=str(etype), content=content,
            origin_server_ts=int(event.get("origin_server_ts", 0)), encrypted=encrypted,
            room=await self._room_of(room_id),
            state_key=state_key if isinstance(state_key, str) else None,
            redacts=_redacted_id(event, content) if etype == "m.room.redaction" else None)
        for handler in self._handlers:
            await handler(staff_event)

    async def _decrypt(self, event: dict[str, Any]) -> nio.Event | None:
        """The decrypted event, or None once it waits aside for its key."""
        bot = await self._ghosts.device(self._ghosts.bot)
        decrypted = await _decrypt_within(bot, event, KEY_WAIT_SECONDS)
        if decrypted is None and bot.fed and bot.feed is not None and bot.feed.catch_up and \
                await bot.feed.catch_up(bot):
            # The key may have been dropped from the transactions while Synapse held
            # the bridge DOWN; the device's inbox still had something new.
            decrypted = await _decrypt_within(bot, event, KEY_WAIT_SECONDS)
        if decrypted is not None:
            return decrypted
        if self._parked is None:
            raise UndecryptableEvent("room key not received")
        parked = await self._parked.park(event, utcnow())
        await request_key(bot.client, event)
        if self._next_retry is None or parked.due < self._next_retry:
            self._parked_changed.set()  # else the loop wakes early enough anyway
        log.info("a staff event waits for its room key (%d s at most)",
                 int(sum(self._parked.delays)))
        return None

    async def retry_parked(self) -> None:
        """Background task: retry parked events when due, until cancelled."""
        if self._parked is None:
            return
        while True:
            self._parked_changed.clear()
            timeout: float | None = 1.0
            try:
                for parked in await self._parked.all():
                    if parked.due <= utcnow():
                        await self._retry(parked)
                due = next_due(await self._parked.all())
                self._next_retry = due
                timeout = None if due is None else \
                    max(0.05, (due - utcnow()).total_seconds())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database may be away: try again shortly
                log.warning("retrying parked events failed (%s)", type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._parked_changed.wait(), timeout)

    async def _retry(self, parked: Parked) -> None:
        assert self._parked is not None
        bot = await self._ghosts.device(self._ghosts.bot)
        plain = bot.decrypt(parked.event)
        if plain is not None:
            try:
                await self._dispatch(parked.event, plain, encrypted=True)
            except Exception as exc:
                # Decrypted, but relaying failed (the database, Synapse...): keep trying.
                log.warning("a late-decrypted staff event failed (%s)", type(exc).__name__)
                await self._parked.postpone(parked, utcnow())
                return
            await self._parked.forget(parked)
            return
        if await self._parked.retry_later(parked, utcnow()):
            await request_key(bot.client, parked.event)
            return
        await self._give_up(parked)

    async def _give_up(self, parked: Parked) -> None:
        """Tell the room (and so the sender) and count it; then forget the event."""
        assert self._parked is not None
        event = parked.event
        sender = str(event.get("sender", ""))
        sent = datetime.fromtimestamp(int(event.get("origin_server_ts", 0)) / 1000, UTC)
        body = mx_text.UNDECRYPTABLE_NOTICE.format(sender=sender, time=sent.strftime("%H:%M"))
        room_id = RoomID(str(event["room_id"]))
        # One notice per sender and room in a while: a burst of undecryptable events
        # (a broken client, or someone doing it on purpose) is not echoed one by one.
        now = asyncio.get_running_loop().time()
        if self._told.get((room_id, sender), -NOTICE_QUIET_SECONDS) + NOTICE_QUIET_SECONDS <= now:
            try:
                await self.send_as(self._ghosts.bot, room_id, {
                    "msgtype": "m.notice", "body": body, "m.mentions": {"user_ids": [sender]}})
            except MatrixError as exc:
                if exc.status >= 500 or exc.status == 429:
                    raise  # the homeserver is away: the loop tries again
                log.warning("undecryptable event: the room refused the notice (%s)",
                            exc.errcode)
            self._told[(room_id, sender)] = now
        if self._undecryptable is not None:
            self._undecryptable.inc()
        log.warning("a staff event stayed undecryptable; staff were told")
        await self._parked.forget(parked)

    async def _on_member(self, event: dict[str, Any]) -> None:
        target = str(event.get("state_key", ""))
        membership = event.get("content", {}).get("membership")
        room_id = RoomID(str(event.get("room_id")))
        if membership != "invite" or not self._ghosts.is_ours(target):
            return
        if target == self._ghosts.bot:
            # Admins DM the bot for the management room; see bridge.matrix.bot_invites.
            inviter = str(event.get("sender", ""))
            if self._bot_invites is not None and \
                    await self._bot_invites.accepts(inviter, room_id):
                await self._api.join(self._ghosts.bot, room_id)
            else:
                await self._api.leave(self._ghosts.bot, room_id)
        else:
            # Ghosts only sit in rooms the bridge put them in: nobody can start a DM
            # with a citizen through their pseudonym.
            await self._api.leave(UserID(target), room_id)
