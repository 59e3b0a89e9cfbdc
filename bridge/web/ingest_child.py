"""The child of bridge.web.ingest_process: the public listener in a process of its own.

Started by the bridge's process as `python -m bridge.web.ingest_child`, with the public
socket open and the setup on its standard input. It stores and answers the WhatsApp
webhook itself (bridge.webhook_ingest) and passes every other request on to the bridge's
process. It imports only what the webhook needs (no Matrix side, no migrations' users):
it starts in a fraction of the bridge's time and memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pickle
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import aiohttp
from aiohttp import hdrs, web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from bridge.config import Config
from bridge.db import Database, InboundSource
from bridge.db.engine import is_private
from bridge.db.spool import Spool, spool_path
from bridge.errors import Unavailable
from bridge.logsetup import setup_logging
from bridge.metrics import Metrics
from bridge.privacy import Privacy
from bridge.web.middleware import error_middleware, json_error
from bridge.web.whatsapp import WEBHOOK_PATH, webhook_app
from bridge.webhook_ingest import WebhookIngest

log = logging.getLogger(__name__)

# The public listener's, wherever it runs (here, bridge.web.ingest_thread, and the
# socket bridge.web.ingest_process binds for us).
SHUTDOWN_SECONDS = 10.0  # requests in progress may finish; as aiohttp's runner allows
BACKLOG = 128  # as aiohttp's TCPSite
# Families the webhook moves (bridge.webhook_ingest); the child forwards only these.
FORWARDED_METRICS = frozenset({"webhook_latency", "webhook_rejects", "webhook_replays",
                               "ignored_parts", "inbound_not_relayed"})
# Not passed on: they describe one hop, not the request (RFC 9110, 7.6.1).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                        "transfer-encoding", "upgrade", "content-length", "expect"})


def make_request(client_max_size: int) -> Callable[..., BaseRequest]:
    """A `web.Server` request factory making `web.Request`s, which apps handle."""

    def factory(message: object, payload: object, protocol: RequestHandler, writer: object,
                task: asyncio.Task[None]) -> BaseRequest:
        return web.Request(message, payload, protocol, writer, task,  # type: ignore[arg-type]
                           asyncio.get_running_loop(), client_max_size=client_max_size)

    return factory


@dataclass(frozen=True)
class ChildSetup:
    config: Config
    fd: int  # the listening socket
    forward_to: str  # the bridge's private Unix socket
    client_max_size: int
    active: bool


class _Reporter:
    """Writes the child's reports to its standard output, one JSON line each."""

    def __init__(self, out: asyncio.StreamWriter) -> None:
        self._out = out

    def send(self, report: dict[str, Any]) -> None:
        if not self._out.is_closing():
            self._out.write(json.dumps(report, separators=(",", ":")).encode() + b"\n")

    def wake(self, source: InboundSource, *lanes: str) -> None:
        self.send({"wake": [source, list(lanes)]})


class _ForwardedMetric:
    """One of FORWARDED_METRICS, as the webhook uses it; each change goes to the bridge."""

    def __init__(self, reporter: _Reporter, family: str, labels: tuple[str, ...] = ()):
        self._reporter, self._family, self._labels = reporter, family, labels

    def labels(self, *values: str) -> _ForwardedMetric:
        return _ForwardedMetric(self._reporter, self._family, values)

    def inc(self, amount: float = 1.0) -> None:
        self._reporter.send({"metric": ["inc", self._family, self._labels, amount]})

    def observe(self, value: float) -> None:
        self._reporter.send({"metric": ["observe", self._family, self._labels, value]})

    @contextlib.contextmanager
    def time(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.observe(time.perf_counter() - started)


class _ForwardedMetrics:
    def __init__(self, reporter: _Reporter) -> None:
        self._reporter = reporter

    def __getattr__(self, family: str) -> _ForwardedMetric:
        if family not in FORWARDED_METRICS:
            raise AttributeError(family)
        return _ForwardedMetric(self._reporter, family)


class _Child:
    def __init__(self, setup: ChildSetup, reporter: _Reporter) -> None:
        self._setup = setup
        self._reporter = reporter
        self._active = setup.active
        self._webhooks: web.Application | None = None
        self._http: aiohttp.ClientSession | None = None

    async def serve(self, commands: asyncio.StreamReader) -> None:
        setup, config = self._setup, self._setup.config
        url = config.database.url
        # An in-memory database is the bridge's own: every webhook is passed on then.
        db = None if is_private(url) else await Database.open(url, check=False)
        path = spool_path(url) if db is not None and config.whatsapp.enabled else None
        spool = Spool(path) if path is not None else None
        self._http = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=setup.forward_to), auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        try:
            if db is not None:
                self._webhooks = self._webhook_app(WebhookIngest(
                    config, db, Privacy.from_config(config.privacy),
                    cast(Metrics, _ForwardedMetrics(self._reporter)), self._reporter,
                    spool=spool, off_loop=True))
            server = web.Server(self._handle, access_log=None,
                                request_factory=make_request(setup.client_max_size))
            listener = await asyncio.get_running_loop().create_server(
                server, sock=socket.socket(fileno=setup.fd))
            self._reporter.send({"answering": self._active and self._webhooks is not None})
            stop = asyncio.Event()
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
            follow = asyncio.create_task(self._follow(commands, stop))
            try:
                await stop.wait()
            finally:
                follow.cancel()
                listener.close()
                await listener.wait_closed()
                await server.shutdown(SHUTDOWN_SECONDS)
        finally:
            await self._http.close()
            if db is not None:
                await db.close()
            if spool is not None:
                spool.close()

    async def _follow(self, commands: asyncio.StreamReader, stop: asyncio.Event) -> None:
        """The bridge's role changes, until its end of the pipe closes."""
        while line := await commands.readline():
            self._active = line.strip() == b"active"
            self._reporter.send({"answering": self._active and self._webhooks is not None})
        stop.set()

    def _webhook_app(self, webhooks: WebhookIngest) -> web.Application:
        app = webhook_app(webhooks, self._setup.client_max_size)
        app.freeze()
        return app

    async def _handle(self, request: BaseRequest) -> web.StreamResponse:
        assert isinstance(request, web.Request)
        if request.path == WEBHOOK_PATH and self._active and self._webhooks is not None:
            return await self._webhooks._handle(request)
        return await error_middleware(request, self._forward)

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        """Pass the request on to the bridge's process, and its answer back."""
        assert self._http is not None
        if (expect := request.headers.get(hdrs.EXPECT)) is not None:
            if expect.lower() != "100-continue":
                return json_error(417, "M_UNKNOWN", "unknown Expect value")
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await request.read()
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        try:
            async with self._http.request(request.method, f"http://bridge{request.path_qs}",
                                          headers=headers, data=body,
                                          allow_redirects=False) as answer:
                content = await answer.read()
                return web.Response(status=answer.status, reason=answer.reason, body=content,
                                    headers=[(k, v) for k, v in answer.headers.items()
                                             if k.lower() not in HOP_BY_HOP])
        except aiohttp.ClientError as exc:
            log.warning("the bridge's process did not answer a request passed on (%s)",
                        type(exc).__name__)
            raise Unavailable("the bridge is restarting; retry later") from exc


async def _child_main(fd_in: int, fd_out: int) -> None:
    loop = asyncio.get_running_loop()
    commands = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands),
                                 os.fdopen(fd_in, "rb", buffering=0))
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(fd_out, "wb", buffering=0))
    out = asyncio.StreamWriter(transport, protocol, None, loop)
    size = struct.unpack("!I", await commands.readexactly(4))[0]
    # Written by the bridge's process only (it started us with this pipe).
    setup: ChildSetup = pickle.loads(await commands.readexactly(size))  # noqa: S301
    setup_logging(setup.config.logging, secrets=setup.config.secret_values())
    try:
        await _Child(setup, _Reporter(out)).serve(commands)
    finally:
        with contextlib.suppress(ConnectionError):
            await out.drain()
        transport.close()


if __name__ == "__main__":
    # Standard output is the report channel only: a stray print must not corrupt it.
    report_fd = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    # Ctrl-C in the bridge's terminal reaches us too: the bridge stops us, in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(_child_main(sys.stdin.fileno(), report_fd))
