"""The public listener in a process of its own (`appservice.ingest: process`, the
default; bridge.web.ingest_process): the webhook is stored and answered there, without
the bridge's event loop; what it stored is processed by the bridge and counted in the
bridge's metrics; every other request is answered by the bridge as before; the child is
started again if it dies, passes webhooks on once the bridge is not the active one, and
ends with the bridge, even a killed one.

The session's bridge runs its listener on a thread (its privacy sweep reads the log
records of its own process): these tests run a bridge of their own, on the same port."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
import yaml

from bridge.db import upgrade
from bridge.web.ingest_process import IngestProcess
from tests.fixtures.bridge import BridgeHarness, in_place_of, own_bridge
from tests.integration.test_ingest_thread import (
    answer_with_loop_held,
    delivery,
    post_webhook,
    stored_status,
)

pytestmark = pytest.mark.integration

@asynccontextmanager
async def process_bridge(h: BridgeHarness, tmp: Path) -> AsyncIterator[BridgeHarness]:
    """The session bridge stopped and one of our own on its port, with its listener in a
    process of its own."""
    async with in_place_of(h), own_bridge(h, tmp, ingest="process") as own:
        yield own


def listener(h: BridgeHarness) -> IngestProcess:
    server = h.running._listeners._public_server  # type: ignore[union-attr]
    assert isinstance(server, IngestProcess)
    return server


def webhooks_counted(h: BridgeHarness) -> float:
    value = h.running.bridge.metrics.registry.get_sample_value("civic_bridge_webhook_seconds_count")
    return value or 0.0


async def test_the_child_answers_webhooks_while_the_bridge_loop_is_busy(
        bridge: BridgeHarness, tmp_path: Path) -> None:
    async with process_bridge(bridge, tmp_path) as h:
        server = listener(h)
        assert server.pid is not None and server.pid != os.getpid()
        await asyncio.wait_for(server.answering.wait(), 30)
        counted = webhooks_counted(h)
        message, body = delivery(h, "¿hay cita para el padrón esta semana?")
        assert await answer_with_loop_held(h, body) == 200, \
            "the webhook's answer waited for the bridge's event loop"

        # The bridge was woken for it, processed it once, and counted it.
        await asyncio.sleep(0.5)
        await h.running.idle("whatsapp")
        assert await stored_status(h, message) in (["done"], ["held"])
        assert webhooks_counted(h) == counted + 1


async def test_other_requests_are_answered_by_the_bridge_through_the_child(
        bridge: BridgeHarness, tmp_path: Path) -> None:
    async with process_bridge(bridge, tmp_path) as h, aiohttp.ClientSession() as http:
        url = h.running.url
        async with http.get(url + "/health") as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "ok"
        txn = f"{url}/_matrix/app/v1/transactions/{secrets.token_hex(4)}"
        async with http.put(txn, json={"events": []},
                            headers={"Authorization": "Bearer wrong"}) as resp:
            assert resp.status == 403  # the bridge's own check and error body
            assert (await resp.json())["errcode"] == "M_FORBIDDEN"
        token = {"Authorization": f"Bearer {h.running.config.appservice.hs_token}"}
        async with http.put(txn, json={"events": []},
                            headers={**token, "Expect": "100-continue"}) as resp:
            assert resp.status == 200
            assert resp.content_type == "application/json"
        # A webhook with a bad signature is refused by the child, and counted by the bridge.
        rejects = "civic_bridge_webhook_rejects_total"
        before = h.running.bridge.metrics.registry.get_sample_value(
            rejects, {"reason": "signature"}) or 0.0
        await asyncio.wait_for(listener(h).answering.wait(), 30)
        async with http.post(h.webhook_url, data=b"{}",
                             headers={"X-Hub-Signature-256": "sha256=00"}) as resp:
            assert resp.status == 401

        async def counted() -> float | None:
            return h.running.bridge.metrics.registry.get_sample_value(
                rejects, {"reason": "signature"})

        deadline = time.monotonic() + 10
        while (await counted() or 0.0) < before + 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert await counted() == before + 1


async def test_a_killed_child_is_started_again_and_nothing_is_refused(
        bridge: BridgeHarness, tmp_path: Path) -> None:
    async with process_bridge(bridge, tmp_path) as h:
        server = listener(h)
        await asyncio.wait_for(server.answering.wait(), 30)
        old = server.pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        # Sent at once: it waits in the socket's backlog for the next child.
        message, body = delivery(h, "se ha cortado, ¿me oyen?")
        assert await asyncio.to_thread(post_webhook, h, body) == 200
        assert server.pid not in (None, old)
        await asyncio.sleep(0.5)
        await h.running.idle("whatsapp")
        assert await stored_status(h, message) in (["done"], ["held"])


async def test_once_not_active_webhooks_get_the_standby_answer(
        bridge: BridgeHarness, tmp_path: Path) -> None:
    async with process_bridge(bridge, tmp_path) as h:
        server = listener(h)
        await asyncio.wait_for(server.answering.wait(), 30)
        running = h.running.bridge
        running.role = "lost"  # as bridge.lifecycle.lead does when the lock is lost
        running.lost.set()
        deadline = time.monotonic() + 10
        while server.answering.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not server.answering.is_set()
        _, body = delivery(h, "¿siguen ahí?")
        assert await asyncio.to_thread(post_webhook, h, body) == 503


def _free(port: int) -> bool:
    """Whether a bridge started now could listen there (as bridge.web.ingest_process
    binds: connections of the old one in TIME_WAIT do not count)."""
    try:
        socket.create_server(("127.0.0.1", port)).close()
    except OSError:
        return False
    return True


async def test_the_child_ends_with_a_killed_bridge_and_frees_the_port(
        bridge: BridgeHarness, tmp_path: Path) -> None:
    cfg = bridge.running.config
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'bridge.db'}"
    await upgrade(db_url)
    port = cfg.appservice.listen_port
    raw = {
        "homeserver": {"url": cfg.homeserver.url, "domain": cfg.homeserver.domain},
        "appservice": {"listen_host": "127.0.0.1", "listen_port": port,
                       "as_token": cfg.appservice.as_token, "hs_token": cfg.appservice.hs_token,
                       "ghost_prefix": f"cb_k{secrets.token_hex(2)}",
                       "store_dir": str(tmp_path / "store")},
        "database": {"url": db_url},
        "privacy": {"data_key": cfg.privacy.data_key, "index_key": cfg.privacy.index_key},
        "audit": {"key": cfg.audit.key},
        "admin": {"token": cfg.admin.token, "listen_port": cfg.admin.listen_port},
        "metrics": {"listen_port": cfg.metrics.listen_port},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    await bridge.running.stop()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "run", "-c", str(path), cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        children: list[int] = []
        deadline = time.monotonic() + 60
        while not children and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            children = _children(proc.pid)
        assert children, "the bridge started no ingest process"
        proc.kill()
        await proc.wait()
        deadline = time.monotonic() + 10
        while (_alive(children[0]) or not _free(port)) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not _alive(children[0]), "the ingest process outlived its bridge"
        assert _free(port)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await bridge.running.start()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
