"""`GET|POST /whatsapp/webhook`: Meta's handshake and signed deliveries.

A delivery is verified (HMAC-SHA256 of the raw body, constant-time), split into one
queue row per message/status (deduplicated by the wamid's keyed hash, resp. that and
the status: a wamid embeds the number, so it is never a key in clear), stored
encrypted, and only then acknowledged; the inbound worker does the rest.

Dedupe keys live as long as their finished rows (bridge.retention): a message or status
sent before the replay window could no longer be recognised as a redelivery, so it is
acknowledged, counted (`civic_bridge_webhook_replays`) and never queued.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from bridge.errors import BadRequest, Forbidden, NotFound, Unauthorized
from bridge.jsonbody import BodyError, load_body
from bridge.privacy import AAD_PAYLOAD, Cipher, KeyedIndex
from bridge.retention import REPLAY_WINDOW
from bridge.web.state import BRIDGE
from bridge.whatsapp.webhook_parse import WhatsAppError, dedupe_key, lane_of, parse_webhook

if TYPE_CHECKING:
    from bridge.services import Bridge

log = logging.getLogger(__name__)
routes = web.RouteTableDef()


def signature_valid(secret: str, body: bytes, header: str | None) -> bool:
    if not header or not header.startswith("sha256="):
        return False
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, header[len("sha256="):].strip().lower())


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _items(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def split_delivery(body: dict[str, Any], phone_number_id: str, index: KeyedIndex
                   ) -> list[tuple[str, dict[str, Any]]]:
    """(dedupe key, single-item value) for every message and status of a delivery; the
    key names the wamid by its keyed hash (`dedupe_key`).

    Each stored value keeps its `metadata` and `contacts`, so it re-parses on its own.
    It reads the body with the parser's leniency (a part of the wrong type counts as
    absent), so whatever the parser accepts splits without an exception.
    """
    items: list[tuple[str, dict[str, Any]]] = []
    for entry in _items(body.get("entry")):
        for change in _items(_obj(entry).get("changes")):
            value = _obj(change).get("value")
            if not isinstance(value, dict) or _obj(change).get("field") != "messages":
                continue
            if _obj(value.get("metadata")).get("phone_number_id") != phone_number_id:
                continue
            base = {k: v for k, v in value.items() if k not in ("messages", "statuses")}
            for msg in _items(value.get("messages")):
                if isinstance(msg, dict) and isinstance(msg.get("id"), str):
                    items.append((dedupe_key(index, msg["id"]), {**base, "messages": [msg]}))
            for st in _items(value.get("statuses")):
                if isinstance(st, dict) and isinstance(st.get("id"), str):
                    key = dedupe_key(index, st["id"], str(st.get("status")))
                    items.append((key, {**base, "statuses": [st]}))
    return items


_UNIX_TIME = re.compile(r"[0-9]{1,12}")


def sent_at(value: dict[str, Any]) -> int | None:
    """When the message or status of a split item was sent (Unix seconds), if it says."""
    for part in ("messages", "statuses"):
        for item in _items(value.get(part)):
            stamp = _obj(item).get("timestamp")
            if isinstance(stamp, str) and _UNIX_TIME.fullmatch(stamp):
                return int(stamp)
            if isinstance(stamp, int) and not isinstance(stamp, bool) and stamp >= 0:
                return stamp
    return None


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
    """
    try:
        body = load_body(raw)
    except BodyError:
        raise NotJSON("body is not JSON") from None
    batch = parse_webhook(body, phone_number_id)
    rows, replays = [], []
    for key, value in split_delivery(body, phone_number_id, index):
        sent = sent_at(value)
        if sent is not None and sent < oldest:
            replays.append("message" if key.startswith("msg:") else "status")
            continue
        rows.append((key, cipher.encrypt_json(value, aad=AAD_PAYLOAD), lane_of(value, index)))
    return Delivery(rows, batch.ignored, batch.errors, tuple(replays))


@routes.get("/whatsapp/webhook")
async def handshake(request: web.Request) -> web.Response:
    cfg = request.app[BRIDGE].config.whatsapp
    if not cfg.enabled:
        raise NotFound("WhatsApp is not enabled")
    q = request.query
    token = q.get("hub.verify_token", "")
    if q.get("hub.mode") != "subscribe" or not hmac.compare_digest(
            token.encode(), cfg.verify_token.encode()):
        raise Forbidden("verification failed")
    return web.Response(text=q.get("hub.challenge", ""))


@routes.post("/whatsapp/webhook")
async def deliver(request: web.Request) -> web.Response:
    bridge = request.app[BRIDGE]
    with bridge.metrics.webhook_latency.time():
        return await _verify_and_store(request, bridge)


async def _verify_and_store(request: web.Request, bridge: Bridge) -> web.Response:
    cfg = bridge.config.whatsapp
    if not cfg.enabled:
        raise NotFound("WhatsApp is not enabled")
    raw = await request.read()
    if not signature_valid(cfg.app_secret, raw, request.headers.get("X-Hub-Signature-256")):
        bridge.metrics.webhook_rejects.labels("signature").inc()
        raise Unauthorized("missing or invalid X-Hub-Signature-256")
    try:
        delivery = prepare_delivery(raw, cfg.phone_number_id, bridge.privacy.index,
                                    bridge.privacy.cipher,
                                    oldest=time.time() - REPLAY_WINDOW.total_seconds())
    except NotJSON:
        bridge.metrics.webhook_rejects.labels("json").inc()
        raise
    except BadRequest:
        bridge.metrics.webhook_rejects.labels("format").inc()
        raise
    for reason in delivery.ignored:
        log.info("webhook: ignored %s", reason)
    for error in delivery.errors:
        # About the business number, not a citizen's message: there is no portal to
        # tell, so operators learn it from the log and the metric.
        log.warning("webhook: WhatsApp reports an error for this number (code %s)", error.code)
        bridge.metrics.inbound_not_relayed.labels("account_error").inc()
    if delivery.ignored:
        bridge.metrics.ignored_parts.labels("whatsapp").inc(len(delivery.ignored))
    for part in delivery.replays:
        # Its dedupe key may be purged already: handling it could relay it twice.
        log.info("webhook: ignored a %s sent before the replay window", part)
        bridge.metrics.webhook_replays.labels(part).inc()
    lanes = set()
    for key, payload, lane in delivery.rows:
        with bridge.db.urgent():
            if await bridge.db.inbound.enqueue("whatsapp", key, payload,
                                               lane=lane) is not None:
                lanes.add(lane)
    if lanes:
        bridge.worker.wake("whatsapp", *lanes)
    return web.json_response({})
