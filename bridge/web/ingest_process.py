"""The public listener, served from a process of its own (`appservice.ingest: process`).

Why a process and not only a thread (bridge.web.ingest_thread): on a 2-core machine
with every core busy (Synapse, its database and the bridge all at work), the ingest
thread waited for a core and then for the interpreter lock, held by the bridge's loop,
at each hand-over (the socket, the commit, the answer): the webhook's answer took
11-15 ms at p99 at 50 msg/s, against a target of 10. A process of its own has an
interpreter lock of its own; what is left is waiting for a core, which the kernel gives
a process that was asleep first.

What runs where:

- the bridge's process binds the public address (so an address in use fails `run` as
  before) and hands the socket to this module's child, `python -m
  bridge.web.ingest_process`; it keeps its copy, so a child that dies is started again
  on the same socket, connections waiting in its backlog meanwhile;
- the child answers the WhatsApp webhook itself (bridge.webhook_ingest): the signature
  checked, the rows sealed and committed (the spool on SQLite, bridge.db.spool; the
  `inbound` queue on PostgreSQL), then answered; it tells the bridge's process which
  lanes got rows (the worker wakes, as for rows it stored itself) and what its metrics
  moved (the bridge's `/metrics` counts them, nothing is lost to the process boundary);
- every other request (appservice transactions, invite pages, probes), and the webhook
  too until the bridge's process says it is active and ready, is passed on unchanged
  over a Unix socket in a directory only the bridge's user can enter, where the public
  app answers it as it answers on the thread (middlewares, routes, the standby's 503).

The two talk over the child's standard streams: in, the setup (pickled, from the
parent: it holds the config's secrets, so it never travels otherwise) then one line per
role change; out, one JSON line per wake-up or metric. The child's standard error is
the bridge's: its logs go where the bridge's go, through the same redaction. The child
ends when its standard input closes: the bridge stopped, or was killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pickle
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
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
from bridge.web.state import PROCESS, WEBHOOKS
from bridge.web.whatsapp import WEBHOOK_PATH
from bridge.web.whatsapp import routes as whatsapp_routes
from bridge.webhook_ingest import WebhookIngest

log = logging.getLogger(__name__)

SHUTDOWN_SECONDS = 10.0  # requests in progress may finish; as aiohttp's runner allows
RESTART_SECONDS = (1.0, 30.0)  # a child that died is started again after 1 s, then longer
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


# --- the bridge's process ---------------------------------------------------------------


class IngestProcess:
    """Serves `app` (a started public app) on `host:port` from a child process."""

    def __init__(self, app: web.Application, host: str, port: int,
                 client_max_size: int) -> None:
        self._app = app
        self._host = host
        self._port = port
        self._client_max_size = client_max_size
        self._socket: socket.socket | None = None
        self._dir: Path | None = None
        self._private: asyncio.Server | None = None
        self._child: asyncio.subprocess.Process | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._active = False
        self._stopping = False
        # Set while the child answers webhooks itself (it confirmed the role).
        self.answering = asyncio.Event()

    @property
    def pid(self) -> int | None:
        """The child's process id, while it runs."""
        return self._child.pid if self._child is not None else None

    async def start(self) -> None:
        """Bind and start the child; raises what binding raised (OSError: address in
        use). Connections wait in the socket's backlog until the child serves them."""
        self._socket = socket.create_server((self._host, self._port), backlog=BACKLOG)
        try:
            self._dir = Path(tempfile.mkdtemp(prefix="civic-bridge-"))  # mode 0700
            server = web.Server(self._answer, access_log=None,
                                request_factory=make_request(self._client_max_size))
            self._private = await asyncio.get_running_loop().create_unix_server(
                server, str(self._dir / "public.sock"))
            await self._spawn()
        except BaseException:
            await self.stop()
            raise
        self._tasks = [asyncio.create_task(self._supervise(), name="ingest process"),
                       asyncio.create_task(self._follow_role(), name="ingest role")]

    async def stop(self) -> None:
        """Stop the child (requests in progress may finish), then the private socket."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self._end_child()
        if self._private is not None:
            self._private.close()
            await self._private.wait_closed()
            self._private = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    async def _answer(self, request: BaseRequest) -> web.StreamResponse:
        """A request the child passed on, answered by the public app."""
        assert isinstance(request, web.Request)
        return await self._app._handle(request)

    async def _spawn(self) -> None:
        assert self._socket is not None and self._dir is not None
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", __name__, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, pass_fds=(self._socket.fileno(),))
        assert child.stdin is not None
        setup = pickle.dumps(ChildSetup(self._app[PROCESS].config, self._socket.fileno(),
                                        str(self._dir / "public.sock"),
                                        self._client_max_size, self._active))
        child.stdin.write(struct.pack("!I", len(setup)) + setup)
        self._child = child

    async def _end_child(self) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        if child.stdin is not None:
            child.stdin.close()  # the child stops at the end of its input
        try:
            async with asyncio.timeout(SHUTDOWN_SECONDS + 5):
                await self._read(child)
                await child.wait()
        except TimeoutError:
            log.warning("the ingest process did not stop in time; killed")
            child.kill()
            await child.wait()

    async def _supervise(self) -> None:
        """Apply what the child reports; start it again if it ends by itself."""
        first, longest = RESTART_SECONDS
        delay = first
        while not self._stopping:
            started = time.monotonic()
            if (child := self._child) is not None:
                await self._read(child)
                code = await child.wait()
                if self._stopping or self._child is not child:
                    return
                log.error("the ingest process ended (exit code %s); starting it again "
                          "in %g s", code, delay)
                self._child = None
                self.answering.clear()
            await asyncio.sleep(delay)
            # A child that ran a while is started again soon; one that keeps dying, less often.
            delay = first if time.monotonic() - started > longest else min(2 * delay, longest)
            try:
                await self._spawn()
            except OSError as exc:
                log.error("the ingest process could not be started (%s); trying again in "
                          "%g s", exc.strerror or type(exc).__name__, delay)

    async def _read(self, child: asyncio.subprocess.Process) -> None:
        assert child.stdout is not None
        while line := await child.stdout.readline():
            try:
                self._apply(json.loads(line))
            except (ValueError, TypeError, KeyError, AttributeError):
                log.error("the ingest process sent an unreadable line; ignored")

    def _apply(self, report: dict[str, Any]) -> None:
        if "wake" in report:
            source, lanes = report["wake"]
            self._app[WEBHOOKS].worker.wake(cast(InboundSource, source), *lanes)
        elif "answering" in report:
            (self.answering.set if report["answering"] else self.answering.clear)()
        elif "metric" in report:
            op, family, labels, value = report["metric"]
            if family not in FORWARDED_METRICS or op not in ("inc", "observe"):
                raise KeyError(family)
            metric = getattr(self._app[PROCESS].metrics, family)
            getattr(metric.labels(*labels) if labels else metric, op)(value)

    async def _follow_role(self) -> None:
        """Tell the child to answer webhooks once this process is active and ready, and
        to pass them on (to the standby's 503) once it is not."""
        process = self._app[PROCESS]
        await process.ready.wait()
        self._tell(True)
        await process.lost.wait()
        self._tell(False)

    def _tell(self, active: bool) -> None:
        self._active = active
        child = self._child
        if child is not None and child.stdin is not None and not child.stdin.is_closing():
            child.stdin.write(b"active\n" if active else b"standby\n")


# --- the child --------------------------------------------------------------------------


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
        app = web.Application(middlewares=[error_middleware],
                              client_max_size=self._setup.client_max_size)
        app.add_routes(whatsapp_routes)
        app[WEBHOOKS] = webhooks
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
