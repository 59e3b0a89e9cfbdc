"""Moderation: kick, ban, unban, mute/unmute, redact, knocks, closing a room, announcements.

Actions go to the homeserver as the bridge bot, which created every agency room and so
outranks everyone in it (room version 12 creators). Each one is audited.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from bridge.admin.audited import audited
from bridge.admin.checks import event_id, reason, user_id
from bridge.config import Config
from bridge.db import Database, Room
from bridge.errors import Conflict, InvalidParam, Unavailable
from bridge.matrix.api import MatrixAPI, MatrixError
from bridge.matrix.rooms import Rooms
from bridge.roomguard import guard_size, member_count, open_room
from bridge.texts.matrix import default as mx_text
from bridge.types import EventID, RoomID, UserID

log = logging.getLogger(__name__)

MUTED = -1  # below every room's events_default: no messages, reactions or edits
MAX_ANNOUNCEMENT = 4000
CLOSED_NOTICE = mx_text.ROOM_CLOSED_NOTICE
# bot sends `content` into a room (encrypted by its device); returns the event id
Send = Callable[[RoomID, dict[str, Any]], Awaitable[EventID]]
# the bridge's devices re-read a room's members before they next encrypt there
RoomChanged = Callable[[str], None]


class Moderation:
    """Moderation actions over one room at a time; `actor` is who asked (for the audit)."""

    def __init__(self, config: Config, db: Database, api: MatrixAPI, rooms: Rooms,
                 bot: UserID, send: Send, room_changed: RoomChanged) -> None:
        self._config = config
        # Called after removing members, not left to the appservice transaction that
        # reports it: the next message then never goes out under a key they hold.
        self._room_changed = room_changed
        self._db = db
        self._api = api
        self._rooms = rooms
        self._bot = bot
        self._send = send

    async def _target(self, room_id: str, target: str) -> tuple[Room, UserID]:
        room = await open_room(self._db, room_id)
        uid = user_id(target)
        if uid == self._bot:
            raise InvalidParam("the bridge bot cannot be the target of moderation")
        return room, uid

    async def membership(self, actor: str, action: str, room_id: str, target: str,
                         why: str | None) -> None:
        """kick, ban or unban."""
        if action not in ("kick", "ban", "unban"):
            raise InvalidParam("action must be kick, ban or unban")
        room, uid = await self._target(room_id, target)
        text = reason(why)
        await audited(self._db, actor, f"room.{action}", f"{room.room_id} {uid}", text,
                      lambda: self._api.membership_action(self._bot, room.room_id, action,
                                                          uid, text), action)
        self._room_changed(room.room_id)

    async def mute(self, actor: str, room_id: str, target: str, why: str | None) -> None:
        """Set the user's power below events_default; the old level is kept for unmute."""
        room, uid = await self._target(room_id, target)
        text = reason(why)
        levels = await self._api.get_state_event(self._bot, room.room_id, "m.room.power_levels")
        users = levels.get("users", {})
        if users.get(uid) == MUTED:
            raise Conflict("already muted")
        previous = users.get(uid)
        await self._db.mutes.add(room.room_id, uid,
                                 previous if isinstance(previous, int) else None)
        await audited(self._db, actor, "room.mute", f"{room.room_id} {uid}", text,
                      lambda: self._rooms.set_power(room.room_id, uid, MUTED), "mute")

    async def unmute(self, actor: str, room_id: str, target: str, why: str | None) -> None:
        room, uid = await self._target(room_id, target)
        text = reason(why)
        previous = await self._db.mutes.previous_level(room.room_id, uid)
        level = previous if previous != MUTED else None
        await audited(self._db, actor, "room.unmute", f"{room.room_id} {uid}", text,
                      lambda: self._rooms.set_power(room.room_id, uid, level), "unmute")
        await self._db.mutes.delete(room.room_id, uid)

    async def redact(self, actor: str, room_id: str, event: str, why: str | None) -> EventID:
        room = await open_room(self._db, room_id)
        eid = event_id(event)
        text = reason(why)
        return await audited(
            self._db, actor, "room.redact", f"{room.room_id} {eid}", text,
            lambda: self._api.redact(self._bot, room.room_id, eid, secrets.token_hex(8), text),
            "redaction")

    async def knock(self, actor: str, room_id: str, target: str, approve: bool,
                    why: str | None = None) -> None:
        """Approve a knock (invite) or deny it (kick the knocking user, as the spec says)."""
        room, uid = await self._target(room_id, target)
        text = reason(why, required=not approve)
        knocking = {m.user_id for m in await self._rooms.members(room.room_id)
                    if m.membership == "knock"}
        if uid not in knocking:
            raise Conflict("that user is not knocking on this room")
        if approve:
            await audited(self._db, actor, "room.knock.approve", f"{room.room_id} {uid}", text,
                          lambda: self._api.invite(self._bot, room.room_id, uid, text), "invite")
        else:
            await audited(self._db, actor, "room.knock.deny", f"{room.room_id} {uid}", text,
                          lambda: self._api.membership_action(self._bot, room.room_id, "kick",
                                                              uid, text), "kick")

    async def close(self, actor: str, room_id: str, why: str | None) -> int:
        """Remove everyone, revoke the room's invite links, tombstone it; returns how many left.

        The bot stays, so the room's state (and the tombstone) can still be read.
        """
        room = await open_room(self._db, room_id)
        if room.kind in ("portal", "management"):
            raise InvalidParam("portals close when the citizen opts out")
        text = reason(why)
        await self._db.invites.revoke_room(room.room_id)
        await self._api.send_state(self._bot, room.room_id, "m.room.join_rules",
                                   {"join_rule": "invite"})
        removed, failed = 0, 0
        for member in await self._rooms.members(room.room_id):
            if member.user_id == self._bot:
                continue
            try:
                await self._api.membership_action(self._bot, room.room_id, "kick",
                                                  member.user_id, text)
                removed += 1
            except MatrixError as exc:
                failed += 1
                log.warning("closing %s: could not remove a member (%s)", room.room_id,
                            exc.errcode)
        self._room_changed(room.room_id)
        # The spec requires a replacement room; there is none, so it is empty: clients
        # show the room as ended without offering anywhere to go.
        await audited(self._db, actor, "room.close", room.room_id, text,
                      lambda: self._api.send_state(
                          self._bot, room.room_id, "m.room.tombstone",
                          {"body": CLOSED_NOTICE, "replacement_room": ""}),
                      "tombstone")
        await self._db.rooms.close(room.room_id)
        if failed:
            await self._db.audit.append(actor, "room.close.remove", room.room_id,
                                        f"error {failed} not removed", text)
        return removed

    async def announce(self, actor: str, room_id: str, body: str,
                       confirm: bool = False) -> EventID:
        """Post into an announcement room as the bot; always asks for confirmation first."""
        room = await open_room(self._db, room_id)
        if room.kind != "announcement":
            raise InvalidParam("announcements go to rooms of kind announcement")
        text = body.strip()
        if not text or len(text) > MAX_ANNOUNCEMENT:
            raise InvalidParam(f"body must be 1-{MAX_ANNOUNCEMENT} characters")
        # Threshold 0: every announcement names its room and audience before it goes out.
        count = await guard_size(self._rooms, room, confirm, 0)
        try:
            event = await self._send(room.room_id, {"msgtype": "m.text", "body": text})
        except (MatrixError, RuntimeError) as exc:
            await self._db.audit.append(actor, "room.announce", room.room_id,
                                        f"error {type(exc).__name__}", f"{count} members")
            raise Unavailable("the announcement could not be sent; try again") from None
        await self._db.audit.append(actor, "room.announce", f"{room.room_id} {event}", "ok",
                                    f"{count} members")
        return event

    async def size(self, room_id: str) -> int:
        room = await open_room(self._db, room_id)
        return await member_count(self._rooms, room.room_id)

