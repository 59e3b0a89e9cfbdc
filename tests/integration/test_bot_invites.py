"""The bridge bot goes only where staff bring it: an invite from anyone else is
declined, counted, and never joined (a citizen's account cannot even make the room)."""

from __future__ import annotations

import asyncio
import secrets
from urllib.parse import quote

import pytest

from tests.fixtures.bridge import BridgeHarness
from tests.fixtures.citizens import citizen_from_link

pytestmark = pytest.mark.integration


def q(value: str) -> str:
    return quote(value, safe="")


async def bot_membership(h: BridgeHarness, room_id: str, token: str) -> str | None:
    bot = h.running.bridge.ghosts.bot
    status, body = await h.synapse.synapse.request(
        "GET", f"/_matrix/client/v3/rooms/{q(room_id)}/state/m.room.member/{q(bot)}",
        None, token)
    return str(body.get("membership")) if status == 200 else None


async def settled(h: BridgeHarness, room_id: str, token: str, timeout: float = 30) -> str:
    """The bot's membership once the bridge has acted on its invite."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (membership := await bot_membership(h, room_id, token)) in (None, "invite"):
        assert loop.time() < deadline, f"the bot's invite to {room_id} was never handled"
        await asyncio.sleep(0.2)
    assert membership is not None
    return membership


def declined(h: BridgeHarness) -> float:
    value = h.running.bridge.metrics.registry.get_sample_value(
        "civic_bridge_bot_invites_declined_total")
    return value or 0.0


async def test_citizen_cannot_invite_the_bot_anywhere(bridge: BridgeHarness) -> None:
    """First barrier: the homeserver's policy module refuses a citizen's room (and so
    the invite in it)."""
    citizen = await citizen_from_link(bridge)
    status, body = await bridge.synapse.synapse.request(
        "POST", "/_matrix/client/v3/createRoom",
        {"preset": "private_chat", "invite": [bridge.running.bridge.ghosts.bot]},
        citizen.token)
    assert status == 403 and body["errcode"] == "M_FORBIDDEN", body


async def test_invite_from_someone_not_staff_is_declined_and_counted(
        bridge: BridgeHarness) -> None:
    """Second barrier, the bridge's own (a homeserver without the module, an account
    it does not cover): a local user who is neither staff nor admin invites the bot
    to a room the bridge does not manage; the bot declines and never joins."""
    localpart, password = f"vecino_{secrets.token_hex(3)}", secrets.token_urlsafe(16)
    await bridge.synapse.synapse.register_user(localpart, password)
    _, token, _ = await bridge.synapse.synapse.login(localpart, password)
    before = declined(bridge)
    status, body = await bridge.synapse.synapse.request(
        "POST", "/_matrix/client/v3/createRoom",
        {"preset": "private_chat", "invite": [bridge.running.bridge.ghosts.bot]}, token)
    assert status == 200, body
    assert await settled(bridge, body["room_id"], token) == "leave"
    assert declined(bridge) == before + 1


async def test_staff_invite_is_accepted(bridge: BridgeHarness) -> None:
    """portals.staff and admin.users may bring the bot into a room (the management DM)."""
    for staff in (bridge.desk, bridge.admin):
        _, token, _ = await bridge.synapse.synapse.login(staff.localpart, staff.password)
        status, body = await bridge.synapse.synapse.request(
            "POST", "/_matrix/client/v3/createRoom",
            {"preset": "private_chat", "invite": [bridge.running.bridge.ghosts.bot]}, token)
        assert status == 200, body
        assert await settled(bridge, body["room_id"], token) == "join"
