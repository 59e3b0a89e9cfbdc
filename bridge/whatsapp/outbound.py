"""Matrix → WhatsApp: staff events in a portal become outbox entries.

What each event becomes is decided in `bridge.whatsapp.staff_events` (pure); this
handler looks up what that needs (the wamid a reply or reaction points at, what a
redaction removes), applies the policy, queues, and tells staff about anything it does
not send (with a metric by reason): an unsupported event, a file over WhatsApp's
limits, an edit or redaction (the Cloud API can apply neither), a reaction to a
message that is not in the WhatsApp conversation, no consent, the 24 h window closed.

Held for confirmation: a text or caption that looks like a DNI/NIE, IBAN or card number
(once it leaves on WhatsApp it can be forwarded out of anyone's control). Staff
are told; reacting ✅ to the message, or replying «enviar» to it, sends it; redacting
it drops it. The held payloads are kept encrypted until then. Only a confirmation in
the held message's own portal releases it: one written in another portal is refused
there with a notice.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from bridge.db import Citizen, Database
from bridge.matrix.relay import StaffEvent
from bridge.metrics import Metrics
from bridge.model import HeldStaffMessage
from bridge.privacy import AAD_PAYLOAD, Cipher, Privacy, looks_like_personal_id
from bridge.texts.matrix import default as mx_text
from bridge.types import EventID, RoomID
from bridge.whatsapp.outbox import Outbox
from bridge.whatsapp.payloads import Reaction
from bridge.whatsapp.portal import Portals
from bridge.whatsapp.staff_events import (
    EDIT_NOTICE,
    REACTION_TARGET_NOTICE,
    REDACTION_NOTICE,
    Decision,
    Ignored,
    NotSent,
    strip_reply_fallback,
    translate,
)

log = logging.getLogger(__name__)

__all__ = [
    "EDIT_NOTICE",
    "LEGACY_HELD_KEY",
    "WINDOW",
    "StaffToWhatsApp",
    "adopt_legacy_holds",
    "held_aad",
    "strip_reply_fallback",
    "within_window",
]

WINDOW = timedelta(hours=24)
WINDOW_NOTICE = mx_text.WINDOW_NOTICE
NO_CONSENT_NOTICE = mx_text.NO_CONSENT_NOTICE
HELD_NOTICE = mx_text.HELD_NOTICE
RELEASED_NOTICE = mx_text.RELEASED_NOTICE
EXPIRED_NOTICE = mx_text.EXPIRED_NOTICE
DROPPED_HELD_NOTICE = mx_text.DROPPED_HELD_NOTICE
OTHER_PORTAL_NOTICE = mx_text.OTHER_PORTAL_NOTICE
CONFIRM_REACTIONS = ("✅", "✔️", "✔", "👍")
CONFIRM_WORDS = ("enviar", "enviar igualmente", "confirmar")
# A phone number alone is not held: staff give the agency's numbers all the time.
HELD_KINDS = ("dni", "nie", "iban", "card")
# Before revision 0015 a hold was `kv` "held-out:<event id>" -> sealed {at, room_id,
# payloads}; `adopt_legacy_holds` moves those into held_staff_messages at start.
LEGACY_HELD_KEY = "held-out:"


def held_aad(event_id: str) -> bytes:
    """Binds a held message's sealed payloads to its event id (no swapping rows)."""
    return b"civic-bridge held staff message " + event_id.encode()


def within_window(citizen: Citizen, now: datetime) -> bool:
    return citizen.last_inbound_at is not None and now - citizen.last_inbound_at <= WINDOW


async def adopt_legacy_holds(db: Database, cipher: Cipher) -> int:
    """Move holds kept in `kv` before revision 0015 into their table (at start; a
    migration has no data key). Unreadable ones are left (a key may come back) and
    logged by kind only; returns how many moved."""
    moved = 0
    for key, sealed in await db.kv.with_prefix(LEGACY_HELD_KEY):
        event_id = EventID(key.removeprefix(LEGACY_HELD_KEY))
        try:
            held = cipher.decrypt_json(sealed, aad=AAD_PAYLOAD)
            payloads = held.get("payloads") or [held["payload"]]  # "payload": before parts
            await db.held.add(event_id, RoomID(held["room_id"]),
                              datetime.fromisoformat(held["at"]),
                              cipher.encrypt_json(payloads, aad=held_aad(event_id)))
        except Exception as exc:
            # Never the key: it holds a Matrix event id.
            log.warning("held staff message from before 0015 unreadable (%s); kept",
                        type(exc).__name__)
            continue
        await db.kv.delete(key)
        moved += 1
    if moved:
        log.info("moved %d held staff message(s) into their table", moved)
    return moved


class StaffToWhatsApp:
    """A `Relay` handler: called with every decrypted staff event."""

    def __init__(self, db: Database, portals: Portals, outbox: Outbox,
                 privacy: Privacy, metrics: Metrics) -> None:
        self._db = db
        self._portals = portals
        self._outbox = outbox
        self._privacy = privacy
        self._cipher = privacy.cipher
        self._metrics = metrics

    async def __call__(self, event: StaffEvent) -> None:
        room = event.room
        if room is None or room.kind != "portal" or room.citizen_id is None:
            return
        citizen = await self._db.citizens.get(room.citizen_id)
        if citizen is None:
            return
        if event.state_key is not None:
            # Room state is not a message (live location could be, but portals' power
            # levels keep staff from starting it: state needs moderator level).
            return
        held = await self._confirmation_of(event)
        if held is not None:
            await self._release(citizen, event, held)
            return
        decision = await self._decide(event)
        if isinstance(decision, Ignored):
            return
        if isinstance(decision, NotSent):
            await self._not_sent(event.room_id, decision)
            return
        if not await self._may_send(citizen, event):
            return
        text = "\n".join(str(p.get("body") or p.get("caption") or "") for p in decision)
        kinds = [k for k in looks_like_personal_id(text) if k in HELD_KINDS]
        if kinds:
            await self._hold(event, decision, kinds)
            return
        await self._queue(citizen, event.room_id, event.event_id, decision)

    async def _queue(self, citizen: Citizen, room_id: RoomID, event_id: EventID,
                     payloads: list[dict[str, Any]]) -> None:
        for part, payload in enumerate(payloads):
            await self._outbox.staff(citizen, room_id, event_id, payload, part)

    async def _not_sent(self, room_id: RoomID, decision: Decision) -> None:
        if isinstance(decision, NotSent):
            self._metrics.outbound_not_sent.labels(decision.reason).inc()
            await self._portals.notice(room_id, decision.notice)

    async def _may_send(self, citizen: Citizen, event: StaffEvent) -> bool:
        if citizen.consent_state != "granted":
            await self._not_sent(event.room_id, NotSent("no_consent", NO_CONSENT_NOTICE))
            return False
        if not within_window(citizen, datetime.now(UTC)):
            await self._not_sent(event.room_id, NotSent("window_closed", WINDOW_NOTICE))
            return False
        return True

    # --- what the event becomes -------------------------------------------------------

    async def _decide(self, event: StaffEvent) -> Decision:
        content = event.content
        relates = content.get("m.relates_to")
        relates = relates if isinstance(relates, dict) else {}
        if event.type == "m.reaction":
            key = relates.get("key")
            if relates.get("rel_type") != "m.annotation" or not isinstance(key, str) or not key:
                return Ignored()
            target = await self._wamid_of(relates.get("event_id"))
            if target is None:
                return NotSent("reaction_target", REACTION_TARGET_NOTICE)
            return [{"type": "reaction", "message_id": target, "emoji": key}]
        if event.type == "m.room.redaction":
            return await self._redaction(event)
        if relates.get("rel_type") == "m.replace":
            return NotSent("edit", EDIT_NOTICE)
        in_reply_to = relates.get("m.in_reply_to")
        reply_to = await self._wamid_of(in_reply_to.get("event_id")
                                        if isinstance(in_reply_to, dict) else None)
        return translate(event.type, content, reply_to)

    async def _redaction(self, event: StaffEvent) -> Decision:
        """A redacted reaction is taken back on WhatsApp (an empty emoji); a redacted
        held message is dropped; a redacted message that went out stays on the
        citizen's phone, and staff are told so."""
        target = event.redacts
        if target is None:
            return Ignored()
        if await self._db.held.delete(EventID(target)):
            await self._db.audit.append(event.sender, "message.drop", f"room {event.room_id}",
                                        "dropped", "redacted by staff")
            await self._portals.notice(event.room_id, DROPPED_HELD_NOTICE)
            return Ignored()
        queued = await self._outbox.queued(target)
        if queued is None:
            return Ignored()  # never sent (a notice, a citizen's message): Matrix only
        status, envelope = queued
        if status in ("failed", "cancelled"):
            return Ignored()
        if isinstance(reaction := envelope.content, Reaction):
            if not reaction.emoji:
                return Ignored()
            return [{"type": "reaction", "message_id": reaction.message_id, "emoji": ""}]
        return NotSent("redaction", REDACTION_NOTICE)

    async def _wamid_of(self, event_id: Any) -> str | None:
        if not isinstance(event_id, str):
            return None
        link = await self._db.messages.by_event(EventID(event_id))
        return self._privacy.open_wamid(link.wamid_hash, link.wamid_ct) if link else None

    # --- hold for confirmation (personal identifiers) ---------------------------------

    async def _hold(self, event: StaffEvent, payloads: list[dict[str, Any]],
                    kinds: list[str]) -> None:
        await self._db.held.add(event.event_id, event.room_id, datetime.now(UTC),
                                self._cipher.encrypt_json(payloads,
                                                          aad=held_aad(event.event_id)))
        await self._db.audit.append(event.sender, "message.hold", f"room {event.room_id}",
                                    "held", ", ".join(kinds))
        await self._portals.notice(event.room_id, HELD_NOTICE.format(kinds=", ".join(kinds)))

    async def _confirmation_of(self, event: StaffEvent) -> HeldStaffMessage | None:
        """The held message `event` confirms, if it confirms one."""
        relates = event.content.get("m.relates_to") or {}
        if event.type == "m.reaction":
            target = relates.get("event_id")
            if relates.get("rel_type") != "m.annotation" or \
                    relates.get("key") not in CONFIRM_REACTIONS:
                return None
        elif event.type == "m.room.message":
            target = (relates.get("m.in_reply_to") or {}).get("event_id")
            body = strip_reply_fallback(str(event.content.get("body", ""))).strip().lower()
            if body.rstrip(".!") not in CONFIRM_WORDS:
                return None
        else:
            return None
        if not isinstance(target, str):
            return None
        return await self._db.held.get(EventID(target))

    async def _release(self, citizen: Citizen, event: StaffEvent,
                       held: HeldStaffMessage) -> None:
        if held.room_id != event.room_id:
            # Event ids are not secret and staff sit in many portals: a ✅ written here
            # must not send what was written to another citizen (to theirs, or to this
            # room's). The hold stays for its own portal.
            self._count_confirmation("other_portal")
            await self._db.audit.append(event.sender, "message.release",
                                        f"room {event.room_id}", "refused",
                                        "held in another portal")
            await self._portals.notice(event.room_id, OTHER_PORTAL_NOTICE)
            return
        if datetime.now(UTC) - held.held_at > WINDOW:
            await self._db.held.delete(held.event_id)
            self._count_confirmation("expired")
            await self._portals.notice(event.room_id, EXPIRED_NOTICE)
            return
        if not await self._may_send(citizen, event):
            return  # kept: it may still be confirmed once the citizen writes again
        # Queued (idempotent per held event) before the hold is forgotten: a crash in
        # between sends it once when the confirmation is processed again.
        payloads = self._cipher.decrypt_json(held.payloads_ct, aad=held_aad(held.event_id))
        await self._queue(citizen, event.room_id, held.event_id, payloads)
        await self._db.held.delete(held.event_id)
        await self._db.audit.append(event.sender, "message.release", f"room {event.room_id}",
                                    "ok", "confirmed by staff")
        self._count_confirmation("released")
        await self._portals.notice(event.room_id, RELEASED_NOTICE)

    def _count_confirmation(self, outcome: str) -> None:
        self._metrics.held_confirmations.labels(outcome).inc()
