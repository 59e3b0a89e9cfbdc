"""WhatsApp → Matrix: one inbound message becomes an event from the citizen's ghost.

Media is streamed from Graph into one buffer (capped per type, sha256-checked),
encrypted in place as a Matrix attachment and uploaded; replies, reactions, edits and
revokes are mapped through `message_map`. Types Matrix has no event for (contact
cards, orders, Flow answers, list rows) arrive as readable text, a card also as a
`.vcf`. What cannot be shown (too large, unsupported, an error from WhatsApp) becomes
a notice to staff saying why and what to do, counted by reason.
Transaction ids are derived from the wamid, so a retry after a crash returns the
events the homeserver already stored instead of duplicates.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

from bridge.db import Citizen, Database, outcome
from bridge.matrix.api import MatrixAPI
from bridge.matrix.attachments import encrypt_in_place
from bridge.matrix.relay import Relay
from bridge.metrics import Metrics
from bridge.privacy import KeyedIndex, Privacy, looks_like_personal_id
from bridge.texts.matrix import default as summaries
from bridge.types import EventID, RoomID, UserID
from bridge.whatsapp.graph import (
    GraphClient,
    GraphError,
    MediaIntegrityError,
    MediaTooLarge,
)
from bridge.whatsapp.limits import media_limit
from bridge.whatsapp.portal import Portals
from bridge.whatsapp.vcard import MIME_TYPE as VCARD_MIME
from bridge.whatsapp.vcard import to_vcf
from bridge.whatsapp.webhook_parse import InboundMessage

# (room, event the ghost posted, the ghost, what the citizen wrote)
FlagHook = Callable[[RoomID, EventID, UserID, str], Awaitable[None]]

log = logging.getLogger(__name__)
# What `post_as` collects for its caller (None: nothing; the ordinary portal relay).
_POSTED: ContextVar[list[tuple[str, dict[str, Any]]] | None] = ContextVar("posted",
                                                                          default=None)
# Where `post_as` finds the event a reply, edit, revoke or reaction is about (None: the
# portal's message map).
EventLookup = Callable[[str], Awaitable[EventID | None]]
_EVENTS: ContextVar[EventLookup | None] = ContextVar("events", default=None)

MATRIX_MSGTYPE = {"image": "m.image", "sticker": "m.image", "video": "m.video",
                  "audio": "m.audio", "document": "m.file"}
DEFAULT_NAMES = summaries.MEDIA_DEFAULT_NAMES
PERSONAL_ID_WARNING = summaries.PERSONAL_ID_WARNING


def txn_id(index: KeyedIndex, wamid: str, suffix: str = "") -> str:
    """The Matrix transaction id of an event from WhatsApp message `wamid` (keyed: see
    KeyedIndex.txn)."""
    return "wa" + index.txn(wamid, suffix)[:40]


def text_content(body: str, reply_to: EventID | None = None) -> dict[str, Any]:
    content: dict[str, Any] = {"msgtype": "m.text", "body": body}
    if reply_to:
        content["m.relates_to"] = {"m.in_reply_to": {"event_id": reply_to}}
    return content


def readable_text(msg: InboundMessage) -> str | None:
    """The text staff read for a message that is text to Matrix (None: it is not)."""
    if msg.kind == "text":
        return msg.text or ""
    if msg.kind == "button":
        return summaries.choice_text(msg.button_title, msg.button_description)
    if msg.kind == "flow" and msg.flow is not None:
        return summaries.flow_summary(msg.flow)
    if msg.kind == "order" and msg.order is not None:
        return summaries.order_summary(msg.order)
    return None


def location_content(msg: InboundMessage) -> dict[str, Any]:
    loc = msg.location
    assert loc is not None
    label = ", ".join(p for p in (loc.name, loc.address) if p) or summaries.LOCATION_LABEL
    body = f"{label} ({loc.latitude}, {loc.longitude})" + (f" {loc.url}" if loc.url else "")
    return {"msgtype": "m.location", "body": body,
            "geo_uri": f"geo:{loc.latitude},{loc.longitude}"}


def edit_content(original: EventID, new_text: str) -> dict[str, Any]:
    return {"msgtype": "m.text", "body": f"* {new_text}",
            "m.new_content": {"msgtype": "m.text", "body": new_text},
            "m.relates_to": {"rel_type": "m.replace", "event_id": original}}


def safe_type_name(raw_type: str) -> str:
    """Only a short [a-z_] type name from the payload ever reaches staff."""
    return raw_type if re.fullmatch(r"[a-z_]{1,30}", raw_type) else summaries.UNKNOWN_TYPE


class Mirror:
    def __init__(self, db: Database, privacy: Privacy, api: MatrixAPI, relay: Relay,
                 graph: GraphClient, portals: Portals, metrics: Metrics) -> None:
        self._db = db
        self._privacy = privacy
        self._api = api
        self._relay = relay
        self._graph = graph
        self._portals = portals
        self._metrics = metrics

    _flag_hook: FlagHook | None = None

    async def _event_for(self, wamid: str | None) -> EventID | None:
        if wamid and (lookup := _EVENTS.get()) is not None:
            return await lookup(wamid)
        link = await self._db.messages.by_wamid(self._privacy.index.wamid(wamid)) \
            if wamid else None
        return EventID(link.event_id) if link else None

    def _txn(self, wamid: str, suffix: str = "") -> str:
        return txn_id(self._privacy.index, wamid, suffix)

    def set_flag_hook(self, hook: FlagHook) -> None:
        """Moderation's flagging (bridge.moderation.intake.Flagger.check) of what
        citizens write: their ghosts' echoes are not read back by the relay."""
        self._flag_hook = hook

    async def relay(self, citizen: Citizen, room_id: RoomID, msg: InboundMessage) -> None:
        ghost = citizen.ghost_user_id
        assert ghost is not None
        with self._metrics.relay_latency.labels("in").time():
            event_id = await self._relay_one(ghost, room_id, msg)
        if event_id:
            sealed = self._privacy.seal_wamid(msg.wamid)
            # Recorded with the item's outcome (bridge.db.outcome): a lane relays its
            # next message only then, so a reply to this one finds it.
            await outcome.with_outcome(self._db, lambda tx: tx.messages.link(
                sealed, room_id, event_id, "in"))
            self._metrics.relayed.labels("in", msg.kind).inc()
            written = readable_text(msg) or msg.caption
            if self._flag_hook is not None and written:
                await self._flag_hook(room_id, event_id, ghost, written)
        if msg.referral is not None:
            await self._portals.notice(room_id, summaries.referral_notice(msg.referral),
                                       txn_id=self._txn(msg.wamid, ":referral"))
        if msg.referred_product is not None:
            await self._portals.notice(room_id, summaries.product_notice(msg.referred_product),
                                       txn_id=self._txn(msg.wamid, ":product"))
        kinds = looks_like_personal_id(readable_text(msg) or msg.caption or "")
        if kinds:
            await self._portals.notice(room_id, PERSONAL_ID_WARNING.format(kinds=", ".join(kinds)),
                                       txn_id=self._txn(msg.wamid, ":personal-id"))

    async def post_as(self, ghost: UserID, room_id: RoomID, msg: InboundMessage,
                      posted: list[tuple[str, dict[str, Any]]] | None = None,
                      events: EventLookup | None = None) -> EventID | None:
        """Post `msg` as `ghost` in `room_id` without linking it in the message map: a
        WhatsApp member's message in an agency room (bridge.rooms_wa keeps its own map,
        `events`, where replies, edits, revokes and reactions find their event; and
        relays to the room's other members what `posted` collects: the (event type,
        content) of each event sent)."""
        token, lookup = _POSTED.set(posted), _EVENTS.set(events)
        try:
            with self._metrics.relay_latency.labels("in").time():
                return await self._relay_one(ghost, room_id, msg)
        finally:
            _POSTED.reset(token)
            _EVENTS.reset(lookup)

    async def _send(self, ghost: UserID, room_id: RoomID, content: dict[str, Any],
                    wamid: str, event_type: str = "m.room.message", suffix: str = ""
                    ) -> EventID:
        if (posted := _POSTED.get()) is not None:
            posted.append((event_type, content))
        return await self._relay.send_as(ghost, room_id, content, event_type,
                                         self._txn(wamid, suffix))

    async def _not_relayed(self, room_id: RoomID, msg: InboundMessage, reason: str,
                           text: str) -> None:
        """Staff are told what arrived and what to do; the metric counts it by reason."""
        await self._portals.notice(room_id, text, txn_id=self._txn(msg.wamid, ":notice"))
        self._metrics.inbound_not_relayed.labels(reason).inc()

    async def _relay_one(self, ghost: UserID, room_id: RoomID,
                         msg: InboundMessage) -> EventID | None:
        reply_to = await self._event_for(msg.context_id)
        kind = msg.kind
        if (text := readable_text(msg)) is not None:
            return await self._send(ghost, room_id, text_content(text, reply_to), msg.wamid)
        if kind == "contacts":
            return await self._contacts(ghost, room_id, msg, reply_to)
        if kind in MATRIX_MSGTYPE:
            return await self._media_or_notice(ghost, room_id, msg, reply_to)
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
                await self._api.redact(ghost, room_id, original, self._txn(msg.wamid),
                                       "deleted on WhatsApp")
            return None
        if kind == "system":  # identity changes are handled before relay; others land here
            await self._portals.notice(room_id, summaries.identity_notice(
                msg.system.type if msg.system else ""), txn_id=self._txn(msg.wamid, ":notice"))
            return None
        codes = [e.code for e in msg.errors if e.code is not None and e.code != 131051]
        if codes:
            await self._not_relayed(room_id, msg, "whatsapp_error",
                                    summaries.error_notice(codes[0]))
        else:
            shown = msg.unsupported_type if msg.raw_type == "unsupported" else msg.raw_type
            name = safe_type_name(shown) if shown else None
            await self._not_relayed(room_id, msg, "unsupported",
                                    summaries.unsupported_notice(name))
        return None

    async def _contacts(self, ghost: UserID, room_id: RoomID, msg: InboundMessage,
                        reply_to: EventID | None) -> EventID:
        """A readable summary, then the cards themselves as one encrypted `.vcf`."""
        summary = await self._send(ghost, room_id, text_content(
            summaries.contacts_summary(msg.contacts), reply_to), msg.wamid)
        data = bytearray(to_vcf(msg.contacts))
        size = len(data)
        keys = encrypt_in_place(data)
        filename = "contacto.vcf" if len(msg.contacts) == 1 else "contactos.vcf"
        mxc = await self._api.upload(ghost, data, filename)
        await self._send(ghost, room_id, {
            "msgtype": "m.file", "body": filename, "filename": filename,
            "file": {**keys, "url": mxc, "mimetype": VCARD_MIME},
            "info": {"mimetype": VCARD_MIME, "size": size}}, msg.wamid, suffix=":vcf")
        return summary

    async def _media_or_notice(self, ghost: UserID, room_id: RoomID, msg: InboundMessage,
                               reply_to: EventID | None) -> EventID | None:
        """The attachment, or a notice saying why it is not here (the caption, if any,
        still arrives as text: nothing the citizen wrote is dropped)."""
        try:
            return await self._send(ghost, room_id, await self._media(ghost, msg, reply_to),
                                    msg.wamid)
        except MediaTooLarge as exc:
            await self._not_relayed(room_id, msg, "media_too_large", summaries.too_large_notice(
                msg.kind, exc.size, exc.limit))
        except GraphError as exc:
            if exc.retryable:
                raise  # the worker tries again later
            reason = (summaries.MEDIA_FAILED_INTEGRITY
                      if isinstance(exc, MediaIntegrityError)
                      else summaries.MEDIA_FAILED_CODE.format(code=exc.code) if exc.code
                      else summaries.MEDIA_FAILED)
            await self._not_relayed(room_id, msg, "media_failed",
                                    summaries.media_failed_notice(msg.kind, reason))
        if msg.caption:
            return await self._send(ghost, room_id, text_content(msg.caption, reply_to),
                                    msg.wamid, suffix=":caption")
        return None

    async def _media(self, ghost: UserID, msg: InboundMessage,
                     reply_to: EventID | None) -> dict[str, Any]:
        media = msg.media
        assert media is not None
        downloaded = await self._graph.fetch_media(
            media.id, max_bytes=media_limit(msg.kind, media.animated))
        # Graph's lookup hash was checked on download; the webhook's claim must match too.
        if media.sha256 and not downloaded.matches(media.sha256):
            raise MediaIntegrityError("media does not match the webhook's sha256")
        data = downloaded.data
        size = len(data)
        keys = encrypt_in_place(data)  # the one buffer now holds the ciphertext
        filename = media.filename or DEFAULT_NAMES[msg.kind]
        mxc = await self._api.upload(ghost, data, filename)
        mime = downloaded.mime_type or media.mime_type
        content: dict[str, Any] = {
            "msgtype": MATRIX_MSGTYPE[msg.kind],
            "body": msg.caption or filename,
            "file": {**keys, "url": mxc, "mimetype": mime},
            "info": {"mimetype": mime, "size": size},
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
            if reaction.removed:
                return None  # nothing here to take back
            # E.g. a reaction to the privacy notice, which is not in the room.
            return await self._send(ghost, room_id, text_content(
                summaries.reaction_to_unknown(reaction.emoji)), msg.wamid)
        if reaction.removed:
            previous = await self._db.reactions.get(ghost, target)
            if previous is not None:  # forgotten once redacted: a failed redaction retries
                await self._api.redact(ghost, room_id, previous, self._txn(msg.wamid))
                await self._db.reactions.delete(ghost, target)
            return None
        event_id = await self._send(ghost, room_id, {"m.relates_to": {
            "rel_type": "m.annotation", "event_id": target, "key": reaction.emoji}},
            msg.wamid, event_type="m.reaction")
        await self._db.reactions.set(ghost, target, event_id)
        return event_id
