"""Trust as Element sees it: the independent js-sdk checker reads the shield on bridged messages.

The checker (tests/js/checker.mjs) is matrix-js-sdk with Rust crypto, the stack Element
runs. A ghost's message must decrypt there, come from the ghost's own device and show no
shield (NONE); a device nobody cross-signed shows RED / UNSIGNED_DEVICE (the control that
proves these tests can fail). The cross-signing identity survives restarts unchanged and
a ghost's replacement device is signed with the same identity.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from bridge.db import Database
from bridge.db.models import GhostRow
from bridge.matrix import crosssign
from bridge.matrix.ghosts import new_device_id
from bridge.privacy import Cipher, DecryptError
from bridge.services import Bridge
from bridge.types import RoomID, UserID
from tests.fixtures.bridge import BridgeHarness, StaffAccount
from tests.fixtures.jschecker import Checker, run_checker
from tests.fixtures.staff import staff_client
from tests.integration.test_matrix_core import Captured, create_room

pytestmark = pytest.mark.integration

# After a bridge restart Synapse may hold transactions back (it backs off 2, 4, 8 s...
# while the appservice port was down), so anything waiting on a transaction is generous.
TXN_TIMEOUT = 60


# --- helpers ---------------------------------------------------------------------------------


async def checker_account(h: BridgeHarness) -> StaffAccount:
    """A fresh staff user for the checker to log in as (each run is a new device)."""
    localpart = f"checker_{secrets.token_hex(3)}"
    password = secrets.token_urlsafe(16)
    user_id = await h.synapse.synapse.register_user(localpart, password)
    return StaffAccount(user_id, localpart, password)


async def invite(h: BridgeHarness, room_id: str, user_id: str) -> None:
    status, body = await h.running.call("POST", f"/admin/v1/rooms/{room_id}/invite",
                                        {"user_id": user_id})
    assert status == 200, body


async def room_with_checker(h: BridgeHarness, name: str) -> tuple[str, StaffAccount]:
    room_id = await create_room(h, "citizen", name)
    account = await checker_account(h)
    await invite(h, room_id, account.user_id)
    return room_id, account


def checker(h: BridgeHarness, account: StaffAccount, room_id: str,
            **kwargs: Any) -> AbstractAsyncContextManager[Checker]:
    return run_checker(h.synapse.synapse.url, account.user_id, account.password, room_id,
                       **kwargs)


async def ghost_in_room(b: Bridge, room_id: str) -> UserID:
    ghost = await b.ghosts.create()
    await b.api.invite(b.ghosts.bot, RoomID(room_id), ghost)
    await b.api.join(ghost, RoomID(room_id))
    return ghost


async def send_text(b: Bridge, ghost: UserID, room_id: str, body: str) -> str:
    return await b.relay.send_as(ghost, RoomID(room_id), {"msgtype": "m.text", "body": body})


def device_id_of(b: Bridge, user_id: UserID) -> str:
    device = b.devices.get_open(user_id)
    assert device is not None, f"{user_id} has no open device"
    return str(device.client.device_id)


async def keys_query(b: Bridge, user_id: str, as_self: bool = False) -> dict[str, Any]:
    """`/keys/query` for all of `user_id`'s devices; the user-signing key is only shown to
    the user itself (`as_self`, masquerading with the as_token)."""
    return await b.api.request("POST", "/_matrix/client/v3/keys/query",
                               as_user=user_id if as_self else None,
                               json={"device_keys": {user_id: []}})


def _only_key(key_object: dict[str, Any]) -> bytes:
    (value,) = key_object["keys"].values()
    return base64.b64decode(value + "=" * (-len(value) % 4))


def assert_cross_signed(query: dict[str, Any], user_id: str, device_id: str) -> bytes:
    """The server holds a complete identity for `user_id` (self-signing key signed by the
    master key) and `device_id` carries a valid self-signing signature: checked only
    against what the server returned. Returns the master public key."""
    master_obj = query["master_keys"][user_id]
    self_obj = query["self_signing_keys"][user_id]
    assert master_obj["usage"] == ["master"] and self_obj["usage"] == ["self_signing"]
    master, self_signing = _only_key(master_obj), _only_key(self_obj)
    assert crosssign.verify_signed_json(self_obj, user_id, master), "self-signing key unsigned"
    device = query["device_keys"][user_id][device_id]
    assert crosssign.verify_signed_json(device, user_id, self_signing), (
        f"device {device_id} of {user_id} is not signed by its self-signing key: "
        f"{device.get('signatures')}")
    return master


async def expect_message(run: Checker, body: str, sender: str,
                         timeout: float = 60) -> dict[str, Any]:
    message = await run.wait_for("message", timeout)
    assert message["decrypted"] is True, run.report()
    assert message["body"] == body and message["sender"] == sender, run.report()
    return message


# --- tests -----------------------------------------------------------------------------------


async def test_ghost_message_shows_no_shield_from_ghost_own_device(
        bridge: BridgeHarness) -> None:
    room_id, account = await room_with_checker(bridge, "Escudo")
    b = bridge.running.bridge
    body = f"mensaje verificado {secrets.token_hex(4)}"
    async with checker(bridge, account, room_id, expect_body=body) as run:
        ghost = await ghost_in_room(b, room_id)
        await send_text(b, ghost, room_id, body)
        message = await expect_message(run, body, ghost)

    ghost_device = device_id_of(b, ghost)
    assert message["sender_device"] == ghost_device, run.report()
    assert message["sender_device"] != device_id_of(b, b.ghosts.bot)
    assert (message["shield_colour"], message["shield_reason"]) == ("NONE", None), run.report()


async def test_unsigned_device_shows_red_shield(bridge: BridgeHarness) -> None:
    """The control: the same checker, the same kind of room, a device nobody cross-signed."""
    room_id, account = await room_with_checker(bridge, "Sin firmar")
    staff = await staff_client(bridge.synapse.synapse, "unsigned")
    try:
        await invite(bridge, room_id, staff.user_id)
        body = f"sin firma cruzada {secrets.token_hex(4)}"
        async with checker(bridge, account, room_id, expect_body=body) as run:
            await staff.join(room_id)
            await staff.sync_once()  # learn the checker's device before encrypting
            await staff.send_text(room_id, body)
            message = await expect_message(run, body, staff.user_id)
        assert message["sender_device"] == staff.device_id, run.report()
        assert (message["shield_colour"], message["shield_reason"]) == (
            "RED", "UNSIGNED_DEVICE"), run.report()
    finally:
        await staff.close()


async def test_reply_from_element_stack_reaches_bridge_decrypted(
        bridge: BridgeHarness) -> None:
    room_id, account = await room_with_checker(bridge, "Respuesta")
    b = bridge.running.bridge
    captured = Captured()
    b.relay.add_handler(captured)
    body = f"pregunta {secrets.token_hex(4)}"
    reply = f"respuesta desde el SDK de Element {secrets.token_hex(4)}"
    async with checker(bridge, account, room_id, expect_body=body, reply=reply) as run:
        ghost = await ghost_in_room(b, room_id)
        await send_text(b, ghost, room_id, body)
        await expect_message(run, body, ghost)
        replied = await run.wait_for("replied", 30)
        assert await run.finish() == 0, run.report()

    event = await captured.wait_for(lambda e: e.event_id == replied["event_id"], TXN_TIMEOUT)
    assert event.encrypted and event.type == "m.room.message"
    assert event.sender == account.user_id and event.room_id == room_id
    assert event.content["body"] == reply


async def test_ghost_device_is_signed_before_use(bridge: BridgeHarness) -> None:
    room_id = await create_room(bridge, "citizen", "Firmado")
    b = bridge.running.bridge
    ghost = await ghost_in_room(b, room_id)
    # Opening the device (what the first send does) signs it before anything is sent.
    await b.ghosts.device(ghost)
    device_id = device_id_of(b, ghost)
    assert_cross_signed(await keys_query(b, ghost), ghost, device_id)

    await send_text(b, ghost, room_id, "primer mensaje")
    query = await keys_query(b, ghost)
    # The ghost has exactly one device, and it carries its self-signing key's signature.
    assert set(query["device_keys"][ghost]) == {device_id} == {device_id_of(b, ghost)}
    master = assert_cross_signed(query, ghost, device_id)
    seeds = await b.trust.seeds(ghost)
    assert master == seeds.master_public  # the identity the bridge stored, nothing else
    assert crosssign.verify_signed_json(query["device_keys"][ghost][device_id], ghost,
                                        seeds.self_signing_public)
    # A ghost's identity is its own: another ghost's keys differ.
    other = await ghost_in_room(b, room_id)
    await send_text(b, other, room_id, "otro")
    other_master = assert_cross_signed(await keys_query(b, other), other,
                                       device_id_of(b, other))
    assert other_master != master


async def test_cross_signing_seeds_persist_encrypted_across_restart(
        bridge: BridgeHarness) -> None:
    room_id, account = await room_with_checker(bridge, "Reinicio")
    b = bridge.running.bridge
    before_body = f"antes del reinicio {secrets.token_hex(4)}"
    async with checker(bridge, account, room_id, expect_body=before_body) as run:
        ghost = await ghost_in_room(b, room_id)
        await send_text(b, ghost, room_id, before_body)
        message = await expect_message(run, before_body, ghost)
        assert message["shield_colour"] == "NONE", run.report()
    device_id = device_id_of(b, ghost)
    bot_device = device_id_of(b, b.ghosts.bot)
    query = await keys_query(b, ghost, as_self=True)
    identity_before = (query["master_keys"][ghost], query["self_signing_keys"][ghost],
                       query["user_signing_keys"][ghost])

    # Stored encrypted: no seed in the clear, and only the data key (bound to this ghost)
    # opens it.
    seeds = await b.trust.seeds(ghost)
    ct = (await b.db.ghosts.get(ghost)).cross_signing_ct  # type: ignore[union-attr]
    assert ct
    for seed in (seeds.master, seeds.self_signing, seeds.user_signing):
        for encoded in (base64.b64encode(seed).decode().rstrip("="),
                        base64.urlsafe_b64encode(seed).decode().rstrip("="), seed.hex()):
            assert encoded not in ct
    assert "master" not in ct and "self_signing" not in ct
    with pytest.raises(DecryptError):
        Cipher(os.urandom(32)).decrypt(ct, aad=ghost.encode())
    with pytest.raises(DecryptError):
        b.privacy.cipher.decrypt(ct, aad=b.ghosts.bot.encode())  # bound to its user ID
    assert crosssign.CrossSigningSeeds.from_json(
        b.privacy.cipher.decrypt(ct, aad=ghost.encode())) == seeds

    await bridge.running.stop()
    await bridge.running.start()
    b = bridge.running.bridge

    # Same identity on the server and in the database: nothing was regenerated.
    query = await keys_query(b, ghost, as_self=True)
    assert (query["master_keys"][ghost], query["self_signing_keys"][ghost],
            query["user_signing_keys"][ghost]) == identity_before
    assert (await b.db.ghosts.get(ghost)).cross_signing_ct == ct  # type: ignore[union-attr]
    assert await b.trust.seeds(ghost) == seeds

    # The bot has its own identity and a signed device too.
    assert device_id_of(b, b.ghosts.bot) == bot_device
    bot_master = assert_cross_signed(await keys_query(b, b.ghosts.bot), b.ghosts.bot,
                                     bot_device)
    assert bot_master == (await b.trust.seeds(b.ghosts.bot)).master_public

    # A fresh Element-stack device (logged in after the restart) sees no shield, and the
    # bridge decrypts its reply (Synapse may still be backing off its transactions).
    captured = Captured()
    b.relay.add_handler(captured)
    after_body = f"después del reinicio {secrets.token_hex(4)}"
    reply = f"recibido tras reinicio {secrets.token_hex(4)}"
    async with checker(bridge, account, room_id, expect_body=after_body, reply=reply) as run:
        await send_text(b, ghost, room_id, after_body)
        message = await expect_message(run, after_body, ghost)
        replied = await run.wait_for("replied", 30)
    assert message["sender_device"] == device_id == device_id_of(b, ghost), run.report()
    assert (message["shield_colour"], message["shield_reason"]) == ("NONE", None), run.report()
    event = await captured.wait_for(lambda e: e.event_id == replied["event_id"], TXN_TIMEOUT)
    assert event.content["body"] == reply and event.sender == account.user_id


async def _set_device_id(url: str, user_id: UserID, device_id: str) -> None:
    db = await Database.open(url)
    try:
        async with db.session() as session:
            await session.execute(update(GhostRow).where(GhostRow.user_id == user_id)
                                  .values(device_id=device_id))
    finally:
        await db.close()


async def _lose_crypto_state(url: str, user_id: UserID) -> None:
    """The device's crypto state is gone (it lives in the database since revision 0016)."""
    db = await Database.open(url)
    try:
        assert await db.crypto.delete_owner(user_id) > 0
    finally:
        await db.close()


async def test_new_device_after_reset_is_signed_by_same_identity(
        bridge: BridgeHarness) -> None:
    """A ghost's device is replaced (crypto store lost, new device id): the new device is
    signed by the same identity, so Element still shows no shield and no identity reset.
    A second ghost whose new device never got its keys onto the server (crash between
    login and key upload: crypto state stored, keys missing) must not block startup."""
    room_id, account = await room_with_checker(bridge, "Nuevo dispositivo")
    b = bridge.running.bridge
    reset, half_open = await ghost_in_room(b, room_id), await ghost_in_room(b, room_id)
    for ghost in (reset, half_open):
        await send_text(b, ghost, room_id, "con el dispositivo original")
    old_device = device_id_of(b, reset)
    identity = {g: (await keys_query(b, g))["master_keys"][g] for g in (reset, half_open)}

    config = bridge.running.config
    await bridge.running.stop()
    await _lose_crypto_state(config.database.url, reset)
    new_devices = {reset: new_device_id(), half_open: new_device_id()}
    for ghost, device_id in new_devices.items():
        await _set_device_id(config.database.url, ghost, device_id)
    await bridge.running.start()
    b = bridge.running.bridge

    body = f"desde el dispositivo nuevo {secrets.token_hex(4)}"
    async with checker(bridge, account, room_id, expect_body=body) as run:
        await send_text(b, reset, room_id, body)
        message = await expect_message(run, body, reset)
    assert message["sender_device"] == new_devices[reset] == device_id_of(b, reset)
    assert message["sender_device"] != old_device
    assert (message["shield_colour"], message["shield_reason"]) == ("NONE", None), run.report()

    await send_text(b, half_open, room_id, "también firmado")
    for ghost, device_id in new_devices.items():
        query = await keys_query(b, ghost)
        assert query["master_keys"][ghost] == identity[ghost]  # no identity reset
        assert_cross_signed(query, ghost, device_id)


async def test_whatsapp_portal_as_element_sees_it(bridge: BridgeHarness) -> None:
    """The issue's journey: a citizen opts in on WhatsApp; the service desk, on the
    Element stack, sees the citizen's next message from the ghost's own cross-signed
    device with no shield, and its reply reaches the Graph API simulator."""
    from tests.integration.test_whatsapp import new_citizen, opt_in

    h, b = bridge, bridge.running.bridge
    citizen = new_citizen()
    journey = await opt_in(h, citizen, "Hola, soy vecina del barrio")
    await journey.desk.close()  # the desk now uses the independent client instead
    row = await b.db.citizens.by_index(b.privacy.index.digest(citizen.user_id))
    assert row is not None and row.ghost_user_id is not None
    ghost = row.ghost_user_id
    body = f"consulta por WhatsApp {secrets.token_hex(3)}"
    reply = f"respuesta desde Element {secrets.token_hex(3)}"
    async with checker(h, h.desk, journey.room_id, expect_body=body, expect_sender=ghost,
                       reply=reply) as run:
        # Give the ghost's device a moment to see the desk's new device (device-list
        # update over its /sync) before the citizen writes.
        await asyncio.sleep(3)
        assert await h.wa.deliver(h.webhook_url, h.wa.text_message(citizen, body)) == 200
        message = await expect_message(run, body, ghost, timeout=TXN_TIMEOUT)
        assert message["sender_device"] == device_id_of(b, ghost)
        assert message["sender_device"] != device_id_of(b, b.ghosts.bot)
        assert message["shield_colour"] == "NONE", run.report()
        await run.wait_for("replied", TXN_TIMEOUT)
    sent = await h.wa.wait_for_sent(lambda s: s.get("text", {}).get("body") == reply,
                                    timeout=TXN_TIMEOUT)
    assert sent["to"] == citizen.wa_id


async def test_admin_keys_prints_the_fingerprints_the_server_holds(
        bridge: BridgeHarness, tmp_path: Path) -> None:
    """`civic-bridge admin keys`: what staff compare to verify the bridge once."""
    import sys

    import yaml

    b = bridge.running.bridge
    ghost = await b.ghosts.create()
    await b.ghosts.device(ghost)  # opening the device creates and publishes its identity
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(bridge.running.config.model_dump(mode="json")),
                      encoding="utf-8")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "admin", "-c", str(config), "keys",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    printed = out.decode()
    for user_id in (ghost, b.ghosts.bot):
        master = assert_cross_signed(await keys_query(b, user_id), user_id,
                                     device_id_of(b, UserID(user_id)))
        assert crosssign.fingerprint(master) in printed
        assert user_id in printed
