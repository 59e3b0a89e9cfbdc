"""The public listener, served from a thread with an event loop of its own.

Why: a WhatsApp webhook is acknowledged once its rows are committed, and that should
take a millisecond or two. On the bridge's event loop it waited behind whatever ran
there: nio's synchronous crypto store writes and Olm/Megolm work, relay workers, a
garbage collection (issue 16: ack p99 55-87 ms at 50 msg/s, against 1.3 ms for a bare
handler). Here the socket is read, the signature checked and the rows committed on
this thread. On PostgreSQL they go straight into the `inbound` queue, through a
`Database` of this thread's own (engine, connections). On SQLite, whose one writer is
most of the time a session of the bridge's loop, they are committed to the spool
(bridge.db.spool), a file this thread alone adds to, and the worker takes them into
the queue before its next round. Either way the worker on the bridge's loop is then
woken thread-safely and reads the rows from the database, as it does after a restart,
so the guarantees do not change: answered only after a durable commit, deduplicated by
the rows' keys (in the spool and in the queue), nothing lost to a SIGKILL (rows left
in the spool are taken at the worker's first round).

The GIL: this thread needs it for a few hundred microseconds per webhook, but while
the bridge's loop computes it waits up to the switch interval for each hand-over
(5 ms by default, several per request: the socket, the spool's commit, the answer);
the interval is 0.2 ms while this thread runs. Measured on a 2-core machine with every
core busy (bench/whatsapp_relay.py, 50 webhooks/s): a spool commit took 1.0-1.5 ms at
the median against 1.5-2.0 ms with 1 ms, and the webhook's answer p99 was 11-14 ms
(7 runs) against 13-17 (8 runs); no change in the relay's throughput or CPU beyond the
spread between runs.

Every other request (appservice transactions, which feed the devices' crypto state;
invite pages; probes) is read here and handled on the bridge's loop by the public app
itself, exactly as before: its body is read on this thread first (a request's stream
belongs to the loop that reads the socket), then the app's routing, middlewares and
handler run there, and the answer is written back from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future

from aiohttp import hdrs, web
from aiohttp.web_request import BaseRequest

from bridge.db import Database, InboundSource
from bridge.db.engine import is_private
from bridge.web.ingest_child import BACKLOG, SHUTDOWN_SECONDS, make_request
from bridge.web.middleware import error_middleware
from bridge.web.standby import active_only
from bridge.web.state import PROCESS
from bridge.web.whatsapp import WEBHOOK_PATH, WEBHOOKS, webhook_app
from bridge.webhook_ingest import WebhookIngest

log = logging.getLogger(__name__)

SWITCH_INTERVAL = 0.0002  # seconds; see the module's docstring
FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data"})


class _LoopWaker:
    """`Ingest.worker` for this thread: wakes the bridge's worker on the bridge's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 wake: Callable[..., None]) -> None:
        self._loop = loop
        self._wake = wake

    def wake(self, source: InboundSource, *lanes: str) -> None:
        try:
            self._loop.call_soon_threadsafe(self._wake, source, *lanes)
        except RuntimeError:  # the bridge's loop is closed: the rows wait for a restart
            log.warning("webhook stored while the bridge is stopping; processed on restart")


class IngestThread:
    """Serves `app` (a started public app) on `host:port` from its own thread."""

    def __init__(self, app: web.Application, host: str, port: int,
                 client_max_size: int) -> None:
        self._app = app
        self._host = host
        self._port = port
        self._client_max_size = client_max_size
        self._main: asyncio.AbstractEventLoop | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None  # set on this thread's loop
        self._webhooks: web.Application | None = None
        self._switch_interval: float | None = None

    async def start(self) -> None:
        """Bind and serve; raises what binding raised (OSError: address in use)."""
        self._main = asyncio.get_running_loop()
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(SWITCH_INTERVAL, self._switch_interval))
        started: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, args=(started,),
                                        name="ingest", daemon=True)
        self._thread.start()
        try:
            await asyncio.wrap_future(started)
        except BaseException:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
            sys.setswitchinterval(self._switch_interval)
            raise

    async def stop(self) -> None:
        """Stop listening, let requests in progress finish, end the thread."""
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # its loop has ended already
                self._loop.call_soon_threadsafe(self._stop.set)
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        if self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)

    # --- on the thread ----------------------------------------------------------------

    def _run(self, started: Future[None]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(started))
        except BaseException as exc:  # reported to start(), or logged
            if not started.done():
                started.set_exception(exc)
            else:
                log.exception("the ingest thread failed")
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self, started: Future[None]) -> None:
        self._stop = asyncio.Event()
        url = self._app[PROCESS].config.database.url
        # An in-memory SQLite database is private to its engine: the bridge's loop
        # stores webhooks then, as it does every other request.
        db = None if is_private(url) else await Database.open(url, check=False)
        try:
            if db is not None:
                self._webhooks = self._webhook_app(self._app[WEBHOOKS], db)
            server = web.Server(self._handle, access_log=None,
                                request_factory=make_request(self._client_max_size))
            listener = await asyncio.get_running_loop().create_server(
                server, self._host, self._port, backlog=BACKLOG)
            try:
                started.set_result(None)
                await self._stop.wait()
            finally:
                listener.close()
                await listener.wait_closed()
                await server.shutdown(SHUTDOWN_SECONDS)
        finally:
            if db is not None:
                await db.close()

    def _webhook_app(self, webhooks: WebhookIngest, db: Database) -> web.Application:
        """The webhook's routes with a `WebhookIngest` of this thread's database and loop."""
        assert self._main is not None
        local = dataclasses.replace(webhooks, db=db, off_loop=True,
                                    worker=_LoopWaker(self._main, webhooks.worker.wake))
        app = webhook_app(local, self._client_max_size, active_only)
        app[PROCESS] = self._app[PROCESS]
        app.freeze()
        return app

    async def _handle(self, request: BaseRequest) -> web.StreamResponse:
        assert isinstance(request, web.Request)
        if request.path == WEBHOOK_PATH and self._webhooks is not None:
            return await self._webhooks._handle(request)
        return await error_middleware(request, self._forward)

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        """Read the request here, handle it on the bridge's loop, answer from here."""
        assert self._main is not None
        if request.headers.get(hdrs.EXPECT):
            # The "100 Continue" is written to this thread's socket, so here.
            match = await self._app.router.resolve(request)
            if (early := await match.expect_handler(request)) is not None:
                return early
            await request.writer.drain()
            body = await request.read()
            request = request.clone(headers={k: v for k, v in request.headers.items()
                                             if k.lower() != "expect"})
            request._read_bytes = body  # the clone shares the stream, read already
        else:
            await request.read()
        if request.content_type in FORM_TYPES:
            await request.post()  # cached: a multipart body is read from the stream
        future = asyncio.run_coroutine_threadsafe(self._app._handle(request), self._main)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()
            raise
