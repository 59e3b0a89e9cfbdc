"""WhatsApp → Matrix: one inbound message becomes one event from the citizen's ghost.

Media is downloaded from Graph (sha256-checked), encrypted as a Matrix attachment and
uploaded; replies, reactions, edits and revokes are mapped through `message_map`.
The transaction id is derived from the wamid, so a retry after a crash returns the
event the homeserver already stored instead of a duplicate.
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import Any

from nio.crypto.attachments import encrypt_attachment

from bridge.db import Citizen, Database
from bridge.matrix.api import MatrixAPI
from bridge.matrix.relay import Relay
from bridge.metrics import Metrics
from bridge.privacy import looks_like_personal_id
from bridge.types import EventID, RoomID, UserID
from bridge.whatsapp.graph import GraphClient, MediaIntegrityError, digest_matches
from bridge.whatsapp.portal import Portals
from bridge.whatsapp.webhook_parse import InboundMessage

log = logging.getLogger(__name__)

MATRIX_MSGTYPE = {"image": "m.image", "sticker": "m.image", "video": "m.video",
                  "audio": "m.audio", "document": "m.file"}
DEFAULT_NAMES = {"image": "imagen", "sticker": "sticker", "video": "vídeo", "audio": "audio",
                 "document": "documento"}
PERSONAL_ID_WARNING = (
    "Atención: este mensaje parece contener datos personales sensibles ({kinds}). "
    "No los copie fuera de esta sala; recuerde a la persona que no es necesario enviarlos "
    "por este canal.")


def txn_id(wamid: str, suffix: str = "") -> str:
    return "wa" + hashlib.sha256((wamid + suffix).encode()).hexdigest()[:40]


def text_content(body: str, reply_to: EventID | None = None) -> dict[str, Any]:
    content: dict[str, Any] = {"msgtype": "m.text", "body": body}
    if reply_to:
        content["m.relates_to"] = {"m.in_reply_to": {"event_id": reply_to}}
    return content


def location_content(msg: InboundMessage) -> dict[str, Any]:
    loc = msg.location
    assert loc is not None
    label = ", ".join(p for p in (loc.name, loc.address) if p) or "Ubicación"
    return {"msgtype": "m.location", "body": f"{label} ({loc.latitude}, {loc.longitude})",
            "geo_uri": f"geo:{loc.latitude},{loc.longitude}"}


def edit_content(original: EventID, new_text: str) -> dict[str, Any]:
    return {"msgtype": "m.text", "body": f"* {new_text}",
            "m.new_content": {"msgtype": "m.text", "body": new_text},
            "m.relates_to": {"rel_type": "m.replace", "event_id": original}}


def safe_type_name(raw_type: str) -> str:
    """Only a short [a-z_] type name from the payload ever reaches staff."""
    return raw_type if re.fullmatch(r"[a-z_]{1,30}", raw_type) else "desconocido"


class Mirror:
    def __init__(self, db: Database, api: MatrixAPI, relay: Relay, graph: GraphClient,
                 portals: Portals, metrics: Metrics) -> None:
        self._db = db
        self._api = api
        self._relay = relay
        self._graph = graph
        self._portals = portals
        self._metrics = metrics

    async def _event_for(self, wamid: str | None) -> EventID | None:
        link = await self._db.messages.by_wamid(wamid) if wamid else None
        return EventID(link.event_id) if link else None

    async def relay(self, citizen: Citizen, room_id: RoomID, msg: InboundMessage) -> None:
        ghost = citizen.ghost_user_id
        assert ghost is not None
        with self._metrics.relay_latency.labels("in").time():
            event_id = await self._relay_one(ghost, room_id, msg)
        if event_id:
            await self._db.messages.link(msg.wamid, room_id, event_id, "in")
            self._metrics.relayed.labels("in", msg.kind).inc()
        kinds = looks_like_personal_id(msg.text or msg.caption or "")
        if kinds:
            await self._portals.notice(room_id, PERSONAL_ID_WARNING.format(kinds=", ".join(kinds)))

    async def _send(self, ghost: UserID, room_id: RoomID, content: dict[str, Any],
                    wamid: str, event_type: str = "m.room.message") -> EventID:
        return await self._relay.send_as(ghost, room_id, content, event_type, txn_id(wamid))

    async def _relay_one(self, ghost: UserID, room_id: RoomID,
                         msg: InboundMessage) -> EventID | None:
        reply_to = await self._event_for(msg.context_id)
        kind = msg.kind
        if kind == "text" or kind == "button":
            body = msg.text if kind == "text" else msg.button_title
            return await self._send(ghost, room_id, text_content(body or "", reply_to), msg.wamid)
        if kind in MATRIX_MSGTYPE:
            return await self._send(ghost, room_id, await self._media(ghost, msg, reply_to),
                                    msg.wamid)
        if kind == "location":
            return await self._send(ghost, room_id, location_content(msg), msg.wamid)
        if kind == "reaction":
            return await self._reaction(ghost, room_id, msg)
        if kind == "edit" and msg.edit:
            original = await self._event_for(msg.edit.original_message_id)
            new_text = msg.edit.text or msg.edit.caption or ""
            if original:
                return await self._send(ghost, room_id, edit_content(original, new_text),
                                        msg.wamid)
            return await self._send(ghost, room_id, text_content(new_text), msg.wamid)
        if kind == "revoke":
            original = await self._event_for(msg.revoke_of)
            if original:
                await self._api.redact(ghost, room_id, original, txn_id(msg.wamid),
                                       "deleted on WhatsApp")
            return None
        if kind == "system":
            await self._portals.notice(room_id, "WhatsApp informa de que esta persona ha "
                                                "cambiado de número o de identidad.")
            return None
        name = safe_type_name(msg.raw_type)
        return await self._send(ghost, room_id, {
            "msgtype": "m.notice",
            "body": f"[Mensaje de WhatsApp de un tipo no compatible: {name}]"}, msg.wamid)

    async def _media(self, ghost: UserID, msg: InboundMessage,
                     reply_to: EventID | None) -> dict[str, Any]:
        media = msg.media
        assert media is not None
        data, mime = await self._graph.download_media(media.id)
        # Graph's lookup hash was checked on download; the webhook's claim must match too.
        if media.sha256 and not digest_matches(data, media.sha256):
            raise MediaIntegrityError("media does not match the webhook's sha256")
        ciphertext, keys = encrypt_attachment(data)
        filename = media.filename or DEFAULT_NAMES[msg.kind]
        mxc = await self._api.upload(ghost, ciphertext, filename)
        content: dict[str, Any] = {
            "msgtype": MATRIX_MSGTYPE[msg.kind],
            "body": msg.caption or filename,
            "file": {**keys, "url": mxc, "mimetype": mime or media.mime_type},
            "info": {"mimetype": mime or media.mime_type, "size": len(data)},
        }
        if media.filename:
            content["filename"] = media.filename
        if reply_to:
            content["m.relates_to"] = {"m.in_reply_to": {"event_id": reply_to}}
        return content

    async def _reaction(self, ghost: UserID, room_id: RoomID,
                        msg: InboundMessage) -> EventID | None:
        reaction = msg.reaction
        assert reaction is not None
        target = await self._event_for(reaction.message_id)
        if target is None:
            return None
        key = f"reaction:{ghost}:{target}"
        if reaction.removed:
            previous = await self._db.kv.get(key)
            if previous:
                await self._api.redact(ghost, room_id, previous, txn_id(msg.wamid))
                await self._db.kv.delete(key)
            return None
        event_id = await self._send(ghost, room_id, {"m.relates_to": {
            "rel_type": "m.annotation", "event_id": target, "key": reaction.emoji}},
            msg.wamid, event_type="m.reaction")
        await self._db.kv.set(key, event_id)
        return event_id
