"""The test harness itself, against a real Synapse: E2EE between staff, ghost registration."""

from __future__ import annotations

import pytest

from tests.fixtures.staff import StaffFactory
from tests.fixtures.synapse import SynapseHarness

pytestmark = pytest.mark.integration

REGISTER = "/_matrix/client/v3/register"


async def test_synapse_answers_on_loopback(synapse: SynapseHarness) -> None:
    status, versions = await synapse.synapse.request("GET", "/_matrix/client/versions")
    assert status == 200 and "v1.11" in versions["versions"]
    assert synapse.config.homeserver.url == synapse.synapse.url
    assert synapse.synapse.url.startswith("http://127.0.0.1:")
    assert synapse.as_port != synapse.synapse.port


async def test_register_and_login(synapse: SynapseHarness) -> None:
    hs = synapse.synapse
    assert await hs.register_user("harness_admin", "pw-harness-1", admin=True) == (
        "@harness_admin:localhost")
    user_id, token, device_id = await hs.login("harness_admin", "pw-harness-1", "FIXEDDEV")
    assert (user_id, device_id) == ("@harness_admin:localhost", "FIXEDDEV")
    status, whoami = await hs.request("GET", "/_matrix/client/v3/account/whoami", token=token)
    assert status == 200 and whoami["device_id"] == "FIXEDDEV"


async def test_encrypted_room_round_trip(staff_factory: StaffFactory) -> None:
    alice = await staff_factory("alice")
    bob = await staff_factory("bob")
    room_id = await alice.create_room(invite=[bob.user_id], name="harness")
    assert alice.client.rooms[room_id].encrypted
    await bob.join(room_id)

    event_id = await alice.send_text(room_id, "hola desde alice")
    got = await bob.wait_for_message(room_id, lambda e: e.body == "hola desde alice")
    assert (got.event_id, got.sender, got.decrypted) == (event_id, alice.user_id, True)

    reply_id = await bob.send_text(room_id, "hola alice")
    reply = await alice.wait_for_message(room_id, lambda e: e.event_id == reply_id)
    assert reply.decrypted and reply.body == "hola alice"


async def test_plaintext_send_in_encrypted_room(staff_factory: StaffFactory) -> None:
    alice = await staff_factory("alice")
    bob = await staff_factory("bob")
    room_id = await alice.create_room(invite=[bob.user_id])
    await bob.join(room_id)
    event_id = await alice.send_text(room_id, "en claro", encrypted=False)
    got = await bob.wait_for_message(room_id, lambda e: e.event_id == event_id)
    assert got.body == "en claro" and not got.decrypted


async def test_wait_for_message_times_out_with_report(staff_factory: StaffFactory) -> None:
    alice = await staff_factory("alice")
    room_id = await alice.create_room()
    with pytest.raises(AssertionError, match="saw no matching message"):
        await alice.wait_for_message(room_id, lambda e: False, timeout=0.5)


async def test_appservice_registers_ghost(synapse: SynapseHarness) -> None:
    prefix = synapse.config.appservice.ghost_prefix
    # inhibit_login: the registration carries io.element.msc4190, so Synapse gives an
    # appservice no tokens (the bridge never wants one: docs/e2ee.md).
    status, body = await synapse.synapse.request(
        "POST", REGISTER, {"type": "m.login.application_service", "username": f"{prefix}test1",
                           "inhibit_login": True},
        token=synapse.as_token)
    assert status == 200, body
    assert body["user_id"] == f"@{prefix}test1:localhost"


async def test_appservice_cannot_register_outside_namespace(synapse: SynapseHarness) -> None:
    status, body = await synapse.synapse.request(
        "POST", REGISTER, {"type": "m.login.application_service", "username": "outsider"},
        token=synapse.as_token)
    assert (status, body["errcode"]) == (400, "M_EXCLUSIVE"), body


async def test_users_cannot_take_ghost_names(synapse: SynapseHarness) -> None:
    prefix = synapse.config.appservice.ghost_prefix
    status, body = await synapse.synapse.request(
        "POST", REGISTER, {"username": f"{prefix}squatter", "password": "pw-squatter-1",
                           "auth": {"type": "m.login.dummy"}})
    assert (status, body["errcode"]) == (400, "M_EXCLUSIVE"), body
