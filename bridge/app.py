"""The aiohttp applications, one per listener, and the bridge's lifecycle around them.

An entry point: it wires the HTTP edge (bridge.web, whose handlers read the views of
bridge.web.state) to the parts the composition root builds (bridge.services).

- public (`appservice.listen_host/port`): the appservice API Synapse calls, the WhatsApp
  webhook, invite pages and their stylesheet;
- admin (`admin.listen_host/port`, loopback by default): `/admin/v1/*`, a sub-app behind
  its token check (bridge.web.admin);
- metrics (`metrics.listen_host/port`, loopback by default, only if enabled): `/metrics`.

Each also answers `/health` and `/ready`, so probes can use whichever they reach. A path
is routed on its own listener only: the public app has no admin or metrics route at all.
The public app builds (and closes) the Bridge; the others share it, so they start after
it and stop before it (`Listeners` does both).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from bridge.config import Config
from bridge.db.engine import is_private
from bridge.leader import Election
from bridge.services import Bridge, build_bridge
from bridge.web import rooms_wa  # also adds its verbs to the admin sub-app's routes
from bridge.web.admin import PREFIX as ADMIN_PREFIX
from bridge.web.admin import admin_app
from bridge.web.appservice import routes as appservice_routes
from bridge.web.ingest_process import IngestProcess
from bridge.web.ingest_thread import IngestThread
from bridge.web.invites import routes as invite_routes
from bridge.web.middleware import error_middleware
from bridge.web.ops import metrics_routes
from bridge.web.ops import routes as probe_routes
from bridge.web.standby import active_only
from bridge.web.state import ADMIN, INGEST, PAGES, PROCESS
from bridge.web.whatsapp import WEBHOOKS
from bridge.web.whatsapp import routes as whatsapp_routes

log = logging.getLogger(__name__)

MAX_BODY = 16 * 1024 * 1024  # appservice transactions can be large; media never passes here
# The Bridge of a started public app (tests and tools reach it through this key).
BRIDGE = web.AppKey("civic_bridge", Bridge)


def _expose(app: web.Application, bridge: Bridge) -> None:
    """Give the edge its views of the bridge (bridge.web.state)."""
    app[BRIDGE] = bridge
    app[PROCESS] = app[PAGES] = app[ADMIN] = bridge
    app[INGEST] = bridge.ingest
    app[WEBHOOKS] = bridge.webhooks


def make_app(config: Config, bridge: Bridge | None = None,
             election: Election | None = None) -> web.Application:
    """The public listener's app; builds (and later closes) the Bridge unless one is
    given, with `election` if one was claimed already."""
    app = web.Application(middlewares=[error_middleware, active_only],
                          client_max_size=MAX_BODY)
    app.add_routes(appservice_routes)
    app.add_routes(invite_routes)
    app.add_routes(rooms_wa.public_routes)
    app.add_routes(whatsapp_routes)
    app.add_routes(probe_routes)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        b = bridge or await build_bridge(config, election)
        _expose(app, b)
        b.spawn(b.lead())  # start() once elected (bridge.leader); a standby waits
        yield
        await b.close()

    app.cleanup_ctx.append(lifecycle)
    return app


def make_admin_app(owner: web.Application) -> web.Application:
    """The admin listener's app, sharing the Bridge of `owner` (a started `make_app`)."""
    app = web.Application(middlewares=[error_middleware, active_only])
    app.add_routes(probe_routes)
    app.add_subapp(ADMIN_PREFIX, admin_app())
    return _sharing(app, owner)


def make_metrics_app(owner: web.Application) -> web.Application:
    """The metrics listener's app, sharing the Bridge of `owner` (a started `make_app`)."""
    app = web.Application(middlewares=[error_middleware, active_only])
    app.add_routes(metrics_routes)
    app.add_routes(probe_routes)
    return _sharing(app, owner)


def _sharing(app: web.Application, owner: web.Application) -> web.Application:
    async def share(app: web.Application) -> AsyncIterator[None]:
        _expose(app, owner[BRIDGE])  # KeyError: started before its owner
        yield

    app.cleanup_ctx.append(share)
    return app


async def serve_public(app: web.Application, host: str, port: int
                       ) -> IngestProcess | IngestThread:
    """Serve a started public app on `host:port` from a process of its own, or a thread
    (`appservice.ingest`), where the WhatsApp webhook is stored and answered
    (bridge.web.ingest_process, bridge.web.ingest_thread); stop it before the app's
    runner is cleaned up. An in-memory database cannot be shared with a process: a
    thread then (tests)."""
    config = app[BRIDGE].config
    server = (IngestProcess if config.appservice.ingest == "process"
              and not is_private(config.database.url) else IngestThread)(
        app, host, port, client_max_size=MAX_BODY)
    await server.start()
    return server


class Listeners:
    """Every listener of one bridge process (`Config.listeners`), started and stopped
    together: the public app first (it opens the database, refusing a wrong schema,
    before any port is bound), then the others; stopped in the reverse order."""

    def __init__(self, config: Config, bridge: Bridge | None = None,
                 election: Election | None = None) -> None:
        self.config = config
        self.public = make_app(config, bridge, election)
        makers = {"admin": make_admin_app, "metrics": make_metrics_app}
        self._apps = {name: self.public if name == "public" else makers[name](self.public)
                      for name, _, _ in config.listeners()}
        self._runners: list[tuple[str, web.AppRunner, str, int]] = []
        self._public_server: IngestProcess | IngestThread | None = None

    @property
    def bridge(self) -> Bridge:
        return self.public[BRIDGE]

    async def setup(self) -> None:
        """Build the apps (and the Bridge); no port is bound yet."""
        try:
            for name, host, port in self.config.listeners():
                runner = web.AppRunner(self._apps[name], access_log=None)
                await runner.setup()
                self._runners.append((name, runner, host, port))
        except BaseException:
            await self.stop()
            raise

    async def bind(self) -> None:
        """Start serving on every listener's address."""
        try:
            for name, runner, host, port in self._runners:
                try:
                    if name == "public":
                        self._public_server = await serve_public(self.public, host, port)
                    else:
                        await web.TCPSite(runner, host, port).start()
                except OSError as exc:
                    log.error("%s listener: cannot listen on %s:%d (%s)", name, host, port,
                              exc.strerror or type(exc).__name__)
                    raise
                log.info("listening on %s:%d (%s)", host, port, name)
        except BaseException:
            await self.stop()
            raise

    async def start(self) -> None:
        await self.setup()
        await self.bind()

    async def stop(self) -> None:
        """Stop serving; the Bridge closes with the public app, last."""
        if self._public_server is not None:
            await self._public_server.stop()
            self._public_server = None
        while self._runners:
            _, runner, _, _ = self._runners.pop()
            await runner.cleanup()
