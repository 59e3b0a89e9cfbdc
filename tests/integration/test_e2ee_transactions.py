"""E2EE fed by appservice transactions (MSC2409/MSC3202) against the real Synapse, which
has both flags on (tests/fixtures/synapse.py): no device of the bridge calls /sync.

Requests are counted at the homeserver: the session Synapse writes an access log
(`synapse.access`, one line per request with the requester in braces), and a request
is the bridge's when its requester is the appservice's sender or a user of its
namespace (as_token with `?user_id=`, or a device token of a ghost or the bot).
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import nio
import pytest

import bridge.matrix.devices as devices_module
from bridge.devtools.synapse import LocalSynapse, free_port
from bridge.homeserver.settings import module_entry
from bridge.matrix.crypto_feed import FALLBACK_NOTE, NO_COUNTS, NO_TO_DEVICE
from bridge.matrix.ghosts import BOT_DISPLAY_NAME
from bridge.registration import registration_yaml
from bridge.types import RoomID, UserID
from tests.fixtures.bridge import BridgeHarness, RunningBridge
from tests.fixtures.staff import StaffClient, staff_login
from tests.fixtures.synapse import build_test_config

pytestmark = pytest.mark.integration

_REQUESTER = re.compile(r"\{(@[^}\s]+?)(?: as [^}]+)?\}")


def _access_log(h: BridgeHarness) -> Path:
    return h.synapse.workdir / "access.log"


def _bridge_lines(h: BridgeHarness, lines: list[str]) -> list[str]:
    cfg = h.synapse.config
    prefix = f"@{cfg.appservice.ghost_prefix}"
    sender = f"@{cfg.appservice.bot_localpart}:"
    out = []
    for line in lines:
        match = _REQUESTER.search(line)
        if match and (match.group(1).startswith(prefix) or match.group(1).startswith(sender)):
            out.append(line)
    return out


def _read_from(path: Path, offset: int) -> list[str]:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace").splitlines()


async def _staff_in_portal(h: BridgeHarness) -> tuple[StaffClient, str, UserID]:
    """A citizen-kind room with a staff member (a fresh device) and a ghost in it."""
    status, body = await h.running.call("POST", "/admin/v1/rooms",
                                        {"name": "Consulta", "kind": "citizen"})
    assert status == 201, body
    room_id = str(body["room_id"])
    staff = await staff_login(h.synapse.synapse, h.admin.localpart, h.admin.password)
    await staff.join(room_id)
    b = h.running.bridge
    ghost = await b.ghosts.create()
    await b.api.invite(b.ghosts.bot, RoomID(room_id), ghost)
    await b.api.join(ghost, RoomID(room_id))
    await b.ghosts.device(ghost)  # open: keys on the server, no sync loop
    return staff, room_id, ghost


async def _raw_event(h: BridgeHarness, staff: StaffClient, room_id: str,
                     event_id: str) -> dict[str, Any]:
    """The event as the server holds it (nio's room_get_event would decrypt it)."""
    async with aiohttp.ClientSession() as http, http.get(
            f"{h.synapse.synapse.url}/_matrix/client/v3/rooms/{quote(room_id)}/event/"
            f"{quote(event_id)}",
            headers={"Authorization": f"Bearer {staff.client.access_token}"}) as resp:
        assert resp.status == 200
        event: dict[str, Any] = await resp.json()
        return event


async def test_transport_is_appservice_and_ready_has_no_warning(bridge: BridgeHarness) -> None:
    b = bridge.running.bridge
    assert b.crypto.mode == "appservice" and b.crypto.warning() is None
    status, ready = await bridge.running.call("GET", "/ready", token=None)
    assert status == 200 and "warnings" not in ready


async def test_ghost_decrypts_staff_message_from_to_device_in_transactions(
        bridge: BridgeHarness) -> None:
    """A staff member's new device shares its room key with the ghost's device by Olm
    to-device: it reaches the ghost only through a transaction, and decrypts."""
    log = _access_log(bridge)
    start = log.stat().st_size
    staff, room_id, ghost = await _staff_in_portal(bridge)
    try:
        b = bridge.running.bridge
        device = b.devices.get_open(ghost)
        assert device is not None and device.fed
        body = f"para el fantasma {secrets.token_hex(4)}"
        event_id = await staff.send_text(room_id, body)
        raw = await _raw_event(bridge, staff, room_id, event_id)
        assert raw["type"] == "m.room.encrypted"
        decrypted = None
        for _ in range(100):
            decrypted = device.decrypt(raw)
            if decrypted is not None:
                break
            await asyncio.sleep(0.1)
        assert isinstance(decrypted, nio.RoomMessageText) and decrypted.body == body
        # The room key came in a transaction: no device of the bridge ever synced.
        lines = _bridge_lines(bridge, _read_from(log, start))
        assert lines, "the access log names the bridge's requests"
        assert not [line for line in lines if "/sync" in line]
        # The device was made with the as_token (MSC4190), not with a login.
        assert [line for line in lines if "PUT /_matrix/client/v3/devices/" in line]
        assert not [line for line in lines if "/login" in line]
    finally:
        await staff.close()


async def _claim(staff: StaffClient, user_id: str, device_id: str) -> dict[str, Any]:
    resp = await staff.client.keys_claim({user_id: [device_id]})
    assert isinstance(resp, nio.KeysClaimResponse), resp
    keys: dict[str, Any] = resp.one_time_keys.get(user_id, {}).get(device_id, {})
    assert len(keys) == 1, resp.one_time_keys
    return next(iter(keys.values()))


async def test_fallback_key_then_one_time_keys_topped_up_from_counts(
        bridge: BridgeHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new device has 50 one-time keys and a fallback key. Claiming them all (no
    transaction reports that) leaves the fallback; the next message in a room of the
    ghost brings a count of 0 and "no unused fallback key": the bridge uploads both."""
    # The fallback key is seconds old: replaced once reported used all the same (else a
    # week old first, test_bot_key_burst).
    monkeypatch.setattr(devices_module, "FALLBACK_MAX_AGE_SECONDS", 0.0)
    monkeypatch.setattr(devices_module, "COUNT_SETTLE_SECONDS", 1.0)
    log = _access_log(bridge)
    staff, room_id, ghost = await _staff_in_portal(bridge)
    try:
        b = bridge.running.bridge
        device = b.devices.get_open(ghost)
        assert device is not None
        device_id = device.client.device_id
        # 50 one-time keys, then the fallback key (present since the device opened).
        # A transaction reporting a low count meanwhile (the room's last events) may
        # top the keys up once: claim on until the fallback key comes.
        claimed = [await _claim(staff, ghost, device_id) for _ in range(50)]
        assert not any(k.get("fallback") for k in claimed)
        for _ in range(60):
            if (await _claim(staff, ghost, device_id)).get("fallback"):
                break
        else:
            raise AssertionError("no fallback key after the one-time keys ran out")
        await asyncio.sleep(1.1)  # past any top-up made while claiming
        start = log.stat().st_size
        await staff.send_text(room_id, f"hola {secrets.token_hex(3)}")
        uploads: list[str] = []
        for _ in range(100):
            uploads = [line for line in _bridge_lines(bridge, _read_from(log, start))
                       if "/keys/upload" in line and ghost in line]
            if len(uploads) >= 2:
                break
            await asyncio.sleep(0.1)
        assert len(uploads) >= 2, uploads  # one-time keys, and a new fallback key
        fresh = await _claim(staff, ghost, device_id)
        assert not fresh.get("fallback"), fresh
        olm = device.client.olm
        assert olm is not None and olm.uploaded_key_count == 50
    finally:
        await staff.close()


IDLE_GHOSTS = 200
IDLE_SECONDS = 60


async def test_no_request_to_synapse_while_idle(bridge: BridgeHarness) -> None:
    """With no traffic, neither the bot nor 200 open ghosts send Synapse anything for a
    minute (the old design synced the bot every 2 s and each ghost every 30 s: 200
    ghosts made about 7 requests a second)."""
    b = bridge.running.bridge
    staff, room_id, ghost = await _staff_in_portal(bridge)
    try:
        await staff.send_text(room_id, "último mensaje antes del silencio")
        await bridge.running.idle()
    finally:
        await staff.close()
    more = [await b.ghosts.create() for _ in range(IDLE_GHOSTS - 1)]
    opening = asyncio.Semaphore(16)

    async def open_device(user_id: UserID) -> None:
        async with opening:
            await b.ghosts.device(user_id)

    await asyncio.gather(*(open_device(g) for g in more))
    await asyncio.sleep(2)  # transactions in flight and their follow-ups settle
    ghosts = [ghost, *more]
    assert all(b.devices.get_open(g) is not None for g in ghosts)
    assert b.devices.get_open(b.ghosts.bot) is not None
    log = _access_log(bridge)
    start = log.stat().st_size
    await asyncio.sleep(IDLE_SECONDS)
    lines = _bridge_lines(bridge, _read_from(log, start))
    assert lines == []
    assert all(b.devices.get_open(g) is not None for g in ghosts), "still open, not polling"


async def test_without_the_flags_the_bridge_polls_and_says_why(tmp_path: Path) -> None:
    """The fallback: a Synapse that sends no to-device events (then: no key counts) to
    appservices. The bridge starts, each device keeps its /sync, and /ready and the log
    name the setting to change."""
    hs_port, as_port = free_port(), free_port()
    config = build_test_config(f"http://127.0.0.1:{hs_port}", as_port, tmp_path)
    registration = tmp_path / "registration.yaml"
    registration.write_text(registration_yaml(config), encoding="utf-8")
    access = tmp_path / "access.log"
    server = LocalSynapse(tmp_path / "synapse", registration_files=[registration],
                          port=hs_port, access_log=access,
                          settings={"modules": [module_entry(config)],
                                    "experimental_features": {}})
    for flags, problem in (({}, NO_TO_DEVICE),
                           ({"msc2409_to_device_messages_enabled": True}, NO_COUNTS)):
        server.settings["experimental_features"] = flags
        await asyncio.to_thread(server.write_config)
        async with server:
            running = RunningBridge(config)
            await running.start(timeout=90)
            try:
                b = running.bridge
                # The second start begins as the first one ended (remembered) and
                # probes again in the background: the answer changes once it is in.
                for _ in range(300):
                    if (b.crypto.mode, b.crypto.problem) == ("sync", problem):
                        break
                    await asyncio.sleep(0.1)
                assert (b.crypto.mode, b.crypto.problem) == ("sync", problem)
                status, ready = await running.call("GET", "/ready", token=None)
                assert status == 200
                assert ready["warnings"] == [problem + FALLBACK_NOTE]
                bot = b.devices.get_open(b.ghosts.bot)
                assert bot is not None and not bot.fed
                start = access.stat().st_size
                syncs: list[str] = []
                for _ in range(100):  # the bot long-polls (2 s) as before
                    syncs = [line for line in _read_from(access, start)
                             if "/sync" in line and b.ghosts.bot in line]
                    if syncs:
                        break
                    await asyncio.sleep(0.1)
                assert syncs
            finally:
                await running.stop()


async def test_to_device_events_are_queued_sealed_once_and_open_their_device(
        bridge: BridgeHarness) -> None:
    """A transaction with nothing but a to-device event: stored (sealed) before the 200,
    deduplicated on retries and in other transactions, handed to the recipient's device,
    which it opens; events for devices the bridge does not use are dropped and counted."""
    b = bridge.running.bridge
    ghost = await b.ghosts.create()
    record = await b.db.ghosts.get(ghost)
    assert record is not None and b.devices.get_open(ghost) is None
    sender = f"@desk_{secrets.token_hex(3)}:localhost"
    item = {"type": "io.example.hello", "sender": sender, "to_user_id": ghost,
            "to_device_id": record.device_id, "content": {"n": 1}}
    wrong_device = {**item, "to_device_id": "NOTOURS", "content": {"n": 2}}
    foreign = {**item, "to_user_id": "@alice:localhost", "content": {"n": 3}}
    before = b.metrics.to_device_dropped.labels("unknown_device")._value.get()
    before_foreign = b.metrics.to_device_dropped.labels("not_ours")._value.get()
    txn = f"td{secrets.token_hex(6)}"
    raw = json.dumps({"events": [],
                      "de.sorunome.msc2409.to_device": [item, wrong_device, foreign]}).encode()
    for path in (txn, txn, txn + "b"):
        status, _ = await bridge.running.call(
            "PUT", f"/_matrix/app/v1/transactions/{path}", raw, token="hs")
        assert status == 200
    lane = f"to-device:{ghost}"
    counts = await b.db.inbound.count_lane("matrix", lane)
    assert sum(counts.values()) == 2, counts  # ours, and the unknown device's
    rows = [i for i in await b.db.inbound.after(0, limit=100_000) if i.lane == lane]
    assert rows and all(sender not in r.payload and "io.example" not in r.payload
                        for r in rows)
    # Counted per transaction Synapse sent, not per retry of one (two distinct txn ids).
    assert b.metrics.to_device_dropped.labels("not_ours")._value.get() == before_foreign + 2
    for _ in range(100):
        if b.devices.get_open(ghost) is not None and \
                b.metrics.to_device_dropped.labels("unknown_device")._value.get() > before:
            break
        await asyncio.sleep(0.1)
    assert b.devices.get_open(ghost) is not None  # opened to take its to-device event
    assert b.metrics.to_device_dropped.labels("unknown_device")._value.get() == before + 1
    await bridge.running.idle()
    counts = await b.db.inbound.count_lane("matrix", lane)
    assert counts.get("done") == 2, counts


async def test_a_restart_leaves_the_bot_display_name_alone(bridge: BridgeHarness) -> None:
    """Setting a display name makes Synapse rewrite the user's membership in every room
    it is in (a background task, one room after another): for the bot, every portal,
    10,000 of them at N = 10,000, on every start. A restart sets it only if it differs."""
    bot = bridge.running.bridge.ghosts.bot
    assert await bridge.running.bridge.api.display_name(bot) == BOT_DISPLAY_NAME
    log = _access_log(bridge)

    def display_name_puts(start: int) -> list[str]:
        return [line for line in _bridge_lines(bridge, _read_from(log, start))
                if f'"PUT /_matrix/client/v3/profile/{bot}/displayname' in line]

    await bridge.running.stop()
    start = log.stat().st_size
    await bridge.running.start()
    await asyncio.sleep(0.5)  # the access log is written as requests end
    assert display_name_puts(start) == []
    assert await bridge.running.bridge.api.display_name(bot) == BOT_DISPLAY_NAME

    # Changed behind the bridge's back: the next start puts it right.
    await bridge.running.bridge.api.set_displayname(bot, "otro nombre")
    await bridge.running.stop()
    start = log.stat().st_size
    await bridge.running.start()
    await asyncio.sleep(0.5)
    assert len(display_name_puts(start)) == 1
    assert await bridge.running.bridge.api.display_name(bot) == BOT_DISPLAY_NAME
