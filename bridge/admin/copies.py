"""The copies of a citizen's messages the bridge still holds, decrypted for their own
export (GDPR arts. 15, 20): messages held before consent, webhook items queued or
recently processed, sends to them in the outbox, and agency-room messages waiting for
their 24 h window to open again (bridge.rooms_wa).

Only the citizen's export shows them: they carry what the person wrote, their WhatsApp
profile name and number. A copy that no longer decrypts (a retired key) is listed as
unreadable rather than failing the whole export.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from bridge.db import Citizen, Database
from bridge.privacy import AAD_PAYLOAD, Cipher
from bridge.whatsapp.webhook_parse import citizen_lane, status_lane


def _time(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _open(cipher: Cipher, payload: str) -> Any:
    try:
        return cipher.decrypt_json(payload, aad=AAD_PAYLOAD)
    except Exception:  # the kind is enough: the export still holds everything else
        return {"unreadable": "this copy no longer decrypts with the bridge's keys"}


async def copies(db: Database, cipher: Cipher, citizen: Citizen) -> dict[str, Any]:
    """`held_messages`, `queued_items`, `outbox_items` and `room_backlog` of the
    citizen, oldest first."""
    lanes = {citizen_lane(citizen.index_hash): "message",
             status_lane(citizen.index_hash): "delivery status"}
    held, queued = [], []
    for item in await db.inbound.of_citizen(citizen.id, list(lanes)):
        if item.status == "held":
            held.append({"received_at": _time(item.created_at),
                         "deleted_by": _time(item.hold_until),
                         "webhook": _open(cipher, item.payload)})
        else:
            queued.append({"kind": lanes.get(item.lane, "message"), "status": item.status,
                           "received_at": _time(item.created_at),
                           "processed_at": _time(item.processed_at),
                           "webhook": _open(cipher, item.payload)})
    outbox = [{"status": o.status, "queued_at": _time(o.created_at),
               "updated_at": _time(o.updated_at), "message": _open(cipher, o.payload)}
              for o in await db.outbox.for_citizen(citizen.id)]
    backlog = [{"room_id": b.room_id, "kept_at": _time(b.created_at),
                "message": _open(cipher, b.payload)}
               for b in await db.wa_rooms.backlog(citizen.id)]
    return {"held_messages": held, "queued_items": queued, "outbox_items": outbox,
            "room_backlog": backlog}
