"""Invitations, consent, joining and leaving of WhatsApp members of agency rooms.

A member is a separate ghost per (citizen, room): its own random user ID, the display
name drawn at invitation (the citizen is told it) and its own device. Accepting records
consent with purpose "room:<room id>" (the invitation's version, sha256 and language);
declining or silence creates nothing but the invitation row. Steps are ordered so that
a retried webhook item finishes the job: idempotent Matrix steps first, the consent
record and the state change together, last.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from datetime import UTC, datetime
from typing import Any

from bridge.config import Config
from bridge.db import Citizen, Database
from bridge.errors import Conflict, InvalidParam, NotFound
from bridge.matrix.api import MatrixAPI, MatrixError
from bridge.matrix.ghosts import Ghosts
from bridge.matrix.relay import Relay
from bridge.matrix.rooms import Rooms
from bridge.metrics import Metrics
from bridge.model import Room, RoomMember, RoomSettings, room_purpose
from bridge.privacy import AAD_PAYLOAD, Privacy, new_pseudonym_code
from bridge.roomguard import guard_size, open_room
from bridge.rooms_wa import policy
from bridge.texts.matrix import default as mx_text
from bridge.texts.whatsapp import default as wa_text
from bridge.types import Pseudonym, RoomID, UserID, WamidHash
from bridge.whatsapp import consent
from bridge.whatsapp.outbox import Outbox

log = logging.getLogger(__name__)

TOLD_KEY = "wr-told:"  # + room id: room members were told about WhatsApp members
INVITE_KEY = "wr-invite:"  # + membership id + ":" + random: an invitation's send
SHOWN_HASH = 16  # hex digits of the invitation text's sha256 in its button ids


purpose = room_purpose


class Members:
    """Membership of WhatsApp citizens in agency rooms."""

    def __init__(self, config: Config, db: Database, api: MatrixAPI, ghosts: Ghosts,
                 rooms: Rooms, relay: Relay, outbox: Outbox, privacy: Privacy,
                 metrics: Metrics) -> None:
        self._config = config
        self._db = db
        self._api = api
        self._ghosts = ghosts
        self._rooms = rooms
        self._relay = relay
        self._outbox = outbox
        self._privacy = privacy
        self._metrics = metrics

    # --- settings ---------------------------------------------------------------------

    async def allowed(self, room: Room) -> bool:
        switch = await self._db.wa_rooms.settings(room.room_id)
        return policy.allowed(room.kind, switch.whatsapp_allowed if switch else None,
                              self._config.rooms.whatsapp_members)

    async def relay_media(self, room_id: RoomID) -> bool:
        switch = await self._db.wa_rooms.settings(room_id)
        return switch.relay_media if switch else self._config.rooms.relay_media

    # --- invitation -------------------------------------------------------------------

    async def resolve(self, reference: str) -> Citizen:
        """A citizen by their portal ghost's user ID or their subscription code."""
        citizen = None
        if reference.startswith("@"):
            citizen = await self._db.citizens.by_ghost(UserID(reference))
        elif reference.strip():
            sub = await self._db.subscriptions.by_code(reference.strip())
            citizen = await self._db.citizens.get(sub.citizen_id) if sub else None
        else:
            raise InvalidParam("citizen: a portal ghost or a subscription code")
        if citizen is None:
            raise NotFound("no WhatsApp citizen with that portal ghost or code")
        return citizen

    async def invite(self, actor: str, room_id: str, reference: str, *,
                     inviter: str | None = None, confirm: bool = False) -> dict[str, Any]:
        """Send the WhatsApp invitation (buttons); returns what the admin API answers:
        the membership id, the pseudonym in that room, the state and `delivery`: "sent",
        or "waiting_for_reply" while the citizen's 24 h window is closed (then
        `asked_to_reply`: whether rooms.invite_template asked them to answer); never a
        number."""
        room = await open_room(self._db, room_id)
        if room.kind not in ("citizen", "announcement", "team"):
            raise InvalidParam("WhatsApp members join rooms of kind citizen or announcement")
        if not await self.allowed(room):
            raise Conflict("WhatsApp members are not allowed in this room")
        citizen = await self.resolve(reference)
        await guard_size(self._rooms, room, confirm, self._config.rooms.confirm_above)
        return await self.invite_citizen(actor, room, citizen, inviter)

    async def invite_citizen(self, actor: str, room: Room, citizen: Citizen,
                             inviter: str | None) -> dict[str, Any]:
        """`invite` once the room and the citizen are settled (also a join code's)."""
        existing = await self._db.wa_rooms.find(room.room_id, citizen.id)
        if existing is not None and existing.state == "joined":
            raise Conflict("already a member of this room")
        pseudonym = existing.display_name if existing else \
            self._privacy.display_name(new_pseudonym_code())
        text = await self.invitation_text(room, pseudonym,
                                          inviter or self._config.consent.agency_name)
        text_hash = hashlib.sha256(text.encode()).hexdigest()
        member = await self._db.wa_rooms.invite(room.room_id, citizen.id, pseudonym, actor,
                                                text_hash)
        key = f"{INVITE_KEY}{member.id}:{secrets.token_hex(6)}"
        # The buttons name the text they answer: a tap on a superseded invitation (the
        # room's settings changed its text) records nothing (`answer`).
        shown = text_hash[:SHOWN_HASH]
        buttons = [(f"{policy.ACCEPT_BUTTON}{member.id}:{shown}", wa_text.ROOM_ACCEPT_BUTTON),
                   (f"{policy.DECLINE_BUTTON}{member.id}:{shown}", wa_text.ROOM_DECLINE_BUTTON)]
        # As stored now (the message that carried a join code has just opened the window).
        fresh = await self._db.citizens.get(citizen.id) or citizen
        waiting = not policy.window_open(fresh.last_inbound_at, datetime.now(UTC))
        if waiting:
            await self._wait_for_reply(fresh, room, key, text, buttons)
        else:
            await self._outbox.system_buttons(citizen, key, text, buttons)
        delivery = {"delivery": "waiting_for_reply",
                    "asked_to_reply": bool(self._config.rooms.invite_template)} \
            if waiting else {"delivery": "sent"}
        await self._db.audit.append(actor, "room.whatsapp_invite",
                                    f"{room.room_id} {pseudonym}", "ok",
                                    "waiting for the citizen's reply" if waiting else None)
        return {"member_id": member.id, "pseudonym": pseudonym, "state": member.state,
                **delivery}

    async def _wait_for_reply(self, citizen: Citizen, room: Room, key: str, text: str,
                              buttons: list[tuple[str, str]]) -> None:
        """The window is closed: free text cannot reach the citizen. The invitation waits,
        sealed, with their room backlog (delivered first when they write:
        FanOut.deliver_backlog); an approved template with nothing of the room asks them
        to answer, at most once per closed window."""
        payload = {"type": "buttons", "body": text, "buttons": buttons, "system": True}
        await self._db.wa_rooms.keep(citizen.id, room.room_id, key,
                                     self._privacy.cipher.encrypt_json(payload,
                                                                       aad=AAD_PAYLOAD))
        rooms = self._config.rooms
        if rooms.invite_template:
            mark = policy.closure_mark(citizen.last_inbound_at)
            await self._outbox.room(citizen, f"wr-invite-ask:{citizen.id}:{mark}", {
                "type": "template", "name": rooms.invite_template,
                "language": rooms.invite_language, "components": [], "system": True})

    async def invitation_text(self, room: Room, pseudonym: str, inviter: str) -> str:
        return wa_text.ROOM_INVITATION.format(
            inviter=inviter, room=room.name, agency=self._config.consent.agency_name,
            pseudonym=pseudonym,
            who_posts=wa_text.ROOM_WHO_POSTS_ANNOUNCEMENT if room.kind == "announcement"
            else wa_text.ROOM_WHO_POSTS_CITIZEN,
            media=wa_text.ROOM_MEDIA_ON if await self.relay_media(room.room_id)
            else wa_text.ROOM_MEDIA_OFF)

    # --- the citizen's answer ---------------------------------------------------------

    async def answer(self, citizen: Citizen, button_id: str, wamid_hash: WamidHash
                     ) -> None:
        """An accept or decline button (ids from `invite`)."""
        accept = button_id.startswith(policy.ACCEPT_BUTTON)
        raw, _, shown = button_id.split(":", 1)[1].partition(":")
        member = await self._db.wa_rooms.get(int(raw)) if raw.isdigit() else None
        room = await self._db.rooms.get(member.room_id) if member else None
        if member is None or room is None or member.citizen_id != citizen.id or \
                room.closed_at is not None or member.state not in ("invited", "joined") or \
                not await self.allowed(room):  # switched off since the invitation
            await self._outbox.system_text(citizen, f"wr-gone:{wamid_hash}",
                                           wa_text.ROOM_INVITATION_GONE)
            return
        if member.state == "joined":
            return  # a repeated tap
        if shown and not member.notice_hash.startswith(shown):  # (none: sent before this)
            await self._outbox.system_text(citizen, f"wr-superseded:{wamid_hash}",
                                           wa_text.ROOM_INVITATION_SUPERSEDED)
            return
        if not accept:
            await self._db.wa_rooms.set_state(member.id, "declined", only_from=("invited",))
            await self._outbox.system_text(citizen, f"wr-declined:{wamid_hash}",
                                           wa_text.ROOM_DECLINED.format(room=room.name))
            return
        await self._join(citizen, member, room, wamid_hash)

    async def _join(self, citizen: Citizen, member: RoomMember, room: Room,
                    wamid_hash: WamidHash) -> None:
        ghost = member.ghost_user_id
        if ghost is None:
            ghost = await self._ghosts.create("room", citizen.id, member.display_name)
            await self._db.wa_rooms.set_ghost(member.id, ghost)
        await self._ghosts.ensure_registered(ghost)
        await self._ghosts.device(ghost)  # its own device, cross-signed when it opens
        try:
            await self._api.invite(self._ghosts.bot, room.room_id, ghost)
        except MatrixError as exc:
            if exc.status != 403:  # 403: already invited or joined (a retry)
                raise
        await self._api.join(ghost, room.room_id)
        staff = member.invited_by if member.invited_by.startswith("@") else None
        async with self._db.transaction() as tx:
            if not await tx.wa_rooms.set_state(member.id, "joined", only_from=("invited",)):
                return
            await tx.consent.append(
                citizen_id=citizen.id, pseudonym=Pseudonym(citizen.pseudonym_code),
                purpose=purpose(room.room_id), state="granted",
                notice_version=policy.INVITATION_VERSION, notice_hash=member.notice_hash,
                channel="whatsapp", language=policy.INVITATION_LANGUAGE,
                evidence=consent.message_evidence(wamid_hash),
                staff_id=UserID(staff) if staff else None)
            await tx.audit.append("citizen", "consent.granted",
                                  f"pseudonym {citizen.pseudonym_code}", "ok", "room")
        self._metrics.consent_changes.labels("room", "granted").inc()
        log.info("WhatsApp member joined room %s", room.room_id)
        await self._tell_room(room)
        await self._outbox.system_text(citizen, f"wr-joined:{wamid_hash}",
                                       wa_text.ROOM_JOINED.format(
                                           room=room.name, pseudonym=member.display_name))

    async def _tell_room(self, room: Room) -> None:
        """Once per room: a notice to everyone, and a line in the topic."""
        if await self._db.kv.get(TOLD_KEY + room.room_id) is not None:
            return
        told = hashlib.sha256(room.room_id.encode()).hexdigest()[:24]
        await self._relay.send_as(self._ghosts.bot, room.room_id,
                                  {"msgtype": "m.notice", "body": mx_text.WA_ROOM_NOTICE},
                                  txn_id=f"wr-told-{told}")
        try:
            current = await self._api.get_state_event(self._ghosts.bot, room.room_id,
                                                      "m.room.topic")
            topic = str(current.get("topic") or "")
        except MatrixError:
            topic = ""
        if mx_text.WA_ROOM_TOPIC_LINE not in topic:
            await self._api.send_state(self._ghosts.bot, room.room_id, "m.room.topic",
                                       {"topic": f"{topic}\n{mx_text.WA_ROOM_TOPIC_LINE}".strip()})
        await self._db.kv.set(TOLD_KEY + room.room_id, "1")

    # --- leaving ----------------------------------------------------------------------

    async def leave(self, citizen: Citizen, member: RoomMember, wamid_hash: WamidHash, *,
                    tell: bool = True) -> None:
        """SALIR (or BAJA, for every room): the consent record, the ghost leaves."""
        room = await self._db.rooms.get(member.room_id)
        async with self._db.transaction() as tx:
            if await tx.wa_rooms.set_state(member.id, "left", only_from=("joined",)):
                await tx.consent.append(
                    citizen_id=citizen.id, pseudonym=Pseudonym(citizen.pseudonym_code),
                    purpose=purpose(member.room_id), state="withdrawn",
                    notice_version=policy.INVITATION_VERSION, notice_hash=member.notice_hash,
                    channel="whatsapp", language=policy.INVITATION_LANGUAGE,
                    evidence=consent.message_evidence(wamid_hash))
                await tx.audit.append("citizen", "consent.withdrawn",
                                      f"pseudonym {citizen.pseudonym_code}", "ok", "room")
                self._metrics.consent_changes.labels("room", "withdrawn").inc()
        await self._db.wa_rooms.forget_room(citizen.id, member.room_id)
        if member.ghost_user_id:
            try:
                await self._api.leave(member.ghost_user_id, member.room_id)
            except MatrixError as exc:
                log.warning("room ghost leave failed: %s", exc.errcode)
        if tell and room is not None:
            await self._outbox.system_text(citizen, f"wr-left:{wamid_hash}:{member.id}",
                                           wa_text.ROOM_LEFT.format(room=room.name))

    async def on_member_event(self, event: dict[str, Any]) -> None:
        """A room ghost kicked or banned by a moderator: relay stops, the citizen is told."""
        target = str(event.get("state_key", ""))
        content = event.get("content")
        membership = content.get("membership") if isinstance(content, dict) else None
        if membership not in ("leave", "ban") or event.get("sender") == target or \
                not self._ghosts.is_ours(target):
            return
        member = await self._db.wa_rooms.by_ghost(UserID(target))
        if member is None or member.room_id != event.get("room_id"):
            return
        if not await self._db.wa_rooms.set_state(member.id, "left", only_from=("joined",
                                                                                 "invited")):
            return
        await self._db.wa_rooms.forget_room(member.citizen_id, member.room_id)
        await self._db.audit.append(str(event.get("sender", "")), f"room.whatsapp_{membership}",
                                    f"{member.room_id} {member.display_name}", "ok", None)
        citizen = await self._db.citizens.get(member.citizen_id)
        room = await self._db.rooms.get(member.room_id)
        if citizen is not None and room is not None:
            await self._outbox.system_text(
                citizen, f"wr-removed:{event.get('event_id')}", wa_text.ROOM_REMOVED.format(
                    room=room.name))

    async def undelivered(self, wamid_hash: WamidHash, title: str) -> None:
        """WhatsApp reported a room message to a member failed after accepting it: the
        room is told who did not get it (their pseudonym there) and why; counted."""
        hit = await self._db.wa_rooms.by_wamid(wamid_hash)
        member = await self._db.wa_rooms.find(hit[0], hit[2]) if hit is not None else None
        if hit is None or member is None:
            return  # not a room message
        self._metrics.room_not_relayed.labels("undelivered").inc()
        await self._relay.send_as(self._ghosts.bot, hit[0], {
            "msgtype": "m.notice", "body": mx_text.WA_ROOM_UNDELIVERED.format(
                pseudonym=member.display_name, title=title)},
            txn_id=f"wr-undelivered-{wamid_hash[:32]}")

    # --- per-room switches ------------------------------------------------------------

    async def configure(self, actor: str, room_id: str, allowed: bool | None,
                        media: bool | None) -> dict[str, bool]:
        room = await open_room(self._db, room_id)
        if room.kind not in ("citizen", "announcement", "team"):
            raise InvalidParam("only agency rooms have WhatsApp settings")
        current = await self._db.wa_rooms.settings(room.room_id)
        new_allowed = allowed if allowed is not None else await self.allowed(room)
        new_media = media if media is not None else await self.relay_media(room.room_id)
        await self._db.wa_rooms.save_settings(RoomSettings(room.room_id, new_allowed,
                                                           new_media))
        await self._db.audit.append(actor, "room.whatsapp_settings", room.room_id, "ok",
                                    f"allowed={new_allowed} media={new_media}"
                                    + ("" if current else " (first)"))
        return {"whatsapp_allowed": new_allowed, "relay_media": new_media}
