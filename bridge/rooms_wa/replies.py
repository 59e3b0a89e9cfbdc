"""WhatsApp → rooms: where a room member's WhatsApp message goes (bridge.rooms_wa.policy
decides), posting it as their pseudonym in that room, and relaying it on to the room's
other WhatsApp members. Runs in the inbound worker before the portal's consent flow;
answers False when the message is not for a room (the ordinary flow then applies).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from bridge.config import Config
from bridge.db import Citizen, Database, InboundItem, Repositories
from bridge.errors import Unavailable
from bridge.matrix.relay import Relay
from bridge.metrics import Metrics
from bridge.model import BacklogEntry, RoomMember
from bridge.privacy import Privacy
from bridge.rooms_wa import policy
from bridge.rooms_wa.fanout import FanOut
from bridge.rooms_wa.join import SelfServiceJoin
from bridge.rooms_wa.members import Members
from bridge.texts.whatsapp import default as wa_text
from bridge.types import EventID, RoomID, WamidHash
from bridge.whatsapp import consent, stored
from bridge.whatsapp.mirror import Mirror, text_content, txn_id
from bridge.whatsapp.outbox import Outbox
from bridge.whatsapp.webhook_parse import InboundMessage, follow_up_target

log = logging.getLogger(__name__)

PENDING_KEY = "wr-pending:"  # + citizen id -> the inbound item waiting for the list
PORTAL_CHOSEN_KEY = "wr-portal:"  # + citizen id -> when the portal was chosen
MUTED_TOLD_KEY = "wr-muted:"  # + membership id: told once that they are muted
# How long a quote waits for a send in flight to be recorded (Graph answers within its
# 30 s timeout); a send older than that was cut short and is settled by its status later.
QUOTE_WAIT = timedelta(seconds=40)


@dataclass(frozen=True)
class Standing:
    """A citizen's rooms and what waits for them, as their message arrived."""

    joined: list[RoomMember]
    backlog: list[BacklogEntry]


class RoomReplies:
    """The inbound hook (WhatsAppInbound.set_rooms_hook)."""

    def __init__(self, config: Config, db: Database, privacy: Privacy, relay: Relay,
                 mirror: Mirror, outbox: Outbox, members: Members, fanout: FanOut,
                 join: SelfServiceJoin, metrics: Metrics) -> None:
        self._config = config
        self._metrics = metrics
        self._db = db
        self._privacy = privacy
        self._relay = relay
        self._mirror = mirror
        self._outbox = outbox
        self._members = members
        self._fanout = fanout
        self._join = join

    async def standing(self, citizen: Citizen, repos: Repositories) -> Standing:
        return Standing(await repos.wa_rooms.of_citizen(citizen.id),
                        await repos.wa_rooms.backlog(citizen.id))

    async def __call__(self, citizen: Citizen, item: InboundItem, msg: InboundMessage,
                       portal: RoomID | None, standing: Standing) -> bool:
        button = (msg.button_id or "") if msg.kind == "button" else ""
        # What is kept of this message's id (reply keys, consent evidence): its keyed hash.
        wamid_hash = self._privacy.index.wamid(msg.wamid)
        if button.startswith((policy.ACCEPT_BUTTON, policy.DECLINE_BUTTON)):
            await self._members.answer(citizen, button, wamid_hash)
            return True
        if msg.kind == "text" and await self._join.redeem(citizen, msg.text, wamid_hash):
            return True  # «UNIRME <code>» from an invite link's page
        # Any message opens the window again: what waited goes first, in order.
        await self._fanout.deliver_backlog(citizen, standing.backlog)
        joined = standing.joined
        if button.startswith(policy.PICK_ROW):
            await self._picked(citizen, button.removeprefix(policy.PICK_ROW), msg, joined,
                               portal)
            return True
        if not joined:
            return False
        if consent.intent_of(msg, self._config.consent) == "opt_out":
            for member in joined:  # BAJA leaves every room too; the portal flow confirms
                await self._members.leave(citizen, member, wamid_hash, tell=False)
            return False
        about = follow_up_target(msg)
        if about is not None:  # an edit, revoke or reaction goes where its message is
            where = await self._quoted(about, citizen, item)
            owner = next((m for m in joined if str(m.id) == where), None)
            if owner is not None:
                await self.post(citizen, owner, msg)
                return True
            if where is not None and where != "portal":  # a room they have left
                self._metrics.room_not_relayed.labels("not_member").inc()
                await self._outbox.system_text(citizen, f"wr-notnow:{wamid_hash}",
                                               wa_text.ROOM_NOT_MEMBER_NOW)
                return True
            if where == "portal":
                return False
        conversations = await self._conversations(citizen, joined, portal)
        word = policy.keyword(msg.text) if msg.kind == "text" else None
        if word == "switch":
            await self._ask(citizen, joined, portal, wamid_hash, wa_text.ROOM_PICK_SWITCH_BODY)
            return True
        if word == "leave":
            rooms_only = [c for c in conversations if c.key != "portal"]
            target = policy.route(rooms_only, None)
            if isinstance(target, policy.Post):
                member = next(m for m in joined if str(m.id) == target.key)
                await self._members.leave(citizen, member, wamid_hash)
            else:
                await self._ask(citizen, joined, None, wamid_hash, wa_text.ROOM_PICK_SWITCH_BODY)
            return True
        quoted = await self._quoted(msg.context_id, citizen, item)
        decision = policy.route(conversations, quoted)
        if decision is None:
            return False
        if isinstance(decision, policy.Ask):
            await self._db.kv.set(PENDING_KEY + str(citizen.id), str(item.id))
            await self._ask(citizen, joined, portal, wamid_hash, wa_text.ROOM_PICK_BODY)
            return True
        if decision.key == "portal":
            if decision.choose:
                await self._choose_portal(citizen)
            return False
        member = next(m for m in joined if str(m.id) == decision.key)
        if decision.choose:
            await self._db.wa_rooms.choose(member.id, datetime.now(UTC))
        await self.post(citizen, member, msg)
        return True

    # --- choosing ---------------------------------------------------------------------

    async def _conversations(self, citizen: Citizen, joined: list[RoomMember],
                             portal: RoomID | None) -> list[policy.Conversation]:
        out = [policy.Conversation(str(m.id), m.chosen_at) for m in joined]
        if portal is not None and citizen.consent_state == "granted":
            raw = await self._db.kv.get(PORTAL_CHOSEN_KEY + str(citizen.id))
            out.append(policy.Conversation(
                "portal", datetime.fromisoformat(raw) if raw else None))
        return out

    async def _quoted(self, context_id: str | None, citizen: Citizen, item: InboundItem
                      ) -> str | None:
        """The conversation of the quoted message: a membership id, "portal", or None
        if it is not known. Raises Unavailable (the item is retried) while a send to
        the citizen that began before the message came is not recorded: it may be the
        quoted one, and a guess could post in another room. Only while the message is
        young: a send cut short by a crash is settled later, by its status."""
        if not context_id:
            return None
        context_hash = self._privacy.index.wamid(context_id)
        known, conversation = await self._link(context_hash, citizen)
        if known:
            return conversation
        came = item.created_at
        if datetime.now(UTC) - came >= QUOTE_WAIT:
            return None
        if await self._db.outbox.sending_to(citizen.id, came - QUOTE_WAIT, came):
            raise Unavailable("the quoted message may be a send not recorded yet")
        # No send was unrecorded just now; one recorded since the first look has its
        # link now, so look again.
        return (await self._link(context_hash, citizen))[1]

    async def _link(self, context_hash: WamidHash, citizen: Citizen
                    ) -> tuple[bool, str | None]:
        """Whether the quoted message is known, and its conversation (as `_quoted`)."""
        hit = await self._db.wa_rooms.by_wamid(context_hash)
        if hit is not None and hit[2] == citizen.id:
            member = await self._db.wa_rooms.find(hit[0], citizen.id)
            return True, str(member.id) if member else None
        if await self._db.messages.by_wamid(context_hash) is not None:
            return True, "portal"
        return False, None

    async def _choose_portal(self, citizen: Citizen) -> None:
        await self._db.kv.set(PORTAL_CHOSEN_KEY + str(citizen.id),
                              datetime.now(UTC).isoformat())

    async def _ask(self, citizen: Citizen, joined: list[RoomMember], portal: RoomID | None,
                   wamid_hash: WamidHash, body: str) -> None:
        rows: list[tuple[str, str]] = []
        for member in joined[:9]:
            room = await self._db.rooms.get(member.room_id)
            if room is not None:
                rows.append((f"{policy.PICK_ROW}{member.id}", policy.short_name(room.name)))
        if portal is not None and citizen.consent_state == "granted":
            rows.append((f"{policy.PICK_ROW}{policy.PORTAL_CHOICE}", wa_text.ROOM_PORTAL_TITLE))
        await self._outbox.room(citizen, f"wr-ask:{wamid_hash}", {
            "type": "list", "body": body, "button": wa_text.ROOM_PICK_BUTTON,
            "section": wa_text.ROOM_PICK_SECTION, "rows": rows, "system": True})

    async def _picked(self, citizen: Citizen, key: str, msg: InboundMessage,
                      joined: list[RoomMember], portal: RoomID | None) -> None:
        wamid_hash = self._privacy.index.wamid(msg.wamid)
        pending_id = await self._db.kv.get(PENDING_KEY + str(citizen.id))
        pending = await self._pending(pending_id)
        if key == policy.PORTAL_CHOICE and portal is not None:
            await self._choose_portal(citizen)
            if pending is not None and citizen.consent_state == "granted":
                await self._mirror.relay(citizen, portal, pending)
            name = wa_text.ROOM_PORTAL_TITLE
        else:
            member = next((m for m in joined if str(m.id) == key), None)
            room = await self._db.rooms.get(member.room_id) if member else None
            if member is None or room is None:
                await self._outbox.system_text(citizen, f"wr-gone:{wamid_hash}",
                                               wa_text.ROOM_INVITATION_GONE)
                return
            await self._db.wa_rooms.choose(member.id, datetime.now(UTC))
            if pending is not None:
                await self.post(citizen, member, pending)
            name = room.name
        await self._db.kv.delete(PENDING_KEY + str(citizen.id))
        if pending is None:
            await self._outbox.system_text(citizen, f"wr-picked:{wamid_hash}",
                                           wa_text.ROOM_PICKED.format(room=name))

    async def _pending(self, item_id: str | None) -> InboundMessage | None:
        item = await self._db.inbound.get(int(item_id)) if item_id and item_id.isdigit() \
            else None
        if item is None:
            return None
        msg = stored.open_row(self._privacy.cipher, item.payload,
                              self._config.whatsapp.phone_number_id)
        return msg if isinstance(msg, InboundMessage) else None

    # --- posting ----------------------------------------------------------------------

    async def post(self, citizen: Citizen, member: RoomMember, msg: InboundMessage) -> None:
        """Post as the member's pseudonym in the room (moderation applies), then relay
        it to the room's other WhatsApp members."""
        room = await self._db.rooms.get(member.room_id)
        ghost = member.ghost_user_id
        if room is None or ghost is None:
            return
        wamid_hash = self._privacy.index.wamid(msg.wamid)
        verdict = policy.may_post(room.kind, await self._fanout.power(room.room_id, ghost),
                                  await self._fanout.events_default(room.room_id))
        if verdict == "announcement":
            await self._outbox.system_text(citizen, f"wr-ann:{wamid_hash}",
                                           wa_text.ROOM_ANNOUNCEMENT_ONLY.format(room=room.name))
            self._metrics.room_not_relayed.labels("announcement").inc()
            return
        if verdict == "muted":
            self._metrics.room_not_relayed.labels("muted").inc()
            if await self._db.kv.get(MUTED_TOLD_KEY + str(member.id)) is None:
                await self._outbox.system_text(citizen, f"wr-muted:{wamid_hash}",
                                               wa_text.ROOM_MUTED.format(room=room.name))
                await self._db.kv.set(MUTED_TOLD_KEY + str(member.id), "1")
            return
        await self._db.kv.delete(MUTED_TOLD_KEY + str(member.id))

        async def in_this_room(wamid: str) -> EventID | None:
            """The room event a wamid of this citizen's stands for (their message, or
            one relayed to them), in this room only."""
            hit = await self._db.wa_rooms.by_wamid(self._privacy.index.wamid(wamid))
            return hit[1] if hit is not None and hit[0] == room.room_id and \
                hit[2] == citizen.id else None

        reply_to = await in_this_room(msg.context_id) if msg.context_id else None
        revoked = await in_this_room(msg.revoke_of) if msg.revoke_of else None
        posted: list[tuple[str, dict[str, Any]]] = []
        if msg.kind == "text":
            content = text_content(msg.text or "", reply_to)
            event_id: EventID | None = await self._relay.send_as(
                ghost, room.room_id, content, txn_id=txn_id(self._privacy.index, msg.wamid))
            posted.append(("m.room.message", content))
        else:
            event_id = await self._mirror.post_as(ghost, room.room_id, msg, posted,
                                                  in_this_room)
        others = [m for m in await self._db.wa_rooms.in_room(room.room_id)
                  if m.citizen_id != citizen.id]
        if revoked is not None:  # redacted by the ghost (mirror): the others are told
            await self._fanout.withdrawn(room, revoked, others, by=member.display_name)
        if event_id is None:
            return
        await self._db.wa_rooms.link(self._privacy.seal_wamid(msg.wamid), citizen.id,
                                     room.room_id, event_id)
        # What was posted (a text, a file with its keys, a location) goes on to the
        # room's other WhatsApp members like anyone's message; reactions stay in the room.
        first = next((c for etype, c in posted if etype == "m.room.message"), None)
        if first is not None and msg.caption and "filename" not in first:
            # The mirror's file event carries the caption as its body (no filename):
            # name the file so that the body is read as the caption (MSC2530).
            first = {**first, "filename": (msg.media.filename if msg.media else None)
                     or "archivo"}
        if others and first is not None:
            await self._fanout.send(room, event_id, "m.room.message", first,
                                    member.display_name, others)
