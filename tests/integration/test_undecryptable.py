"""Staff events the bot cannot decrypt wait aside: they hold no lane, so they delay
neither other portals nor the management room; when their key never comes, the
sender is told in the room and the event is counted."""

from __future__ import annotations

import asyncio
import json
import secrets
from urllib.parse import quote

import pytest
import vodozemac
from nio import EncryptionError, MegolmEvent, RoomMessageNotice

from bridge.worker import MAX_RUNNING
from tests.fixtures.bridge import BridgeHarness
from tests.integration.test_moderation import Conversation, dm_with_bot
from tests.integration.test_whatsapp import new_citizen, opt_in

pytestmark = pytest.mark.integration
NOTICE = "No se ha podido descifrar un mensaje de"


def q(value: str) -> str:
    return quote(value, safe="")


async def send_undecryptable(h: BridgeHarness, token: str, room_id: str) -> str:
    """An m.room.encrypted event under a Megolm session nobody ever receives."""
    session = vodozemac.GroupSession()
    ciphertext = session.encrypt(json.dumps({
        "type": "m.room.message", "room_id": room_id,
        "content": {"msgtype": "m.text", "body": "nunca legible"}}).encode()).to_base64()
    status, body = await h.synapse.synapse.request(
        "PUT", f"/_matrix/client/v3/rooms/{q(room_id)}/send/m.room.encrypted/"
        f"{secrets.token_hex(8)}",
        {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": ciphertext,
         "session_id": session.session_id, "device_id": "WITHHOLDER",
         "sender_key": vodozemac.Account().curve25519_key.to_base64()}, token)
    assert status == 200, body
    return str(body["event_id"])


def undecryptable_count(h: BridgeHarness) -> float:
    return h.running.bridge.metrics.registry.get_sample_value(
        "civic_bridge_undecryptable_events_total") or 0.0


async def team_room(h: BridgeHarness, token: str, n: int) -> str:
    status, body = await h.running.call("POST", "/admin/v1/rooms",
                                        {"name": f"Equipo {n}", "kind": "team"})
    assert status == 201, body
    room_id = str(body["room_id"])
    status, joined = await h.synapse.synapse.request(
        "POST", f"/_matrix/client/v3/join/{q(room_id)}", {}, token)
    assert status == 200, joined
    return room_id


async def test_undecryptable_events_wait_aside(bridge: BridgeHarness) -> None:
    h = bridge
    _, token, _ = await h.synapse.synapse.login(h.admin.localpart, h.admin.password)
    journey = await opt_in(h, new_citizen(), "Buenos días")
    talk = await dm_with_bot(h, h.admin.localpart, h.admin.password)
    try:
        # More undecryptable events, in more rooms, than the worker runs lanes at once.
        rooms = []
        for batch in range(0, MAX_RUNNING, 8):
            rooms += await asyncio.gather(*(team_room(h, token, n)
                                            for n in range(batch, batch + 8)))
        before = undecryptable_count(h)
        await asyncio.gather(*(send_undecryptable(h, token, r) for r in rooms))
        await send_undecryptable(h, token, talk.room_id)

        # A staff reply in a portal and a management command go through at once.
        await journey.desk.send_text(journey.room_id, "Le atendemos enseguida")
        await h.wa.wait_for_sent(lambda s: s.get("text", {}).get("body") ==
                                 "Le atendemos enseguida", timeout=15)
        assert "kick ROOM USER REASON" in await talk.say("help", timeout=15)

        # Given up after the configured retries: the sender is told in the room.
        answer = await _next_notice(talk)
        assert answer.startswith(NOTICE) and h.admin.user_id in answer
        assert "reenv" in answer.lower() or "vuelva a enviarlo" in answer
        for _ in range(100):
            if undecryptable_count(h) >= before + len(rooms) + 1:
                break
            await asyncio.sleep(0.3)
        assert undecryptable_count(h) == before + len(rooms) + 1
        assert not await h.running.bridge.db.kv.with_prefix("undecryptable:")
    finally:
        await talk.staff.close()
        await journey.desk.close()


async def _next_notice(talk: Conversation) -> str:
    """The bot's undecryptable notice in the DM, without sending anything."""
    staff, room_id, bot = talk.staff, talk.room_id, talk.bot
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    seen = 0
    while loop.time() < deadline:
        await staff.sync_once(timeout_ms=500)
        events = staff._timeline.get(room_id, [])
        for i in range(seen, len(events)):
            event = events[i]
            if isinstance(event, MegolmEvent):
                try:
                    event = events[i] = staff.client.decrypt_event(event)
                except EncryptionError:
                    continue
            if isinstance(event, RoomMessageNotice) and event.sender == bot and \
                    event.body.startswith(NOTICE):
                return str(event.body)
    raise AssertionError("no undecryptable notice from the bot")
