"""Matrix → WhatsApp: staff events in a portal become outbox entries.

Refused (with a notice to staff, nothing sent): the citizen has not consented or has
withdrawn; more than 24 h have passed since the citizen's last message (only approved
templates may be sent then); edits (WhatsApp cannot edit a business message).

Held for confirmation: a text or caption that looks like a DNI/NIE, IBAN or card number
(once it leaves on WhatsApp it can be forwarded out of anyone's control). Staff
are told; reacting ✅ to the message, or replying «enviar» to it, sends it. The held
payload is kept encrypted until then. Only a confirmation in the held message's own
portal releases it: one written in another portal is refused there with a notice.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from bridge.db import Citizen, Database
from bridge.matrix.relay import StaffEvent
from bridge.metrics import Metrics
from bridge.privacy import AAD_PAYLOAD, Cipher, Privacy, looks_like_personal_id
from bridge.types import EventID
from bridge.whatsapp.outbox import WHATSAPP_KIND, Outbox
from bridge.whatsapp.portal import Portals

log = logging.getLogger(__name__)

WINDOW = timedelta(hours=24)
WINDOW_NOTICE = ("No enviado: han pasado más de 24 horas desde el último mensaje de esta "
                 "persona. WhatsApp solo permite enviar una plantilla aprobada (escriba "
                 "!plantilla para verlas); el mensaje se podrá enviar cuando vuelva a "
                 "escribir.")
NO_CONSENT_NOTICE = "No enviado: esta persona no tiene activo el reenvío por WhatsApp."
EDIT_NOTICE = "Las ediciones no se envían a WhatsApp; envíe un mensaje nuevo si es necesario."
HELD_NOTICE = ("Retenido, no enviado: el mensaje parece contener datos personales ({kinds}). "
               "Si debe enviarse igualmente por WhatsApp, reaccione con ✅ a ese mensaje o "
               "respóndale «enviar».")
RELEASED_NOTICE = "Enviado a WhatsApp tras su confirmación."
EXPIRED_NOTICE = "No enviado: la confirmación llegó más de 24 horas después del mensaje."
OTHER_PORTAL_NOTICE = ("No enviado: ese mensaje retenido es de otra sala y solo puede "
                       "confirmarse en la sala donde se escribió.")
CONFIRM_REACTIONS = ("✅", "✔️", "✔", "👍")
CONFIRM_WORDS = ("enviar", "enviar igualmente", "confirmar")
# A phone number alone is not held: staff give the agency's numbers all the time.
HELD_KINDS = ("dni", "nie", "iban", "card")
HELD_KEY = "held-out:"  # + Matrix event id -> the encrypted payload and when it was held


def strip_reply_fallback(body: str) -> str:
    """Drop the `> <@user> quoted` lines clients prepend to replies."""
    lines = body.split("\n")
    while lines and lines[0].startswith(">"):
        lines.pop(0)
    if lines and not lines[0].strip():
        lines.pop(0)
    return "\n".join(lines) or body


def within_window(citizen: Citizen, now: datetime) -> bool:
    return citizen.last_inbound_at is not None and now - citizen.last_inbound_at <= WINDOW


async def drop_held(db: Database, cipher: Cipher, *, before: datetime | None = None,
                    room_id: str | None = None) -> int:
    """Delete held staff messages held before `before` or in `room_id`; returns how many.

    For the retention purge (a hold expires with the 24-hour window) and for a citizen's
    erasure (what staff wrote to them goes too)."""
    dropped = 0
    for key, sealed in await db.kv.with_prefix(HELD_KEY):
        held = cipher.decrypt_json(sealed, aad=AAD_PAYLOAD)
        if (before is not None and datetime.fromisoformat(held["at"]) < before) or \
                (room_id is not None and held.get("room_id") == room_id):
            await db.kv.delete(key)
            dropped += 1
    return dropped


class StaffToWhatsApp:
    """A `Relay` handler: called with every decrypted staff event."""

    def __init__(self, db: Database, portals: Portals, outbox: Outbox,
                 privacy: Privacy, metrics: Metrics | None = None) -> None:
        self._db = db
        self._portals = portals
        self._outbox = outbox
        self._cipher = privacy.cipher
        self._metrics = metrics

    async def __call__(self, event: StaffEvent) -> None:
        room = await self._db.rooms.get(event.room_id)
        if room is None or room.kind != "portal" or room.citizen_id is None:
            return
        citizen = await self._db.citizens.get(room.citizen_id)
        if citizen is None:
            return
        held = await self._confirmation_of(event)
        if held is not None:
            await self._release(citizen, event, *held)
            return
        payload = await self._payload(event)
        if payload is None:
            return
        if not await self._may_send(citizen, event):
            return
        text = str(payload.get("body") or payload.get("caption") or "")
        kinds = [k for k in looks_like_personal_id(text) if k in HELD_KINDS]
        if kinds:
            await self._hold(event, payload, kinds)
            return
        await self._outbox.staff(citizen, event.room_id, event.event_id, payload)

    async def _may_send(self, citizen: Citizen, event: StaffEvent) -> bool:
        if citizen.consent_state != "granted":
            await self._portals.notice(event.room_id, NO_CONSENT_NOTICE)
            return False
        if not within_window(citizen, datetime.now(UTC)):
            await self._portals.notice(event.room_id, WINDOW_NOTICE)
            return False
        return True

    # --- hold for confirmation (personal identifiers) ---------------------------------

    async def _hold(self, event: StaffEvent, payload: dict[str, Any], kinds: list[str]) -> None:
        sealed = self._cipher.encrypt_json(
            {"at": datetime.now(UTC).isoformat(), "room_id": event.room_id, "payload": payload},
            aad=AAD_PAYLOAD)
        await self._db.kv.set(HELD_KEY + event.event_id, sealed)
        await self._db.audit.append(event.sender, "message.hold", f"room {event.room_id}",
                                    "held", ", ".join(kinds))
        await self._portals.notice(event.room_id, HELD_NOTICE.format(kinds=", ".join(kinds)))

    async def _confirmation_of(self, event: StaffEvent) -> tuple[EventID, str] | None:
        """(held event id, sealed payload) if `event` confirms a held message."""
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
        sealed = await self._db.kv.get(HELD_KEY + target)
        return None if sealed is None else (EventID(target), sealed)

    async def _release(self, citizen: Citizen, event: StaffEvent, held_id: EventID,
                       sealed: str) -> None:
        held = self._cipher.decrypt_json(sealed, aad=AAD_PAYLOAD)
        if held.get("room_id") != event.room_id:
            # Event ids are not secret and staff sit in many portals: a ✅ written here
            # must not send what was written to another citizen (to theirs, or to this
            # room's). The hold stays for its own portal.
            self._count_confirmation("other_portal")
            await self._db.audit.append(event.sender, "message.release",
                                        f"room {event.room_id}", "refused",
                                        "held in another portal")
            await self._portals.notice(event.room_id, OTHER_PORTAL_NOTICE)
            return
        if datetime.now(UTC) - datetime.fromisoformat(held["at"]) > WINDOW:
            await self._db.kv.delete(HELD_KEY + held_id)
            self._count_confirmation("expired")
            await self._portals.notice(event.room_id, EXPIRED_NOTICE)
            return
        if not await self._may_send(citizen, event):
            return  # kept: it may still be confirmed once the citizen writes again
        # Queued (idempotent per held event) before the hold is forgotten: a crash in
        # between sends it once when the confirmation is processed again.
        await self._outbox.staff(citizen, event.room_id, held_id, held["payload"])
        await self._db.kv.delete(HELD_KEY + held_id)
        await self._db.audit.append(event.sender, "message.release", f"room {event.room_id}",
                                    "ok", "confirmed by staff")
        self._count_confirmation("released")
        await self._portals.notice(event.room_id, RELEASED_NOTICE)

    def _count_confirmation(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.held_confirmations.labels(outcome).inc()

    async def _wamid_of(self, event_id: Any) -> str | None:
        if not isinstance(event_id, str):
            return None
        link = await self._db.messages.by_event(event_id)  # type: ignore[arg-type]
        return link.wamid if link else None

    async def _payload(self, event: StaffEvent) -> dict[str, Any] | None:
        content = event.content
        relates = content.get("m.relates_to") or {}
        if event.type == "m.reaction":
            target = await self._wamid_of(relates.get("event_id"))
            key = relates.get("key")
            if relates.get("rel_type") != "m.annotation" or not target or not isinstance(key, str):
                return None
            return {"type": "reaction", "message_id": target, "emoji": key}
        if event.type != "m.room.message":
            return None
        if relates.get("rel_type") == "m.replace":
            await self._portals.notice(event.room_id, EDIT_NOTICE)
            return None
        reply_to = await self._wamid_of((relates.get("m.in_reply_to") or {}).get("event_id"))
        msgtype, body = content.get("msgtype"), content.get("body")
        if not isinstance(body, str):
            return None
        if msgtype in ("m.text", "m.notice", "m.emote"):
            text = strip_reply_fallback(body) if reply_to else body
            return {"type": "text", "body": re.sub(r"\s+$", "", text), "reply_to": reply_to}
        if msgtype in WHATSAPP_KIND:
            source = content.get("file") or {}
            url = source.get("url") or content.get("url")
            if not isinstance(url, str):
                return None
            info = content.get("info") or {}
            filename = content.get("filename") or body
            caption = body if content.get("filename") and body != content.get("filename") else None
            return {"type": "media", "kind": WHATSAPP_KIND[msgtype], "url": url,
                    "file": content.get("file"), "filename": filename, "caption": caption,
                    "mimetype": info.get("mimetype") or "application/octet-stream",
                    "reply_to": reply_to}
        return None
