"""Ghost devices are lazy and bounded (issue 16 point 3): at most
`appservice.max_open_devices` stay open, the least recently used are closed, and a
closed device opens again from its store without a request to the homeserver.

Against the real Synapse, with a bridge of the test's own (max_open_devices=2) in place
of the session bridge; requests are counted in Synapse's access log.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import bridge.matrix.devices as devices_module
from bridge.types import RoomID, UserID
from tests.fixtures.bridge import BridgeHarness, in_place_of, own_bridge
from tests.fixtures.staff import staff_login

pytestmark = pytest.mark.integration


def _requests_of(h: BridgeHarness, user_id: str, offset: int) -> list[str]:
    with (h.synapse.workdir / "access.log").open("rb") as f:
        f.seek(offset)
        lines = f.read().decode("utf-8", "replace").splitlines()
    return [line for line in lines if "{" + user_id in line]


async def test_least_recently_used_devices_close_and_reopen_without_a_request(
        bridge: BridgeHarness, tmp_path: Path) -> None:
    async with in_place_of(bridge), own_bridge(bridge, tmp_path, max_open_devices=2) as h:
        b = h.running.bridge
        staff = await staff_login(h.synapse.synapse, h.admin.localpart, h.admin.password)
        try:
            # One ghost per room, with staff, as in portals (ghosts sharing a room would
            # send each other room keys, and a to-device event opens its device).
            rooms: dict[UserID, RoomID] = {}
            for _ in range(3):
                status, body = await h.running.call("POST", "/admin/v1/rooms",
                                                    {"name": "Consulta", "kind": "citizen"})
                assert status == 201, body
                room_id = RoomID(body["room_id"])
                await staff.join(room_id)
                ghost = await b.ghosts.create()
                await b.api.invite(b.ghosts.bot, room_id, ghost)
                await b.api.join(ghost, room_id)
                rooms[ghost] = room_id
            ghosts = list(rooms)

            async def say(ghost: UserID, text: str) -> None:
                device = await b.ghosts.device(ghost)
                await device.send(b.api, rooms[ghost], "m.room.message",
                                  {"msgtype": "m.text", "body": text})
                found = await staff.wait_for_message(rooms[ghost], lambda e: e.body == text)
                assert found.sender == ghost

            await say(ghosts[0], "primero")
            await say(ghosts[1], "segundo")
            # Two ghosts are open (the bot is not counted); a third closes the least
            # recently used, once it has been unused for EVICT_GRACE_SECONDS.
            await asyncio.sleep(devices_module.EVICT_GRACE_SECONDS + 0.5)
            await say(ghosts[2], "tercero")
            open_ghosts = [g for g in ghosts if b.devices.get_open(g) is not None]
            assert open_ghosts == ghosts[1:], "the least recently used ghost was closed"
            status, metrics = await h.running.call("GET", "/metrics", token=None)
            assert "civic_bridge_open_devices 3.0" in metrics  # the bot and two ghosts

            # Opening the closed one again reads its store: no request to Synapse.
            offset = (h.synapse.workdir / "access.log").stat().st_size
            await b.ghosts.device(ghosts[0])
            await asyncio.sleep(1)  # anything its task would do of its own accord
            assert _requests_of(h, ghosts[0], offset) == []
            # And it still speaks, with its own device and keys: staff decrypt it.
            await say(ghosts[0], "vuelvo a estar")
        finally:
            await staff.close()
