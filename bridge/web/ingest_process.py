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
  before) and hands the socket to a child, `python -m bridge.web.ingest_child`; it keeps
  its copy, so a child that dies is started again on the same socket, connections
  waiting in its backlog meanwhile;
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
import json
import logging
import pickle
import shutil
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

from aiohttp import web
from aiohttp.web_request import BaseRequest

from bridge.db import InboundSource
from bridge.web import ingest_child
from bridge.web.ingest_child import (
    BACKLOG,
    FORWARDED_METRICS,
    SHUTDOWN_SECONDS,
    ChildSetup,
    make_request,
)
from bridge.web.state import PROCESS
from bridge.web.whatsapp import WEBHOOKS

log = logging.getLogger(__name__)

RESTART_SECONDS = (1.0, 30.0)  # a child that died is started again after 1 s, then longer


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
            sys.executable, "-m", ingest_child.__name__, stdin=asyncio.subprocess.PIPE,
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
