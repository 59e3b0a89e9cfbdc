"""`GET|POST /whatsapp/webhook`: Meta's handshake and signed deliveries.

Thin: a delivery is verified, parsed and stored by bridge.webhook_ingest, and answered 200 only
once stored (401 bad signature, 400 a body refused whole, 404 WhatsApp off).
"""

from __future__ import annotations

from aiohttp import web

from bridge.webhook_ingest import WebhookIngest

routes = web.RouteTableDef()
# Here, not in bridge.web.state, so the ingest process serves these routes without
# importing the rest of the bridge (bridge.web.ingest_child).
WEBHOOKS = web.AppKey("civic_bridge_webhooks", WebhookIngest)
WEBHOOK_PATH = "/whatsapp/webhook"  # stored off the bridge's loop (bridge.web.ingest_*)


@routes.get(WEBHOOK_PATH)
async def handshake(request: web.Request) -> web.Response:
    q = request.query
    challenge = request.config_dict[WEBHOOKS].handshake(
        q.get("hub.mode"), q.get("hub.verify_token", ""), q.get("hub.challenge", ""))
    return web.Response(text=challenge)


@routes.post(WEBHOOK_PATH)
async def deliver(request: web.Request) -> web.Response:
    await request.config_dict[WEBHOOKS].whatsapp(
        await request.read(), request.headers.get("X-Hub-Signature-256"))
    return web.json_response({})
