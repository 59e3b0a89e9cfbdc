"""Earlier room keys go only to devices their owner cross-signed (`e2ee.forward_keys_to`).

A phished service-desk password lets an attacker log a new device in; unless the owner
verifies that session from another one (Element cross-signs it), the ghosts must not
hand it the keys of what was said before it appeared. It still receives the keys of
what is sent afterwards, as ordinary Megolm sharing does for every member's device.
"""

from __future__ import annotations

import asyncio

import pytest

from bridge.config import E2EEConfig
from bridge.matrix.devices import Device
from bridge.types import UserID
from tests.fixtures.bridge import BridgeHarness
from tests.fixtures.staff import (
    StaffClient,
    cross_sign_own_device,
    staff_login,
    verified_login,
)
from tests.integration.test_keyshare import (
    _account,
    _curve,
    _ghost_device,
    _portal_like,
    _say,
)

pytestmark = pytest.mark.integration


async def known_to(device: Device, client: StaffClient, timeout: float = 30) -> None:
    """Wait until the ghost's device knows `client`'s device (from the membership or
    device-list change the homeserver reports): a message sent before that is not
    shared with it (see docs/e2ee.md)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    olm = device.client.olm
    while olm.device_store[client.user_id].get(client.device_id) is None:
        assert loop.time() < deadline, "the ghost never learnt of the new device"
        await asyncio.sleep(0.1)


def _has_session(staff: StaffClient, room_id: str, sender_key: str, session_id: str) -> bool:
    return staff.client.olm.inbound_group_store.get(room_id, sender_key, session_id) is not None


async def test_only_cross_signed_devices_get_earlier_keys(bridge: BridgeHarness) -> None:
    staff = await _account(bridge, "verified")
    no_identity = await _account(bridge, "noidentity")
    room_id, ghost = await _portal_like(bridge, staff)
    status, body = await bridge.running.call("POST", f"/admin/v1/rooms/{room_id}/invite",
                                             {"user_id": no_identity.user_id})
    assert status == 200, body
    m1 = await _say(bridge, ghost, room_id, "antes de los dispositivos nuevos")
    device = _ghost_device(bridge, ghost)
    ghost_key = str(device.client.olm.account.identity_keys["curve25519"])
    first = str(device.client.olm.outbound_group_sessions[room_id].id)

    # The attacker's session (not verified), the owner's verified one, and a device of
    # a member who never set up cross-signing at all.
    rogue = await staff_login(bridge.synapse.synapse, staff.localpart, staff.password)
    good = await verified_login(bridge.synapse.synapse, staff.localpart, staff.password)
    plain = await staff_login(bridge.synapse.synapse, no_identity.localpart,
                              no_identity.password)
    try:
        await good.join(room_id)
        await plain.join(room_id)
        for client in (rogue, good, plain):
            await known_to(device, client)
        m2 = await _say(bridge, ghost, room_id, "después de los dispositivos nuevos")
        earlier = await good.wait_for_message(room_id, lambda m: m.body == m1, timeout=30)
        assert earlier.sender == ghost
        # Everyone reads what is sent after their device appeared.
        for client in (rogue, plain):
            await client.wait_for_message(room_id, lambda m: m.body == m2, timeout=30)
        await device.upkeep()  # every forwarding trigger has run at least once
        await device.forward_keys()
        for client in (rogue, plain):
            await client.sync_once()
            assert (first, _curve(client)) not in device.keys.ledger.delivered
            assert not _has_session(client, room_id, ghost_key, first)
        assert device.keys.ledger.delivered[(first, _curve(good))] == 0
        withheld = bridge.running.bridge.metrics.registry.get_sample_value(
            "civic_bridge_room_keys_withheld_total")
        assert withheld is not None and withheld >= 2  # rogue and plain, counted

        # Once the owner verifies the session from another one, it gets the key too.
        await cross_sign_own_device(rogue)
        await _say(bridge, ghost, room_id, "tras verificar la sesión")
        await rogue.wait_for_message(room_id, lambda m: m.body == m1, timeout=30)
    finally:
        for client in (rogue, good, plain):
            await client.close()


async def test_forward_keys_to_all_sends_to_unsigned_devices(bridge: BridgeHarness) -> None:
    running = bridge.running
    default = running.config
    await running.stop()
    running.config = default.model_copy(update={"e2ee": E2EEConfig(forward_keys_to="all")})
    await running.start()
    try:
        staff = await _account(bridge, "anydevice")
        room_id, ghost = await _portal_like(bridge, staff)
        m1 = await _say(bridge, ghost, room_id, "para cualquier dispositivo")
        late = await staff_login(bridge.synapse.synapse, staff.localpart, staff.password)
        try:
            await late.join(room_id)
            await _say(bridge, ghost, room_id, "siguiente")
            msg = await late.wait_for_message(room_id, lambda m: m.body == m1, timeout=30)
            assert msg.sender == UserID(ghost)
        finally:
            await late.close()
    finally:
        await running.stop()
        running.config = default
        await running.start()
