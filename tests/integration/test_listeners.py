"""Separate listeners (bridge.app): the public one (appservice.listen_*) serves only the
appservice API, the webhook, invite pages and their stylesheet; the admin API and
/metrics answer only on their own loopback listeners; the probes answer everywhere."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.fixtures.bridge import BridgeHarness

pytestmark = pytest.mark.integration

ADMIN_PATHS = [("GET", "/admin/v1/rooms"), ("GET", "/admin/v1/dead-letters"),
               ("POST", "/admin/v1/rooms"), ("GET", "/admin/v1/audit")]
PUBLIC_PATHS = [("GET", "/whatsapp/webhook"), ("POST", "/whatsapp/webhook"),
                ("POST", "/_matrix/app/v1/ping"), ("GET", "/invite/abc"),
                ("GET", "/static/civic-bridge.css")]


async def request(base: str, method: str, path: str, token: str | None = None
                  ) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.request(
            method, base + path, headers=headers, json={} if method != "GET" else None) as resp:
        try:
            return resp.status, await resp.json(content_type=None)
        except ValueError:
            return resp.status, None


@pytest.mark.parametrize(("method", "path"), [*ADMIN_PATHS, ("GET", "/metrics")])
async def test_the_public_listener_does_not_serve_admin_or_metrics(
        bridge: BridgeHarness, method: str, path: str) -> None:
    status, body = await request(bridge.running.url, method, path,
                                 bridge.running.config.admin.token)
    assert status == 404, (path, body)


async def test_the_admin_listener_serves_the_admin_api_and_nothing_public(
        bridge: BridgeHarness) -> None:
    running = bridge.running
    assert running.config.admin.listen_host == "127.0.0.1"
    status, rooms = await request(running.admin_url, "GET", "/admin/v1/rooms",
                                  running.config.admin.token)
    assert status == 200 and isinstance(rooms, list | dict)
    assert (await request(running.admin_url, "GET", "/admin/v1/rooms"))[0] == 401
    for method, path in [*PUBLIC_PATHS, ("GET", "/metrics")]:
        status, _ = await request(running.admin_url, method, path,
                                  running.config.appservice.hs_token)
        assert status == 404, path


async def test_the_metrics_listener_serves_only_metrics(bridge: BridgeHarness) -> None:
    running = bridge.running
    async with aiohttp.ClientSession() as http, \
            http.get(running.metrics_url + "/metrics") as resp:
        assert resp.status == 200
        assert "civic_bridge_active" in await resp.text()
    for method, path in [*PUBLIC_PATHS, *ADMIN_PATHS]:
        status, _ = await request(running.metrics_url, method, path,
                                  running.config.admin.token)
        assert status == 404, path


async def test_the_public_listener_serves_its_paths(bridge: BridgeHarness) -> None:
    running = bridge.running
    assert (await request(running.url, "POST", "/_matrix/app/v1/ping",
                          running.config.appservice.hs_token))[0] == 200
    assert (await request(running.url, "GET", "/static/civic-bridge.css"))[0] == 200
    assert (await request(running.url, "GET", "/whatsapp/webhook"))[0] == 403  # no token


@pytest.mark.parametrize("listener", ["url", "admin_url", "metrics_url"])
async def test_probes_answer_on_every_listener(bridge: BridgeHarness, listener: str) -> None:
    base = getattr(bridge.running, listener)
    assert (await request(base, "GET", "/health"))[0] == 200
    status, body = await request(base, "GET", "/ready")
    assert status == 200 and body["role"] == "active"
