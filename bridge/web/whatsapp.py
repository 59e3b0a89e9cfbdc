"""`GET|POST /whatsapp/webhook`: Meta's handshake and signed deliveries.

Thin: a delivery is verified, parsed and stored by bridge.webhook_ingest, and answered 200 only
once stored (401 bad signature, 400 a body refused whole, 404 WhatsApp off).
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Middleware

from bridge.web.middleware import error_middleware
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


def webhook_app(webhooks: WebhookIngest, client_max_size: int,
                *middlewares: Middleware) -> web.Application:
    """These routes alone over `webhooks`, as the public listener's thread or process
    serve them off the bridge's loop: errors as JSON, then `middlewares`. The caller
    adds what those need and freezes it."""
    app = web.Application(middlewares=[error_middleware, *middlewares],
                          client_max_size=client_max_size)
    app.add_routes(routes)
    app[WEBHOOKS] = webhooks
    return app
