"""Room events → every WhatsApp member of the room, one-to-one, through the outbox.

Each member gets the message prefixed with the sender's display name in that room
(staff with `rooms.staff_label`), and the room's short name when they are in several
rooms; never a Matrix ID. Announcement rooms relay staff posts only. While a member's
24 h window is closed the payloads wait, encrypted, in the backlog, and at most one
content-free digest template goes out per closure; when they write again the backlog
is delivered in order (at most `rooms.backlog_max`, after one line counting the rest).

Every send is an outbox row keyed by (event, member[, part]): a redelivered event is a
no-op, a restart loses nothing. The outbox checks membership again at send time, so a
kick, ban or SALIR stops what is still queued; a redaction cancels what has not gone
and tells those who had it that the moderators withdrew a message.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from bridge.config import Config
from bridge.db import Citizen, Database, Repositories
from bridge.matrix.api import MatrixAPI, MatrixError
from bridge.matrix.ghosts import Ghosts
from bridge.matrix.relay import StaffEvent
from bridge.metrics import Metrics
from bridge.model import BacklogEntry, Room, RoomMember
from bridge.privacy import AAD_PAYLOAD, Privacy
from bridge.rooms_wa import policy
from bridge.rooms_wa.members import INVITE_KEY, Members
from bridge.texts.whatsapp import default as wa_text
from bridge.types import EventID, RoomID, UserID
from bridge.whatsapp.outbox import Outbox
from bridge.whatsapp.staff_events import (
    TEXT_MSGTYPES,
    rendered_text,
    text_payloads,
    translate,
)

log = logging.getLogger(__name__)

AGENCY_KINDS = ("citizen", "announcement", "team")
STAFF_POWER = 50
BATCH = 200  # members queued per transaction (one commit, not one per member)
DIGEST_KEY = "wr-digest:"  # + citizen id -> the closure the digest was sent for


def event_key(event_id: str, citizen_id: int, part: int = 0) -> str:
    return f"wr:{event_id}:{citizen_id}" + (f"#{part}" if part else "")


class FanOut:
    """A `Relay` handler for agency rooms, and the sender of WhatsApp members' posts."""

    def __init__(self, config: Config, db: Database, api: MatrixAPI, ghosts: Ghosts,
                 members: Members, outbox: Outbox, privacy: Privacy, metrics: Metrics
                 ) -> None:
        self._config = config
        self._metrics = metrics
        self._db = db
        self._api = api
        self._ghosts = ghosts
        self._members = members
        self._outbox = outbox
        self._cipher = privacy.cipher
        self._privacy = privacy

    async def __call__(self, event: StaffEvent) -> None:
        if event.state_key is not None or event.type == "m.reaction":
            return
        room = event.room
        if room is None or room.kind not in AGENCY_KINDS:
            return
        recipients = await self._db.wa_rooms.in_room(room.room_id)
        if not recipients:
            return
        if event.type == "m.room.redaction":
            if event.redacts is not None:
                # Its author taking it back is no moderation: say who withdrew it.
                own = await self._sender_of(room.room_id, event.redacts) == event.sender
                await self.withdrawn(room, event.redacts, recipients,
                                     by=await self._label(room, event.sender) if own else None)
            return
        is_staff = await self._is_staff(room.room_id, event.sender)
        if room.kind == "announcement" and not is_staff:
            return  # a broadcast list: staff posts only
        await self.send(room, event.event_id, event.type, event.content,
                        await self._label(room, event.sender), recipients)

    async def _is_staff(self, room_id: RoomID, user_id: UserID) -> bool:
        return await self.power(room_id, user_id) >= STAFF_POWER or \
            user_id in self._config.admin.users or user_id in self._config.portals.staff

    async def _label(self, room: Room, user_id: UserID) -> str:
        """How `user_id` is named to WhatsApp members of `room` (policy.sender_label)."""
        return policy.sender_label(await self.display_name(room.room_id, user_id),
                                   await self._is_staff(room.room_id, user_id),
                                   self._config.rooms.staff_label)

    async def _sender_of(self, room_id: RoomID, event_id: str) -> str | None:
        try:
            event = await self._api.request(
                "GET", f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/event/"
                f"{quote(event_id, safe='')}", as_user=self._ghosts.bot)
        except MatrixError as exc:
            if exc.status >= 500:
                raise
            return None
        sender = event.get("sender") if isinstance(event, dict) else None
        return sender if isinstance(sender, str) else None

    # --- what each member gets --------------------------------------------------------

    async def send(self, room: Room, event_id: EventID, etype: str, content: dict[str, Any],
                   label: str, recipients: list[RoomMember],
                   exclude_citizen: int | None = None) -> None:
        """Queue one room event for every recipient but `exclude_citizen` (own messages
        are not echoed): one transaction per BATCH members, the outbox woken after each."""
        media = await self._members.relay_media(room.room_id)
        targets = [m for m in recipients if m.citizen_id != exclude_citizen]
        rooms_of = await self._db.wa_rooms.joined_counts([m.citizen_id for m in targets])
        now = datetime.now(UTC)
        texts: dict[tuple[str, str | None], list[dict[str, Any]]] = {}
        relayed = {"wa_room": room.room_id, "wr_event": event_id}
        for first in range(0, len(targets), BATCH):
            batch = targets[first:first + BATCH]
            async with self._db.transaction() as tx:
                citizens = await tx.citizens.get_many([m.citizen_id for m in batch])
                now_open: list[tuple[Citizen, str, dict[str, Any]]] = []
                for member in batch:
                    citizen = citizens.get(member.citizen_id)
                    if citizen is None:
                        continue
                    start = policy.prefix(label, room.name, rooms_of.get(citizen.id, 0) > 1)
                    payloads = await self._payloads(tx, citizen, etype, content, start, media,
                                                    relayed, texts)
                    for part, payload in enumerate(payloads):
                        key = event_key(event_id, citizen.id, part)
                        if policy.window_open(citizen.last_inbound_at, now):
                            now_open.append((citizen, key, payload))
                        else:
                            await self.deliver(tx, citizen, room, key, payload, now)
                # One INSERT for the batch: a row per member and part, in member order.
                await self._outbox.room_many(now_open, tx)
            self._outbox.wake()

    async def _payloads(self, repos: Repositories, citizen: Citizen, etype: str,
                        content: dict[str, Any], start: str, media: bool,
                        relayed: dict[str, str],
                        texts: dict[tuple[str, str | None], list[dict[str, Any]]]
                        ) -> list[dict[str, Any]]:
        """What `citizen` gets of this event, each payload naming the room event it
        relays (`relayed`). `texts` keeps the text payloads already made for this event
        by (prefix, quoted wamid): most members of a room get the same objects, so
        splitting a long text to Graph's limit and sealing it (Outbox.room_many) is done
        once."""
        def relaying(payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [{**payload, **relayed} for payload in payloads]

        relates = content.get("m.relates_to")
        relates = relates if isinstance(relates, dict) else {}
        if relates.get("rel_type") == "m.replace":
            new = content.get("m.new_content")
            text = rendered_text(new) if isinstance(new, dict) else ""
            return relaying(text_payloads(wa_text.ROOM_EDITED.format(prefix=start, text=text),
                                          None)) if text.strip() else []
        in_reply = relates.get("m.in_reply_to")
        target = in_reply.get("event_id") if isinstance(in_reply, dict) else None
        sealed = await repos.wa_rooms.wamid_for(target, citizen.id) \
            if isinstance(target, str) else None
        # The quoted message's wamid goes back to Graph inside the sealed outbox payload.
        reply_to = self._privacy.open_wamid(*sealed) if sealed is not None else None
        if etype == "m.room.message" and content.get("msgtype") in TEXT_MSGTYPES:
            if (start, reply_to) not in texts:
                texts[start, reply_to] = relaying(text_payloads(
                    start + rendered_text(content), reply_to))
            return texts[start, reply_to]
        decision = translate(etype, content, reply_to)
        if not isinstance(decision, list):
            # Unsupported or invalid: staff see it in Matrix; nothing to relay (counted).
            self._metrics.room_not_relayed.labels("unsupported").inc()
            return []
        out: list[dict[str, Any]] = []
        for payload in decision:
            if payload["type"] == "media" and not media:
                self._metrics.room_not_relayed.labels("media_off").inc()
                return relaying(text_payloads(
                    wa_text.ROOM_FILE_NOT_RELAYED.format(prefix=start), reply_to))
            if payload["type"] == "media" and payload["kind"] not in ("audio", "sticker"):
                payload["caption"] = (start + (payload.get("caption") or "")).strip()[:1024]
            elif payload["type"] != "text":
                out.extend(text_payloads(start.rstrip(": ") + ":", None))
            elif not out:
                payload["body"] = start + payload["body"]
            out.append(payload)
        return relaying(out)

    # --- the 24 h window --------------------------------------------------------------

    async def deliver(self, repos: Repositories, citizen: Citizen, room: Room, key: str,
                      payload: dict[str, Any], now: datetime) -> None:
        """Queue now while the window is open; else keep it and queue the digest once.
        In the caller's transaction: wake the outbox once it has committed."""
        if policy.window_open(citizen.last_inbound_at, now):
            await self._outbox.room(citizen, key, payload, repos)
            return
        sealed = self._cipher.encrypt_json(payload, aad=AAD_PAYLOAD)
        await repos.wa_rooms.keep(citizen.id, room.room_id, key, sealed)
        await self._digest(repos, citizen, room)

    async def _digest(self, repos: Repositories, citizen: Citizen, room: Room) -> None:
        mark = policy.closure_mark(citizen.last_inbound_at)
        if not policy.digest_due(await repos.kv.get(DIGEST_KEY + str(citizen.id)),
                                 citizen.last_inbound_at):
            return
        rooms = self._config.rooms
        if rooms.digest_template:
            count = len(await repos.wa_rooms.backlog(citizen.id))
            # The count and the room's name only: nothing of the content (Meta sees it).
            await self._outbox.room(citizen, f"wr-digest:{citizen.id}:{mark}", {
                "type": "template", "name": rooms.digest_template,
                "language": rooms.digest_language, "wa_room": room.room_id,
                "components": [{"type": "body", "parameters": [
                    {"type": "text", "text": str(count)},
                    {"type": "text", "text": policy.short_name(room.name)}]}]}, repos)
        await repos.kv.set(DIGEST_KEY + str(citizen.id), mark)

    async def deliver_backlog(self, citizen: Citizen, every: list[BacklogEntry]) -> None:
        """The citizen wrote: their window is open again; what waited (`every`, their
        backlog as read with the message) goes, in order. Idempotent (outbox keys), so
        a retried webhook item sends nothing twice."""
        if not every:
            return
        # Invitations that waited for the window go first, none left out (not content).
        invitations = [e for e in every if e.event_key.startswith(INVITE_KEY)]
        for entry in invitations:
            await self._outbox.room(citizen, entry.event_key,
                                    self._cipher.decrypt_json(entry.payload, aad=AAD_PAYLOAD))
        entries = [e for e in every if not e.event_key.startswith(INVITE_KEY)]
        skipped, _ = policy.backlog_plan(len(entries), self._config.rooms.backlog_max)
        if skipped:
            self._metrics.room_not_relayed.labels("left_out").inc(skipped)
            first = entries[skipped]
            await self._outbox.room(citizen, f"wr-earlier:{first.id}", {
                "type": "text", "body": wa_text.ROOM_EARLIER.format(count=skipped),
                "wa_room": first.room_id})
        for entry in entries[skipped:]:
            payload = self._cipher.decrypt_json(entry.payload, aad=AAD_PAYLOAD)
            await self._outbox.room(citizen, entry.event_key, payload)
        await self._db.wa_rooms.forget([e.id for e in every])
        log.info("room backlog delivered: %d sent, %d left out", len(entries) - skipped,
                 skipped)

    # --- redactions -------------------------------------------------------------------

    async def withdrawn(self, room: Room, target: str, recipients: list[RoomMember],
                        by: str | None = None) -> None:
        """Event `target` was redacted: what has not gone is cancelled; who had it is
        told that the moderators withdrew a message (`by` None) or that its author did."""
        await self._db.wa_rooms.cancel_unsent(f"wr:{target}:")
        await self._db.wa_rooms.forget_event(f"wr:{target}:")
        rooms_of = await self._db.wa_rooms.joined_counts([m.citizen_id for m in recipients])
        async with self._db.transaction() as tx:
            for member in recipients:
                if await tx.wa_rooms.wamid_for(target, member.citizen_id) is None:
                    continue  # never reached them
                citizen = await tx.citizens.get(member.citizen_id)
                if citizen is None:
                    continue
                several = rooms_of.get(citizen.id, 0) > 1
                text = wa_text.ROOM_WITHDRAWN.format(room_prefix=policy.room_prefix(
                    room.name, several)) if by is None else wa_text.ROOM_RETRACTED.format(
                    prefix=policy.prefix(by, room.name, several))
                await self.deliver(tx, citizen, room, f"wr-withdrawn:{target}:{citizen.id}",
                                   {"type": "text", "body": text, "wa_room": room.room_id},
                                   datetime.now(UTC))
        self._outbox.wake()

    # --- room state -------------------------------------------------------------------

    async def power(self, room_id: RoomID, user_id: str) -> int:
        levels = await self._levels(room_id)
        users = levels.get("users") if isinstance(levels.get("users"), dict) else {}
        value = (users or {}).get(user_id, levels.get("users_default", 0))
        return value if isinstance(value, int) else 0

    async def events_default(self, room_id: RoomID) -> int:
        value = (await self._levels(room_id)).get("events_default", 0)
        return value if isinstance(value, int) else 0

    async def _levels(self, room_id: RoomID) -> dict[str, Any]:
        try:
            return await self._api.get_state_event(self._ghosts.bot, room_id,
                                                   "m.room.power_levels")
        except MatrixError as exc:
            if exc.status >= 500:
                raise
            return {}

    async def display_name(self, room_id: RoomID, user_id: UserID) -> str | None:
        try:
            member = await self._api.get_state_event(self._ghosts.bot, room_id,
                                                     "m.room.member", user_id)
        except MatrixError as exc:
            if exc.status >= 500:
                raise
            return None
        name = member.get("displayname")
        return name if isinstance(name, str) else None
