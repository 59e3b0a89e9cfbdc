"""The management room: admins DM the bridge bot and it runs their commands.

Any room the bot is in that is *not* one of the bridge's agency rooms counts as a
management room; in agency rooms messages are conversation, never commands. Only
users listed in `admin.users` may run commands; anyone else is refused, and the
refusal is audited. The actor in the audit log is the admin's Matrix ID.

Actions that need confirmation (ConfirmRequired) are parked per (room, sender) for
CONFIRM_SECONDS; `confirm` runs them with confirmation, `cancel` drops them. Parked
actions live in memory only: after a restart the admin simply asks again.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from bridge.admin.moderation import Moderation
from bridge.admin.service import AdminService
from bridge.admin.verbs import BY_NAME, VerbServices, call_of
from bridge.config import Config
from bridge.db import Database
from bridge.errors import BridgeError
from bridge.invites.service import InviteLinks
from bridge.matrix.management import Command, CommandError, help_text, parse
from bridge.matrix.relay import StaffEvent
from bridge.moderation.reports import Reports
from bridge.moderation.texts import event_link
from bridge.roomguard import ConfirmRequired
from bridge.texts.management import default as mgmt_text
from bridge.types import RoomID, UserID

if TYPE_CHECKING:
    from bridge.rooms_wa.members import Members

log = logging.getLogger(__name__)
CONFIRM_SECONDS = 300.0
REFUSAL_QUIET_SECONDS = 3600.0
Reply = Callable[[RoomID, str], Awaitable[None]]


class ManagementRoom:
    """Turns admins' messages to the bot into admin actions (a relay StaffHandler)."""

    def __init__(self, config: Config, db: Database, admin: AdminService,
                 moderation: Moderation, links: InviteLinks, reply: Reply,
                 clock: Callable[[], float] = time.monotonic,
                 reports: Reports | None = None, wa_members: Members | None = None) -> None:
        self._admins = frozenset(config.admin.users)
        self._db = db
        self._services = VerbServices(admin, moderation)
        self._links = links
        self._reply = reply
        self._clock = clock
        self._reports = reports
        self._wa_members = wa_members  # rooms over WhatsApp; None: WhatsApp is off
        self._pending: dict[tuple[str, str], tuple[Command, float]] = {}
        self._refused: dict[str, float] = {}  # sender -> until when refusals go unrecorded

    async def __call__(self, event: StaffEvent) -> None:
        if event.type != "m.room.message" or event.content.get("msgtype") != "m.text":
            return
        body = event.content.get("body")
        if not isinstance(body, str) or event.room is not None:  # not a management room
            return
        try:
            answer = await self._answer(event, body)
        except Exception as exc:  # never let a command break the inbound queue
            log.error("management command failed: %s", type(exc).__name__)
            answer = mgmt_text.INTERNAL_ERROR
        try:
            await self._reply(event.room_id, answer)
        except Exception as exc:
            log.warning("could not answer in the management room: %s", type(exc).__name__)

    async def _answer(self, event: StaffEvent, body: str) -> str:
        sender = str(event.sender)
        try:
            command = parse(body)
        except CommandError as exc:
            if sender not in self._admins:
                return await self._refuse(event, "unknown")
            return mgmt_text.BAD_COMMAND.format(problem=exc)
        if sender not in self._admins:
            return await self._refuse(event, command.name)
        if self._reports is not None:
            # Reports and flags are posted here from now on (bridge.moderation.notify).
            await self._reports.management.remember(event.room_id, UserID(sender))
        key = (str(event.room_id), sender)
        if command.name in ("confirm", "cancel"):
            parked = self._pending.pop(key, None)
            if parked is None or parked[1] < self._clock():
                return mgmt_text.NOTHING_TO_CONFIRM
            if command.name == "cancel":
                return mgmt_text.CANCELLED
            command = dataclasses.replace(parked[0], confirm=True)
        try:
            return await self._run(sender, command)
        except ConfirmRequired as exc:
            self._pending[key] = (command, self._clock() + CONFIRM_SECONDS)
            return mgmt_text.CONFIRM_FIRST.format(room_name=exc.room_name, members=exc.members,
                                                  minutes=int(CONFIRM_SECONDS // 60))
        except BridgeError as exc:
            return mgmt_text.REFUSED.format(problem=exc.message)

    async def _refuse(self, event: StaffEvent, name: str) -> str:
        # Anyone can DM the bot: record the first refusal per sender and window only, so
        # nobody can flood the append-only audit log.
        sender, now = str(event.sender), self._clock()
        if self._refused.get(sender, 0.0) <= now:
            self._refused = {s: t for s, t in self._refused.items() if t > now}
            self._refused[sender] = now + REFUSAL_QUIET_SECONDS
            await self._db.audit.append(sender, f"command.{name}", event.room_id, "denied",
                                        "not in admin.users (repeats within the hour are "
                                        "not recorded)")
        return mgmt_text.NOT_AN_ADMIN

    async def _run(self, actor: str, c: Command) -> str:
        if c.name == "help":
            return help_text()
        verb = BY_NAME[c.name]
        if verb.run is not None and verb.reply is not None:
            ids = {"room_id": c.room_id, "user_id": c.user_id, "event_id": c.event_id}
            call = call_of({**{k: str(v) for k, v in ids.items() if v}, **dict(c.extra)},
                           text=(c.text or "") if verb.text else "",
                           reason=None if verb.text else c.text, confirm=c.confirm)
            return verb.reply(call, await verb.run(self._services, actor, call))
        if c.name == "link":
            ttl = timedelta(hours=c.hours) if c.hours else None
            link = await self._links.create(actor, str(c.room_id or ""), c.uses or 1, ttl,
                                            c.confirm)
            return mgmt_text.INVITE_LINK.format(uses=link.uses, expires=link.expires_at,
                                                url=link.url)
        if c.name == "audit":
            return await self._audit(c.limit or 10)
        if c.name in ("report", "reports"):
            return await self._report(actor, c)
        if c.name == "whatsapp-members.add":
            return await self._whatsapp_invite(actor, c)
        raise BridgeError(f"command {c.name} is not implemented")

    async def _report(self, actor: str, c: Command) -> str:
        if self._reports is None:
            raise BridgeError("reports are not available")
        if c.name == "report":
            word, _, why = (c.text or "").partition(" ")
            done = await self._reports.act(actor, c.number or 0, word, why or None)
            told = "" if done["reporter_told"] else mgmt_text.REPORTER_NOT_TOLD
            return mgmt_text.REPORT_DONE.format(id=done["id"], status=done["status"], told=told)
        lines = []
        for r in await self._reports.open_reports():
            reason = self._reports.reason(r)
            lines.append(mgmt_text.OPEN_REPORT.format(
                id=r.id, source=r.source, link=event_link(r.room_id, r.event_id),
                author=r.author or mgmt_text.UNKNOWN_AUTHOR)
                + (mgmt_text.OPEN_REPORT_REASON.format(reason=reason) if reason else ""))
        return ("\n".join([mgmt_text.OPEN_REPORTS, *lines]) if lines
                else mgmt_text.NO_OPEN_REPORTS)

    async def _whatsapp_invite(self, actor: str, c: Command) -> str:
        if self._wa_members is None:
            raise BridgeError("WhatsApp is not enabled")
        result = await self._wa_members.invite(actor, str(c.room_id or ""),
                                               dict(c.extra).get("citizen", ""),
                                               confirm=c.confirm)
        return whatsapp_invite_reply(result)

    async def _audit(self, limit: int) -> str:
        intact, first_bad = await self._db.audit.verify()
        head = (mgmt_text.AUDIT_INTACT if intact else
                mgmt_text.AUDIT_BROKEN.format(entry=first_bad))
        lines = [f"{x.id} {x.at:%Y-%m-%d %H:%M:%S} {x.actor} {x.action} {x.object} "
                 f"{x.result}" + (f" ({x.reason})" if x.reason else "")
                 for x in await self._db.audit.list(limit=limit)]
        return "\n".join([head, *lines])


def whatsapp_invite_reply(result: dict[str, Any]) -> str:
    """What the inviter reads: the pseudonym, and whether the invitation went or waits."""
    said = mgmt_text.WA_INVITE.format(pseudonym=result["pseudonym"])
    if result.get("delivery") == "waiting_for_reply":
        how = (mgmt_text.WA_INVITE_ASKED if result.get("asked_to_reply") else
               mgmt_text.WA_INVITE_NO_TEMPLATE)
        return mgmt_text.WA_INVITE_WAITING.format(said=said, how=how)
    return mgmt_text.WA_INVITE_SENT.format(said=said)
