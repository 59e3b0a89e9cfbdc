"""`GET|POST /whatsapp/webhook`: Meta's handshake and signed deliveries.

A delivery is verified (HMAC-SHA256 of the raw body, constant-time), split into one
queue row per message/status (deduplicated by wamid, resp. wamid+status), stored
encrypted, and only then acknowledged; the inbound worker does the rest.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from bridge.errors import BadRequest, Forbidden, NotFound, Unauthorized
from bridge.privacy import AAD_PAYLOAD
from bridge.web.state import BRIDGE
from bridge.whatsapp.webhook_parse import lane_of, parse_webhook

if TYPE_CHECKING:
    from bridge.services import Bridge

log = logging.getLogger(__name__)
routes = web.RouteTableDef()


def signature_valid(secret: str, body: bytes, header: str | None) -> bool:
    if not header or not header.startswith("sha256="):
        return False
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, header[len("sha256="):].strip().lower())


def split_delivery(body: dict[str, Any], phone_number_id: str) -> list[tuple[str, dict[str, Any]]]:
    """(dedupe key, single-item value) for every message and status of a delivery.

    Each stored value keeps its `metadata` and `contacts`, so it re-parses on its own.
    """
    items: list[tuple[str, dict[str, Any]]] = []
    for entry in body.get("entry", []):
        for change in entry.get("changes", []) if isinstance(entry, dict) else []:
            value = change.get("value") if isinstance(change, dict) else None
            if not isinstance(value, dict) or change.get("field") != "messages":
                continue
            if (value.get("metadata") or {}).get("phone_number_id") != phone_number_id:
                continue
            base = {k: v for k, v in value.items() if k not in ("messages", "statuses")}
            for msg in value.get("messages") or []:
                if isinstance(msg, dict) and isinstance(msg.get("id"), str):
                    items.append((f"msg:{msg['id']}", {**base, "messages": [msg]}))
            for st in value.get("statuses") or []:
                if isinstance(st, dict) and isinstance(st.get("id"), str):
                    key = f"status:{st['id']}:{st.get('status')}"
                    items.append((key, {**base, "statuses": [st]}))
    return items


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
        body = json.loads(raw)
        batch = parse_webhook(body, cfg.phone_number_id)
    except (ValueError, UnicodeDecodeError):
        bridge.metrics.webhook_rejects.labels("json").inc()
        raise BadRequest("body is not JSON") from None
    except BadRequest:
        bridge.metrics.webhook_rejects.labels("format").inc()
        raise
    for reason in batch.ignored:
        log.info("webhook: ignored %s", reason)
    for error in batch.errors:
        # About the business number, not a citizen's message: there is no portal to
        # tell, so operators learn it from the log and the metric.
        log.warning("webhook: WhatsApp reports an error for this number (code %s)", error.code)
        bridge.metrics.inbound_not_relayed.labels("account_error").inc()
    cipher = bridge.privacy.cipher
    lanes = set()
    for key, value in split_delivery(body, cfg.phone_number_id):
        payload = cipher.encrypt_json(value, aad=AAD_PAYLOAD)
        lane = lane_of(value, bridge.privacy.index)
        with bridge.db.urgent():
            if await bridge.db.inbound.enqueue("whatsapp", key, payload,
                                               lane=lane) is not None:
                lanes.add(lane)
    if lanes:
        bridge.worker.wake("whatsapp", *lanes)
    return web.json_response({})
