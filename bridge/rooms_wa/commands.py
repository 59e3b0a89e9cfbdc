"""`!invitar <sala>` in a citizen's portal: staff add that WhatsApp citizen to an agency
room (by room ID or exact name). A relay handler in front of the portal's others: the
command is answered with a notice in the portal and never reaches the citizen."""

from __future__ import annotations

import logging

from bridge.db import Database
from bridge.errors import BridgeError
from bridge.matrix.relay import StaffEvent, StaffHandler
from bridge.rooms_wa import policy
from bridge.rooms_wa.fanout import FanOut
from bridge.rooms_wa.members import Members
from bridge.text import fold_words
from bridge.texts.matrix import default as mx_text
from bridge.whatsapp.portal import Portals

log = logging.getLogger(__name__)

COMMAND = "!invitar"


class PortalCommands:
    def __init__(self, db: Database, portals: Portals, members: Members, fanout: FanOut,
                 staff_label: str, confirm_above: int, then: StaffHandler | None) -> None:
        self._db = db
        self._portals = portals
        self._members = members
        self._fanout = fanout
        self._label = staff_label
        self._above = confirm_above
        self._then = then

    async def __call__(self, event: StaffEvent) -> None:
        body = event.content.get("body")
        if event.type == "m.room.message" and isinstance(body, str) and \
                body.strip().lower().split(" ", 1)[0] == COMMAND:
            room = event.room
            if room is not None and room.kind == "portal" and room.citizen_id is not None:
                await self._invite(event, room.citizen_id, body.strip()[len(COMMAND):].strip())
                return
        if self._then is not None:
            await self._then(event)

    async def _invite(self, event: StaffEvent, citizen_id: int, argument: str) -> None:
        confirm = argument.lower().endswith(" confirmar")
        wanted = argument[:-len(" confirmar")].strip() if confirm else argument
        target = None
        for room in await self._db.rooms.list():
            if room.kind in ("citizen", "announcement", "team") and (
                    room.room_id == wanted or fold_words(room.name) == fold_words(wanted)):
                target = room
                break
        citizen = await self._db.citizens.get(citizen_id)
        if not wanted or target is None or citizen is None or citizen.ghost_user_id is None:
            await self._portals.notice(event.room_id, mx_text.WA_INVITE_USAGE)
            return
        name = await self._fanout.display_name(event.room_id, event.sender)
        inviter = policy.sender_label(name, True, self._label)
        try:
            result = await self._members.invite(event.sender, target.room_id,
                                                citizen.ghost_user_id, inviter=inviter,
                                                confirm=confirm)
        except BridgeError as exc:
            extra = mx_text.WA_INVITE_CONFIRM.format(above=self._above, room=wanted) \
                if exc.errcode == "CB_CONFIRM_REQUIRED" else ""
            await self._portals.notice(event.room_id,
                                       mx_text.WA_INVITE_REFUSED.format(why=exc) + extra)
            return
        if result.get("delivery") == "waiting_for_reply":
            await self._portals.notice(event.room_id, mx_text.WA_INVITE_WAITING_NOTICE.format(
                room=target.name, pseudonym=result["pseudonym"],
                how=mx_text.WA_INVITE_ASKED if result.get("asked_to_reply")
                else mx_text.WA_INVITE_NOT_ASKED))
            return
        await self._portals.notice(event.room_id, mx_text.WA_INVITE_SENT_NOTICE.format(
            room=target.name, pseudonym=result["pseudonym"]))
