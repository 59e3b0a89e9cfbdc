"""The bridge's roles over HTTP, in-process: standby → active → lost.

The election is a test double of the `Election` protocol that the test drives (the real
lock is tested in tests/integration/test_leader.py and test_ha.py). The homeserver is
unreachable on purpose: a standby must not even try it for the bot device, and an
active bridge keeps retrying until its leadership is lost.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bridge.app import make_admin_app, make_app, make_metrics_app
from bridge.devtools.synapse import free_port
from bridge.services import Bridge, build_bridge
from tests.fixtures.synapse import build_test_config


class DrivenElection:
    """Elected when the test says so; loses the lock when the test cuts it."""

    def __init__(self) -> None:
        self.elected = asyncio.Event()
        self.cut = asyncio.Event()
        self.released = False

    async def claim(self) -> None:
        return None

    async def acquire(self) -> None:
        await self.elected.wait()

    async def watch(self) -> None:
        await self.cut.wait()

    async def release(self) -> None:
        self.released = True


class Clients:
    """A test client per listener (bridge.app); `for_path` picks the one serving it."""

    def __init__(self, public: TestClient[object, object]) -> None:
        self.public = public
        self.admin: TestClient[object, object] = TestClient(TestServer(
            make_admin_app(public.app)))
        self.metrics: TestClient[object, object] = TestClient(TestServer(
            make_metrics_app(public.app)))

    def for_path(self, path: str) -> TestClient[object, object]:
        if path.startswith("/admin/"):
            return self.admin
        return self.metrics if path == "/metrics" else self.public


@pytest.fixture
async def standby(tmp_path: Path, sqlite_template: Path
                  ) -> AsyncIterator[tuple[Clients, Bridge, DrivenElection]]:
    shutil.copyfile(sqlite_template, tmp_path / "bridge.db")
    config = build_test_config(f"http://127.0.0.1:{free_port()}", free_port(), tmp_path)
    bridge = await build_bridge(config)
    election = DrivenElection()
    bridge.election = election
    clients = Clients(TestClient(TestServer(make_app(config, bridge))))
    await clients.public.start_server()  # first: the others share its bridge
    await clients.admin.start_server()
    await clients.metrics.start_server()
    try:
        yield clients, bridge, election
    finally:
        await clients.metrics.close()
        await clients.admin.close()
        await clients.public.close()  # the app's cleanup closes the bridge
    assert election.released, "shutdown must give the leadership up"


async def _until(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not check():
            await asyncio.sleep(0.01)


async def test_roles_over_http(standby: tuple[Clients, Bridge, DrivenElection],
                               tmp_path: Path) -> None:
    clients, bridge, election = standby
    client = clients.public
    hs = {"Authorization": f"Bearer {bridge.config.appservice.hs_token}"}
    txn = {"events": []}

    # Standby: operational endpoints only.
    for each in (clients.public, clients.admin, clients.metrics):  # probes everywhere
        resp = await each.get("/ready")
        body = await resp.json()
        assert body["role"] == "standby" and "started" not in body
        assert (await each.get("/health")).status == 200
    metrics = await clients.metrics.get("/metrics")
    assert metrics.status == 200
    assert "civic_bridge_active 0.0" in await metrics.text()
    for method, path in (("PUT", "/_matrix/app/v1/transactions/t1"),
                         ("POST", "/whatsapp/webhook"), ("GET", "/admin/v1/rooms")):
        resp = await clients.for_path(path).request(method, path, json=txn, headers=hs)
        assert resp.status == 503, path
        assert (await resp.json())["errcode"] == "CB_UNAVAILABLE"
    assert not (tmp_path / "store").exists(), "a standby touched the crypto store"
    assert await bridge.db.transactions.seen("t1") is False

    # Elected: transactions are stored (the bot device waits for the homeserver).
    election.elected.set()
    await _until(lambda: bridge.role == "active")
    resp = await client.put("/_matrix/app/v1/transactions/t2", json=txn, headers=hs)
    assert resp.status == 200
    assert "civic_bridge_active 1.0" in await (await clients.metrics.get("/metrics")).text()

    # Lost: processing stops at once, requests are refused, the process is told to exit.
    election.cut.set()
    async with asyncio.timeout(5):
        await bridge.lost.wait()
    assert bridge.role == "lost"
    assert [t for t in bridge.tasks if not t.done()] == []
    resp = await client.put("/_matrix/app/v1/transactions/t3", json=txn, headers=hs)
    assert resp.status == 503
    resp = await client.get("/ready")
    assert resp.status == 503 and (await resp.json())["role"] == "lost"
