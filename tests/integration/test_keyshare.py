"""Staff devices that appear after a ghost spoke still read its earlier messages.

A portal-like room (history visibility `invited`), a ghost speaks, THEN a staff member
logs in a brand-new device: the ghost's device sends it the earlier session's key.
Users who left or were never members get nothing. The new devices here are verified
(cross-signed) by their owner, as the default `e2ee.forward_keys_to` requires; unsigned
ones are test_keyshare_trust.py's subject.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any
from urllib.parse import quote

import nio
import pytest

from bridge.matrix.devices import Device
from bridge.types import RoomID, UserID
from tests.fixtures.bridge import BridgeHarness, StaffAccount
from tests.fixtures.staff import StaffClient, staff_login, verified_login
from tests.integration.test_matrix_core import _ghost_in_room, create_room
from tests.integration.test_moderation import create_room as create_knock_room

pytestmark = pytest.mark.integration


async def _account(h: BridgeHarness, prefix: str) -> StaffAccount:
    localpart = f"{prefix}_{secrets.token_hex(3)}"
    password = secrets.token_urlsafe(16)
    user_id = await h.synapse.synapse.register_user(localpart, password)
    return StaffAccount(user_id, localpart, password)


async def _portal_like(h: BridgeHarness, staff: StaffAccount) -> tuple[str, UserID]:
    """A citizen room with portal history visibility, `staff` invited, a ghost joined."""
    b = h.running.bridge
    room_id = await create_room(h, "citizen", "Portal")
    await b.api.send_state(b.ghosts.bot, RoomID(room_id), "m.room.history_visibility",
                           {"history_visibility": "invited"})
    status, body = await h.running.call("POST", f"/admin/v1/rooms/{room_id}/invite",
                                        {"user_id": staff.user_id})
    assert status == 200, body
    return room_id, await _ghost_in_room(h, room_id)


async def _say(h: BridgeHarness, ghost: UserID, room_id: str, text: str) -> str:
    body = f"{text} {secrets.token_hex(4)}"
    await h.running.bridge.relay.send_as(ghost, RoomID(room_id),
                                         {"msgtype": "m.text", "body": body})
    return body


async def _join(h: BridgeHarness, member: StaffClient, room_id: str) -> None:
    """`member` joins, and the bridge has seen it: a ghost encrypts for the members it
    knows, so a message sent before the join reached the bridge (in a transaction)
    would rightly leave the newcomer out, as any client's would."""
    seen = asyncio.Event()

    async def on_member(event: dict[str, Any]) -> None:
        if (event.get("room_id"), event.get("state_key")) == (room_id, member.user_id) \
                and event.get("content", {}).get("membership") == "join":
            seen.set()

    members = await member.client.joined_members(room_id)
    if isinstance(members, nio.JoinedMembersResponse) and \
            member.user_id in {m.user_id for m in members.members}:
        return  # another device of a member: nothing changes, no event to wait for
    h.running.bridge.relay.add_member_handler(on_member)
    await member.join(room_id)
    await asyncio.wait_for(seen.wait(), 30)


def _ghost_device(h: BridgeHarness, ghost: UserID) -> Device:
    device = h.running.bridge.devices.get_open(ghost)
    assert device is not None
    return device


def _got_forward(device: Device, curve25519: str) -> bool:
    return any(curve == curve25519 for _, curve in device.keys.ledger.delivered)


def _curve(staff: StaffClient) -> str:
    return str(staff.client.olm.account.identity_keys["curve25519"])


async def test_late_device_reads_earlier_message_after_next_send(
        bridge: BridgeHarness) -> None:
    staff = await _account(bridge, "late")
    room_id, ghost = await _portal_like(bridge, staff)
    m1 = await _say(bridge, ghost, room_id, "primer mensaje")

    late = await verified_login(bridge.synapse.synapse, staff.localpart, staff.password)
    try:
        await _join(bridge, late, room_id)
        m2 = await _say(bridge, ghost, room_id, "segundo mensaje")
        first = await late.wait_for_message(room_id, lambda m: m.body == m1, timeout=30)
        second = await late.wait_for_message(room_id, lambda m: m.body == m2, timeout=30)
        assert first.sender == ghost and second.sender == ghost
        # Sent by the session's creator as a room key: fully authenticated, not forwarded.
        assert first.sender_key == _ghost_device(bridge, ghost).client.olm.account \
            .identity_keys["curve25519"]
        assert _got_forward(_ghost_device(bridge, ghost), _curve(late))
    finally:
        await late.close()


async def test_late_device_after_a_restart_reads_messages_from_before_it(
        bridge: BridgeHarness) -> None:
    """The ledger is in the database: a device that appears after a restart gets the
    earlier session's key, and one that had it before the restart is not sent it again."""
    staff = await _account(bridge, "restart")
    room_id, ghost = await _portal_like(bridge, staff)
    early = await staff_login(bridge.synapse.synapse, staff.localpart, staff.password)
    try:
        await _join(bridge, early, room_id)
        m1 = await _say(bridge, ghost, room_id, "antes del reinicio")
        await early.wait_for_message(room_id, lambda m: m.body == m1, timeout=30)
        session = str(_ghost_device(bridge, ghost).client.olm
                      .outbound_group_sessions[room_id].id)
        kept = await bridge.running.bridge.db.room_keys.load(ghost)
        assert [(k.session_id, k.message_index) for k in kept.keys] == [(session, 0)]
        assert staff.user_id in kept.keys[0].audience
        resent: list[str] = []  # room keys of the first session the early device gets again

        def room_key(event: nio.RoomKeyEvent) -> None:
            if event.session_id == session:
                resent.append(event.session_id)

        early.client.add_to_device_callback(room_key, nio.RoomKeyEvent)

        await bridge.running.stop()
        await bridge.running.start()

        late = await verified_login(bridge.synapse.synapse, staff.localpart, staff.password)
        try:
            await _join(bridge, late, room_id)
            m2 = await _say(bridge, ghost, room_id, "después del reinicio")
            earlier = await late.wait_for_message(room_id, lambda m: m.body == m1, timeout=30)
            await late.wait_for_message(room_id, lambda m: m.body == m2, timeout=30)
            device = _ghost_device(bridge, ghost)
            assert earlier.sender == ghost
            assert earlier.sender_key == device.client.olm.account.identity_keys["curve25519"]
            await device.upkeep()  # every trigger has run at least once
            ledger = device.keys.ledger
            assert ledger.delivered[(session, _curve(late))] == 0
            assert ledger.delivered[(session, _curve(early))] == 0
            assert device.keys.sent >= 1
            # The early device had the key before the restart: it is not sent again.
            await early.sync_once()
            assert resent == []
        finally:
            await late.close()
    finally:
        await early.close()


async def test_keys_of_a_room_the_ghost_left_are_deleted(bridge: BridgeHarness) -> None:
    staff = await _account(bridge, "left")
    room_id, ghost = await _portal_like(bridge, staff)
    other_room, _ = await _portal_like(bridge, staff)
    b = bridge.running.bridge
    await b.api.invite(b.ghosts.bot, RoomID(other_room), ghost)
    await b.api.join(ghost, RoomID(other_room))
    await _say(bridge, ghost, room_id, "en la sala que deja")
    await _say(bridge, ghost, other_room, "en la sala que sigue")
    assert {k.room_id for k in (await b.db.room_keys.load(ghost)).keys} == {room_id, other_room}

    await b.api.leave(ghost, RoomID(room_id))
    device = _ghost_device(bridge, ghost)
    device.room_changed(room_id)
    await device.upkeep()  # reads the room again, finds the ghost gone, forwards
    kept = await b.db.room_keys.load(ghost)
    assert {k.room_id for k in kept.keys} == {other_room}
    sessions = {k.session_id for k in kept.keys}
    assert kept.deliveries and {d.session_id for d in kept.deliveries} <= sessions
    assert device.keys.ledger.rooms() == {other_room}


@pytest.mark.parametrize("restart", [False, True], ids=["running", "after_restart"])
async def test_join_alone_brings_earlier_keys(bridge: BridgeHarness, restart: bool) -> None:
    """No further message from the ghost: the join wakes its device, which forwards.
    After a restart the device is closed until it speaks; the join opens it (it kept
    the key in the database) and it forwards just the same."""
    staff = await _account(bridge, "joiner")
    room_id, ghost = await _portal_like(bridge, staff)
    m1 = await _say(bridge, ghost, room_id, "antes de entrar")
    if restart:
        await bridge.running.stop()
        await bridge.running.start()
        assert bridge.running.bridge.devices.get_open(ghost) is None

    late = await verified_login(bridge.synapse.synapse, staff.localpart, staff.password)
    try:
        await _join(bridge, late, room_id)
        msg = await late.wait_for_message(room_id, lambda m: m.body == m1, timeout=45)
        assert msg.sender == ghost
    finally:
        await late.close()


async def test_left_and_never_invited_users_get_nothing(bridge: BridgeHarness) -> None:
    staff = await _account(bridge, "stays")
    leaver = await _account(bridge, "leaver")
    outsider = await _account(bridge, "outsider")
    room_id, ghost = await _portal_like(bridge, staff)
    b = bridge.running.bridge
    status, body = await bridge.running.call("POST", f"/admin/v1/rooms/{room_id}/invite",
                                             {"user_id": leaver.user_id})
    assert status == 200, body
    first_leaver = await staff_login(bridge.synapse.synapse, leaver.localpart, leaver.password)
    try:
        await _join(bridge, first_leaver, room_id)
        await _say(bridge, ghost, room_id, "con todos dentro")
        await first_leaver.client.room_leave(room_id)
    finally:
        await first_leaver.close()

    # New devices: the leaver's (no longer a member) and an outsider's (never one),
    # then a staff member's new device, which IS owed the key.
    late_leaver = await verified_login(bridge.synapse.synapse, leaver.localpart, leaver.password)
    late_outsider = await verified_login(bridge.synapse.synapse, outsider.localpart,
                                      outsider.password)
    late_staff = await verified_login(bridge.synapse.synapse, staff.localpart, staff.password)
    try:
        await _join(bridge, late_staff, room_id)
        m2 = await _say(bridge, ghost, room_id, "después")
        await late_staff.wait_for_message(room_id, lambda m: m.body == m2, timeout=30)
        device = _ghost_device(bridge, ghost)
        await device.upkeep()  # every trigger has run at least once
        assert _got_forward(device, _curve(late_staff))
        assert not _got_forward(device, _curve(late_leaver))
        assert not _got_forward(device, _curve(late_outsider))
        room = device.client.rooms[room_id]
        assert leaver.user_id not in room.users and outsider.user_id not in room.users
        assert b.ghosts.bot in room.users  # the bot is a member but in our namespace
        members = {room_id: set(room.users)}
        targets = device.keys._targets(room.users)
        assert not [o for o in device.keys.ledger.owed(members, targets, b.ghosts.is_ours)
                    if b.ghosts.is_ours(o.target.user_id)]
    finally:
        for client in (late_leaver, late_outsider, late_staff):
            await client.close()


async def test_a_removed_member_gets_no_key_for_later_messages(bridge: BridgeHarness) -> None:
    """Kicking a member ends the ghost's Megolm session at once: the next message goes
    out under a key the removed member's device never receives."""
    staff = await _account(bridge, "stays")
    removed = await _account(bridge, "removed")
    room_id, ghost = await _portal_like(bridge, staff)
    status, body = await bridge.running.call("POST", f"/admin/v1/rooms/{room_id}/invite",
                                             {"user_id": removed.user_id})
    assert status == 200, body
    stays = await staff_login(bridge.synapse.synapse, staff.localpart, staff.password)
    gone = await staff_login(bridge.synapse.synapse, removed.localpart, removed.password)
    try:
        await _join(bridge, stays, room_id)
        await _join(bridge, gone, room_id)
        m1 = await _say(bridge, ghost, room_id, "antes de la expulsión")
        await gone.wait_for_message(room_id, lambda m: m.body == m1, timeout=30)
        olm = _ghost_device(bridge, ghost).client.olm
        first = str(olm.outbound_group_sessions[room_id].id)

        status, body = await bridge.running.call(
            "POST", f"/admin/v1/rooms/{room_id}/kick",
            {"user_id": removed.user_id, "reason": "insultos"})
        assert status == 200, body
        m2 = await _say(bridge, ghost, room_id, "después de la expulsión")
        await stays.wait_for_message(room_id, lambda m: m.body == m2, timeout=30)
        second = str(olm.outbound_group_sessions[room_id].id)
        assert second != first

        ghost_key = str(olm.account.identity_keys["curve25519"])
        await gone.sync_once()  # everything sent to the removed device has arrived
        store = gone.client.olm.inbound_group_store
        assert store.get(room_id, ghost_key, first) is not None
        assert store.get(room_id, ghost_key, second) is None
        assert stays.client.olm.inbound_group_store.get(room_id, ghost_key, second) is not None
    finally:
        for client in (stays, gone):
            await client.close()


async def test_a_knocking_user_gets_no_room_key(bridge: BridgeHarness) -> None:
    """Knocking asks to enter; until let in, the user's devices get no room key."""
    room_id = await create_knock_room(bridge, "Con llamada", join_rule="knock")
    ghost = await _ghost_in_room(bridge, room_id)
    account = await _account(bridge, "knocks")
    knocker = await staff_login(bridge.synapse.synapse, account.localpart, account.password)
    try:
        status, body = await bridge.synapse.synapse.request(
            "POST", f"/_matrix/client/v3/knock/{quote(room_id, safe='')}",
            {"reason": "quiero participar"}, knocker.client.access_token)
        assert status == 200, body
        await _say(bridge, ghost, room_id, "solo para miembros")
        device = _ghost_device(bridge, ghost)
        session = str(device.client.olm.outbound_group_sessions[room_id].id)
        assert account.user_id not in device.client.rooms[room_id].users
        await knocker.sync_once()
        ghost_key = str(device.client.olm.account.identity_keys["curve25519"])
        assert knocker.client.olm.inbound_group_store.get(room_id, ghost_key, session) is None
    finally:
        await knocker.close()


async def test_invited_users_get_no_keys_where_history_starts_at_joining(
        bridge: BridgeHarness) -> None:
    """An agency room shows history only from joining: a member who is only invited
    gets no key for what is sent meanwhile, and reads what is sent after joining."""
    room_id = await create_room(bridge, "citizen", "Equipo")  # history_visibility joined
    ghost = await _ghost_in_room(bridge, room_id)
    account = await _account(bridge, "invited")
    status, body = await bridge.running.call("POST", f"/admin/v1/rooms/{room_id}/invite",
                                             {"user_id": account.user_id})
    assert status == 200, body
    invited = await staff_login(bridge.synapse.synapse, account.localpart, account.password)
    try:
        await _say(bridge, ghost, room_id, "antes de entrar")
        device = _ghost_device(bridge, ghost)
        olm = device.client.olm
        before = str(olm.outbound_group_sessions[room_id].id)
        assert device.client.rooms[room_id].history_visibility == "joined"
        await invited.sync_once()
        ghost_key = str(olm.account.identity_keys["curve25519"])
        assert invited.client.olm.inbound_group_store.get(room_id, ghost_key, before) is None

        await _join(bridge, invited, room_id)
        after = await _say(bridge, ghost, room_id, "después de entrar")
        await invited.wait_for_message(room_id, lambda m: m.body == after, timeout=30)
        await device.upkeep()  # any forwarding owed has gone out
        await invited.sync_once()
        assert str(olm.outbound_group_sessions[room_id].id) != before
        assert invited.client.olm.inbound_group_store.get(room_id, ghost_key, before) is None
    finally:
        await invited.close()
