"""The relay primitive: "ghost X says Y in room R" and "staff event E in room R".

Outbound goes through the ghost's own E2EE device. Inbound Matrix events arrive in
appservice transactions (stored durably first, see bridge.worker); encrypted ones are
decrypted with the bot's device, which is a member of every agency room.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nio

from bridge.matrix.api import MatrixAPI
from bridge.matrix.ghosts import Ghosts
from bridge.types import EventID, RoomID, UserID

log = logging.getLogger(__name__)

# Room keys come over the bot's /sync, usually within milliseconds of the event.
KEY_WAIT_SECONDS = 20.0
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


StaffHandler = Callable[[StaffEvent], Awaitable[None]]
# Sees every m.room.member event (the raw event; member events are never encrypted).
MemberHandler = Callable[[dict[str, Any]], Awaitable[None]]


class UndecryptableEvent(Exception):
    """The room key did not arrive in time; the event stays queued for retry."""


class Relay:
    def __init__(self, api: MatrixAPI, ghosts: Ghosts) -> None:
        self._api = api
        self._ghosts = ghosts
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
        encrypted = etype == "m.room.encrypted"
        if encrypted:
            plain = (await self._decrypt(event)).source
            etype, content = str(plain.get("type", "")), dict(plain.get("content", {}))
        staff_event = StaffEvent(
            room_id=RoomID(str(event["room_id"])), sender=UserID(sender),
            event_id=EventID(str(event["event_id"])), type=str(etype), content=content,
            origin_server_ts=int(event.get("origin_server_ts", 0)), encrypted=encrypted)
        for handler in self._handlers:
            await handler(staff_event)

    async def _decrypt(self, event: dict[str, Any]) -> nio.Event:
        bot = await self._ghosts.device(self._ghosts.bot)
        delay, waited = 0.05, 0.0
        while True:
            decrypted = bot.decrypt(event)
            if decrypted is not None:
                return decrypted
            if waited >= KEY_WAIT_SECONDS:
                raise UndecryptableEvent("room key not received")
            await asyncio.sleep(delay)
            waited += delay
            delay = min(delay * 2, 1.0)

    async def _on_member(self, event: dict[str, Any]) -> None:
        target = str(event.get("state_key", ""))
        membership = event.get("content", {}).get("membership")
        room_id = RoomID(str(event.get("room_id")))
        if membership != "invite" or not self._ghosts.is_ours(target):
            return
        if target == self._ghosts.bot:
            # The bot accepts invites (admins DM it for the management room).
            await self._api.join(self._ghosts.bot, room_id)
        else:
            # Ghosts only sit in rooms the bridge put them in: nobody can start a DM
            # with a citizen through their pseudonym.
            await self._api.leave(UserID(target), room_id)
