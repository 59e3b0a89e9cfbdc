"""Matrix → WhatsApp: staff events in a portal become outbox entries.

Refused (with a notice to staff, nothing sent): the citizen has not consented or has
withdrawn; more than 24 h have passed since the citizen's last message (only approved
templates may be sent then); edits (WhatsApp cannot edit a business message).
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from bridge.db import Citizen, Database
from bridge.matrix.relay import StaffEvent
from bridge.whatsapp.outbox import WHATSAPP_KIND, Outbox
from bridge.whatsapp.portal import Portals

log = logging.getLogger(__name__)

WINDOW = timedelta(hours=24)
WINDOW_NOTICE = ("No enviado: han pasado más de 24 horas desde el último mensaje de esta "
                 "persona. WhatsApp solo permite enviar una plantilla aprobada; el mensaje se "
                 "podrá enviar cuando vuelva a escribir.")
NO_CONSENT_NOTICE = "No enviado: esta persona no tiene activo el reenvío por WhatsApp."
EDIT_NOTICE = "Las ediciones no se envían a WhatsApp; envíe un mensaje nuevo si es necesario."


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


class StaffToWhatsApp:
    """A `Relay` handler: called with every decrypted staff event."""

    def __init__(self, db: Database, portals: Portals, outbox: Outbox) -> None:
        self._db = db
        self._portals = portals
        self._outbox = outbox

    async def __call__(self, event: StaffEvent) -> None:
        room = await self._db.rooms.get(event.room_id)
        if room is None or room.kind != "portal" or room.citizen_id is None:
            return
        citizen = await self._db.citizens.get(room.citizen_id)
        if citizen is None:
            return
        payload = await self._payload(event)
        if payload is None:
            return
        if citizen.consent_state != "granted":
            await self._portals.notice(event.room_id, NO_CONSENT_NOTICE)
            return
        if not within_window(citizen, datetime.now(UTC)):
            await self._portals.notice(event.room_id, WINDOW_NOTICE)
            return
        await self._outbox.staff(citizen, event.room_id, event.event_id, payload)

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
