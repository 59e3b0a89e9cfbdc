"""The aiohttp application: routes from each layer plus the bridge's lifecycle."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from bridge.admin.auth import admin_auth
from bridge.admin.routes import routes as admin_routes
from bridge.config import Config
from bridge.invites.routes import routes as invite_routes
from bridge.matrix.appservice import routes as appservice_routes
from bridge.rooms_wa.routes import routes as wa_rooms_routes
from bridge.services import Bridge, build_bridge
from bridge.web.middleware import error_middleware
from bridge.web.ops import routes as ops_routes
from bridge.web.standby import active_only
from bridge.web.state import BRIDGE
from bridge.whatsapp.webhook import routes as whatsapp_routes

MAX_BODY = 16 * 1024 * 1024  # appservice transactions can be large; media never passes here


def make_app(config: Config, bridge: Bridge | None = None) -> web.Application:
    """The web app; builds (and later closes) the Bridge unless one is given."""
    app = web.Application(middlewares=[error_middleware, active_only, admin_auth],
                          client_max_size=MAX_BODY)
    app.add_routes(appservice_routes)
    app.add_routes(admin_routes)
    app.add_routes(wa_rooms_routes)
    app.add_routes(invite_routes)
    app.add_routes(whatsapp_routes)
    app.add_routes(ops_routes)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        b = bridge or await build_bridge(config)
        app[BRIDGE] = b
        b.spawn(b.lead())  # start() once elected (bridge.leader); a standby waits
        yield
        await b.close()

    app.cleanup_ctx.append(lifecycle)
    return app
