"""The Matrix core against a real Synapse: rooms, ghosts with their own devices, relay."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from typing import Any

import pytest

from bridge.matrix.appservice import transaction_key
from bridge.matrix.relay import StaffEvent
from bridge.types import RoomID, UserID
from tests.fixtures.bridge import BridgeHarness
from tests.fixtures.staff import StaffClient, staff_login

pytestmark = pytest.mark.integration


async def room_state(h: BridgeHarness, room_id: str) -> dict[tuple[str, str], dict[str, Any]]:
    b = h.running.bridge
    state = await b.api.get_state(b.ghosts.bot, RoomID(room_id))
    return {(e["type"], e["state_key"]): e for e in state}


async def create_room(h: BridgeHarness, kind: str, name: str = "Equipo") -> str:
    status, body = await h.running.call("POST", "/admin/v1/rooms", {"name": name, "kind": kind})
    assert status == 201, body
    return str(body["room_id"])


class Captured:
    """Staff events the bridge handed to its callback."""

    def __init__(self) -> None:
        self.events: list[StaffEvent] = []
        self.changed = asyncio.Event()

    async def __call__(self, event: StaffEvent) -> None:
        self.events.append(event)
        self.changed.set()

    async def wait_for(self, predicate: Any, timeout: float = 30) -> StaffEvent:
        async def loop() -> StaffEvent:
            while True:
                for ev in self.events:
                    if predicate(ev):
                        return ev
                self.changed.clear()
                await self.changed.wait()
        return await asyncio.wait_for(loop(), timeout)


@pytest.fixture
def captured(bridge: BridgeHarness) -> Captured:
    cap = Captured()
    bridge.running.bridge.relay.add_handler(cap)
    return cap


async def test_admin_api_requires_token(bridge: BridgeHarness) -> None:
    status, body = await bridge.running.call("GET", "/admin/v1/rooms", token=None)
    assert status == 401 and body["errcode"] == "M_UNKNOWN_TOKEN"
    status, body = await bridge.running.call("GET", "/admin/v1/rooms", token="wrong" * 5)
    assert status == 401 and body["errcode"] == "M_UNKNOWN_TOKEN"  # unknown token
    status, body = await bridge.running.call("POST", "/admin/v1/rooms",
                                             {"name": "x", "kind": "nonsense"})
    assert status == 400 and "kind must be one of" in body["error"]


async def test_room_has_agency_controlled_state(bridge: BridgeHarness) -> None:
    room_id = await create_room(bridge, "team", "Equipo de obras")
    state = await room_state(bridge, room_id)
    bot = bridge.running.bridge.ghosts.bot

    assert state[("m.room.encryption", "")]["content"]["algorithm"] == "m.megolm.v1.aes-sha2"
    assert state[("m.room.history_visibility", "")]["content"] == {"history_visibility": "joined"}
    assert state[("m.room.guest_access", "")]["content"] == {"guest_access": "forbidden"}
    assert state[("m.room.join_rules", "")]["content"]["join_rule"] == "invite"
    create = state[("m.room.create", "")]
    assert create["sender"] == bot
    assert create["content"]["m.federate"] is False
    assert create["content"]["room_version"] == "12"
    levels = state[("m.room.power_levels", "")]["content"]
    assert bot not in levels["users"]  # v12: the creator's power is implicit
    assert levels["users"] == {bridge.admin.user_id: 100}
    for key in ("invite", "kick", "ban", "redact", "state_default"):
        assert levels[key] == 50, key
    assert levels["events_default"] == 0 and levels["users_default"] == 0
    assert state[("m.room.member", bridge.admin.user_id)]["content"]["membership"] == "invite"

    # Not published in the room directory.
    b = bridge.running.bridge
    visibility = await b.api.request("GET", f"/_matrix/client/v3/directory/list/room/{room_id}")
    assert visibility["visibility"] == "private"

    status, rooms = await bridge.running.call("GET", "/admin/v1/rooms")
    assert status == 200
    assert {"room_id": room_id, "kind": "team", "name": "Equipo de obras",
            "topic": None} in rooms


async def test_announcement_room_only_staff_post(bridge: BridgeHarness) -> None:
    room_id = await create_room(bridge, "announcement", "Avisos")
    levels = (await room_state(bridge, room_id))[("m.room.power_levels", "")]["content"]
    assert levels["events_default"] == 50


async def test_members_and_invite(bridge: BridgeHarness) -> None:
    room_id = await create_room(bridge, "citizen", "Vecinos")
    status, body = await bridge.running.call(
        "POST", f"/admin/v1/rooms/{room_id}/invite", {"user_id": bridge.desk.user_id})
    assert status == 200, body
    status, members = await bridge.running.call("GET", f"/admin/v1/rooms/{room_id}/members")
    assert status == 200
    by_id = {m["user_id"]: m for m in members}
    assert by_id[bridge.desk.user_id]["membership"] == "invite"
    assert by_id[bridge.desk.user_id]["kind"] == "staff"
    assert by_id[bridge.admin.user_id]["power"] == 100
    assert by_id[bridge.running.bridge.ghosts.bot]["kind"] == "bot"
    status, body = await bridge.running.call(
        "POST", f"/admin/v1/rooms/{room_id}/invite", {"user_id": "not-an-mxid"})
    assert status == 400
    status, body = await bridge.running.call(
        "GET", "/admin/v1/rooms/!unknown/members")
    assert status == 404


async def _ghost_in_room(h: BridgeHarness, room_id: str) -> UserID:
    b = h.running.bridge
    ghost = await b.ghosts.create()
    await b.api.invite(b.ghosts.bot, RoomID(room_id), ghost)
    await b.api.join(ghost, RoomID(room_id))
    return ghost


async def _staff_in_new_room(h: BridgeHarness) -> tuple[StaffClient, str]:
    room_id = await create_room(h, "citizen", "Consulta")
    staff = await staff_login(h.synapse.synapse, h.admin.localpart, h.admin.password)
    await staff.join(room_id)
    return staff, room_id


async def test_ghost_message_decrypts_for_staff_from_ghost_own_device(
        bridge: BridgeHarness) -> None:
    staff, room_id = await _staff_in_new_room(bridge)
    try:
        ghost = await _ghost_in_room(bridge, room_id)
        b = bridge.running.bridge
        body = f"hola desde un fantasma {secrets.token_hex(4)}"
        event_id = await b.relay.send_as(ghost, RoomID(room_id),
                                         {"msgtype": "m.text", "body": body})
        msg = await staff.wait_for_message(room_id, lambda m: m.body == body)
        assert msg.sender == ghost and msg.event_id == event_id
        assert msg.decrypted
        # Encrypted by the ghost's own device, not the bot's.
        device = b.devices.get_open(ghost)
        assert device is not None
        assert msg.sender_key == device.client.olm.account.identity_keys["curve25519"]
        assert device.client.device_id != b.devices.get_open(b.ghosts.bot).client.device_id
    finally:
        await staff.close()


async def test_bridge_decrypts_staff_message(bridge: BridgeHarness, captured: Captured) -> None:
    staff, room_id = await _staff_in_new_room(bridge)
    try:
        body = f"respuesta del personal {secrets.token_hex(4)}"
        event_id = await staff.send_text(room_id, body)
        event = await captured.wait_for(lambda e: e.event_id == event_id)
        assert event.encrypted and event.type == "m.room.message"
        assert event.content["body"] == body and event.sender == bridge.admin.user_id
    finally:
        await staff.close()


async def test_ghost_identity_has_no_digits_of_identifier(bridge: BridgeHarness) -> None:
    phone = "+34 612 345 678"
    b = bridge.running.bridge
    citizen_digits = set(re.sub(r"\D", "", phone))
    ghost = await b.ghosts.create()
    profile = await b.api.request("GET", f"/_matrix/client/v3/profile/{ghost}")
    for text in (ghost.split(":")[0], profile["displayname"].replace("Ciudadano/a", "")):
        assert not citizen_digits & set(text), text


async def test_duplicate_transaction_is_handled_once(bridge: BridgeHarness,
                                                     captured: Captured) -> None:
    room_id = await create_room(bridge, "team", "Duplicados")
    event_id = f"$dup{secrets.token_hex(8)}"
    event = {"type": "m.room.message", "room_id": room_id, "event_id": event_id,
             "sender": bridge.admin.user_id, "origin_server_ts": 1,
             "content": {"msgtype": "m.text", "body": "una vez"}}
    txn = f"txn{secrets.token_hex(6)}"
    raw = json.dumps({"events": [event]}).encode()
    for _ in range(3):
        status, _ = await bridge.running.call(
            "PUT", f"/_matrix/app/v1/transactions/{txn}", raw, token="hs")
        assert status == 200
    # The same event inside another transaction is still one handling.
    status, _ = await bridge.running.call(
        "PUT", f"/_matrix/app/v1/transactions/{txn}b", raw, token="hs")
    assert status == 200
    await captured.wait_for(lambda e: e.event_id == event_id)
    await bridge.running.idle()
    await asyncio.sleep(0.2)
    assert [e.event_id for e in captured.events].count(event_id) == 1


async def test_transactions_reject_bad_auth_and_bodies(bridge: BridgeHarness) -> None:
    path = f"/_matrix/app/v1/transactions/bad{secrets.token_hex(4)}"
    assert (await bridge.running.call("PUT", path, b'{"events": []}', token=None))[0] == 401
    assert (await bridge.running.call("PUT", path, b'{"events": []}', token="x" * 20))[0] == 403
    for raw in (b"not json", b'{"events": {}}', b'[1,2]', b'{"events": [{"type": 1}]}'):
        status, body = await bridge.running.call("PUT", path, raw, token="hs")
        assert status == 400, raw
        assert body["errcode"] == "M_BAD_JSON"
    # Still alive and the txn id was not burnt by the bad bodies.
    assert (await bridge.running.call("PUT", path, b'{"events": []}', token="hs"))[0] == 200
    assert (await bridge.running.call("GET", "/health", token=None))[0] == 200
    assert (await bridge.running.call("POST", "/_matrix/app/v1/ping", {}, token="hs"))[0] == 200
    status, _ = await bridge.running.call("GET", "/_matrix/app/v1/users/@cb_nobody:localhost",
                                          token="hs")
    assert status == 404


async def test_everything_still_works_after_restart(bridge: BridgeHarness) -> None:
    staff, room_id = await _staff_in_new_room(bridge)
    try:
        ghost = await _ghost_in_room(bridge, room_id)
        b = bridge.running.bridge
        await b.relay.send_as(ghost, RoomID(room_id), {"msgtype": "m.text", "body": "antes"})
        await staff.wait_for_message(room_id, lambda m: m.body == "antes")
        device = b.devices.get_open(ghost)
        assert device is not None
        before = (device.client.device_id, device.client.olm.account.identity_keys["ed25519"])
        txn = f"restart{secrets.token_hex(4)}"
        events = [{"event_id": f"${txn}", "type": "org.example.ignored", "room_id": room_id,
                   "sender": "@someone:localhost", "content": {}}]
        assert (await bridge.running.call("PUT", f"/_matrix/app/v1/transactions/{txn}",
                                          json.dumps({"events": events}).encode(),
                                          token="hs"))[0] == 200

        await bridge.running.stop()
        await bridge.running.start()
        b = bridge.running.bridge
        cap = Captured()
        b.relay.add_handler(cap)

        await b.relay.send_as(ghost, RoomID(room_id), {"msgtype": "m.text", "body": "después"})
        msg = await staff.wait_for_message(room_id, lambda m: m.body == "después")
        device = b.devices.get_open(ghost)
        assert device is not None
        after = (device.client.device_id, device.client.olm.account.identity_keys["ed25519"])
        assert after == before  # same device, same keys: no new identity after a restart
        assert msg.sender_key == device.client.olm.account.identity_keys["curve25519"]

        event_id = await staff.send_text(room_id, "staff tras reinicio")
        event = await cap.wait_for(lambda e: e.event_id == event_id)
        assert event.content["body"] == "staff tras reinicio"
        # A transaction id seen before the restart is still a no-op.
        assert await b.db.transactions.seen(transaction_key(txn, events))
    finally:
        await staff.close()


async def test_reused_txn_id_with_new_events_is_not_dropped(bridge: BridgeHarness,
                                                            captured: Captured) -> None:
    """Synapse on SQLite restarts its transaction counter when it restarts: the same
    txnId can carry new events, which must not be mistaken for a retry."""
    room_id = await create_room(bridge, "team", "Reinicio de Synapse")
    txn = f"txn{secrets.token_hex(6)}"
    ids = [f"$reuse{secrets.token_hex(8)}" for _ in range(2)]
    for event_id in ids:
        raw = json.dumps({"events": [{
            "type": "m.room.message", "room_id": room_id, "event_id": event_id,
            "sender": bridge.admin.user_id, "origin_server_ts": 1,
            "content": {"msgtype": "m.text", "body": event_id}}]}).encode()
        status, _ = await bridge.running.call(
            "PUT", f"/_matrix/app/v1/transactions/{txn}", raw, token="hs")
        assert status == 200
    for event_id in ids:
        await captured.wait_for(lambda e, i=event_id: e.event_id == i)
