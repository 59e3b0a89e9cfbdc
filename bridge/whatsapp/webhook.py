"""A signed WhatsApp webhook delivery, checked and turned into inbound queue rows.

Sans-I/O (the HTTP route is bridge.web.whatsapp, the storing bridge.ingest): a delivery
is verified (HMAC-SHA256 of the raw body, constant-time), parsed once, and split into
one queue row per message/status (deduplicated by the wamid's keyed hash, resp. that
and the status: a wamid embeds the number, so it is never a key in clear), each holding
the parsed item (bridge.whatsapp.stored), encrypted.

Dedupe keys live as long as their finished rows (bridge.retention): a message or status
sent before the replay window could no longer be recognised as a redelivery, so it is
acknowledged, counted (`civic_bridge_webhook_replays`) and never queued.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from bridge.errors import BadRequest
from bridge.jsonbody import BodyError, load_body
from bridge.privacy import AAD_PAYLOAD, Cipher, KeyedIndex
from bridge.whatsapp import stored
from bridge.whatsapp.webhook_parse import InboundMessage, WhatsAppError, parse_webhook


def signature_valid(secret: str, body: bytes, header: str | None) -> bool:
    if not header or not header.startswith("sha256="):
        return False
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, header[len("sha256="):].strip().lower())


class NotJSON(BadRequest):
    """The body is not JSON the bridge accepts (see bridge.jsonbody)."""


@dataclass(frozen=True)
class Delivery:
    """What a verified webhook body becomes: rows to store, and what was ignored."""

    rows: list[tuple[str, str, str]]  # (dedupe key, encrypted value, lane)
    ignored: tuple[str, ...]
    errors: tuple[WhatsAppError, ...]  # about the business number itself
    replays: tuple[str, ...] = ()  # "message" or "status", per item sent too long ago


def prepare_delivery(raw: bytes, phone_number_id: str, index: KeyedIndex,
                     cipher: Cipher, *, oldest: float = 0.0) -> Delivery:
    """Decode, parse and split a signed body into encrypted queue rows; items sent
    before `oldest` (Unix seconds) become `replays` instead.

    Raises NotJSON or WebhookFormatError (both 400) for a body refused as a whole;
    anything else it accepts becomes rows or `ignored` reasons, never an exception.
    Each row holds one parsed message or status (bridge.whatsapp.stored).
    """
    try:
        body = load_body(raw)
    except BodyError:
        raise NotJSON("body is not JSON") from None
    batch = parse_webhook(body, phone_number_id)
    rows, replays = [], []
    items: list[stored.Item] = [*batch.messages, *batch.statuses]
    for item in items:
        if item.timestamp.timestamp() < oldest:
            replays.append("message" if isinstance(item, InboundMessage) else "status")
            continue
        rows.append((stored.queue_key(item, index),
                     cipher.encrypt_json(stored.dump(item), aad=AAD_PAYLOAD),
                     stored.lane(item, index)))
    return Delivery(rows, batch.ignored, batch.errors, tuple(replays))
