"""The devices' room sends go through one send gate (bridge.matrix.send_gate): over HTTP,
against a homeserver that holds its first answer, the sends made meanwhile reach it
only once that answer is given, and then together; other requests do not wait."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import nio
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bridge.matrix.devices import AppserviceDeviceClient
from bridge.matrix.send_gate import SendGate

pytestmark = pytest.mark.integration

ROOM = "!room:localhost"


def _client(url: str, user: str, gate: SendGate) -> AppserviceDeviceClient:
    client = AppserviceDeviceClient(url, user, "DEVICE", store_path="",
                                    config=nio.AsyncClientConfig(encryption_enabled=False))
    client.restore_login(user, "DEVICE", "as-token")
    client.gate = gate
    return client


async def test_room_sends_made_while_one_is_in_flight_leave_together_after_it() -> None:
    arrived: list[tuple[str, float]] = []
    hold_first = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def send(request: web.Request) -> web.Response:
        user = request.query["user_id"]
        arrived.append((user, loop.time()))
        if len(arrived) == 1:
            await hold_first.wait()
        return web.json_response({"event_id": f"$event{len(arrived)}"})

    async def whoami(request: web.Request) -> web.Response:
        arrived.append(("whoami " + request.query["user_id"], loop.time()))
        return web.json_response({"user_id": request.query["user_id"]})

    app = web.Application()
    app.router.add_put("/_matrix/client/{version}/rooms/{room}/send/{type}/{txn}", send)
    app.router.add_get("/_matrix/client/{version}/account/whoami", whoami)
    batches: Counter[int] = Counter()
    gate = SendGate(grace=0.01, longest_wait=30.0,
                    on_batch=lambda sends: batches.update([sends]))
    async with TestServer(app) as server:
        url = str(server.make_url("/")).rstrip("/")
        clients = [_client(url, f"@ghost{n}:localhost", gate) for n in range(3)]
        try:
            content: dict[str, Any] = {"msgtype": "m.text", "body": "hola"}
            first = asyncio.create_task(clients[0].room_send(ROOM, "m.room.message", content))
            while not arrived:
                await asyncio.sleep(0.005)
            others = [asyncio.create_task(c.room_send(ROOM, "m.room.message", content))
                      for c in clients[1:]]
            # Not a room send: it does not wait for the gate.
            assert isinstance(await clients[1].whoami(), nio.WhoamiResponse)
            await asyncio.sleep(0.1)
            assert [who for who, _ in arrived] == ["@ghost0:localhost",
                                                   "whoami @ghost1:localhost"]
            answered = loop.time()
            hold_first.set()
            assert isinstance(await first, nio.RoomSendResponse)
            results = await asyncio.gather(*others)
            assert all(isinstance(r, nio.RoomSendResponse) for r in results)
            later = arrived[2:]
            assert sorted(who for who, _ in later) == ["@ghost1:localhost",
                                                       "@ghost2:localhost"]
            assert all(at >= answered for _, at in later)
            assert batches == {1: 1, 2: 1}  # the first alone, then the two at once
        finally:
            for client in clients:
                await client.close()
