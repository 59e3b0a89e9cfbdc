"""What Synapse drops while it holds the bridge DOWN, and how the bridge gets it back.

Synapse 1.163 marks an appservice DOWN when a transaction fails (error answer, timeout,
connection refused). Until a retry succeeds (backoff 2 s doubling up to 512 s, or at
once after a successful MSC2659 ping), it creates transactions only for room events,
and neither those nor the retried ones carry to-device messages, key counts or
device-list changes. A room key sent meanwhile never comes in a transaction; it is
still in Synapse's device inbox (appservice delivery does not delete it).
"""

from __future__ import annotations

import asyncio
import re
import secrets
from pathlib import Path

import pytest

from tests.fixtures.bridge import BridgeHarness
from tests.integration.test_moderation import dm_with_bot, eventually

pytestmark = pytest.mark.integration

_PING = re.compile(r"POST /_matrix/client/v1/appservice/[^/ ]+/ping")


def _access_log(h: BridgeHarness) -> Path:
    return h.synapse.workdir / "access.log"


def _read_from(path: Path, offset: int) -> list[str]:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace").splitlines()


async def test_room_key_sent_while_the_bridge_was_down_is_fetched_once(
        bridge: BridgeHarness) -> None:
    """The desk opens a DM with the bot; while the bridge is stopped, the desk's first
    message goes out (its new Megolm session's key by Olm to-device: that transaction
    fails, Synapse marks the bridge DOWN and the key is never sent again). After the
    restart the message arrives in a retried transaction, without its key: the bot
    fetches its device inbox with one /sync and answers the command."""
    talk = await dm_with_bot(bridge, bridge.desk.localpart, bridge.desk.password)
    running = bridge.running
    log = _access_log(bridge)
    try:
        start = log.stat().st_size
        await running.stop()
        await talk.staff.send_text(talk.room_id, "help")  # a new session: key to-device
        await asyncio.sleep(0.5)  # Synapse tries the transactions, and fails
        await running.start()
        b = running.bridge
        # The answer to the command sent while the bridge was away (not the notice
        # saying it could not be decrypted).
        answer = await talk.say("help")
        assert "Only the bridge's admins" in answer, answer
        assert b.metrics.to_device_catch_ups.labels("recovered")._value.get() >= 1
        bot = b.devices.get_open(b.ghosts.bot)
        assert bot is not None and bot.fed  # still fed by transactions: no polling
        syncs = [line for line in _read_from(log, start)
                 if "/sync" in line and f"{{{b.ghosts.bot}" in line]
        assert len(syncs) == 1 and "timeout=0" in syncs[0], syncs  # one fetch, no loop
    finally:
        await talk.staff.close()


async def test_an_error_answer_to_a_transaction_makes_the_bridge_ping_synapse(
        bridge: BridgeHarness) -> None:
    """A transaction the bridge refuses makes Synapse hold it DOWN: the bridge pings
    Synapse (MSC2659) so that it retries at once and sends to-device events again."""
    log = _access_log(bridge)
    start = log.stat().st_size
    status, _ = await bridge.running.call(
        "PUT", f"/_matrix/app/v1/transactions/bad{secrets.token_hex(4)}", b"{not json",
        token="hs")
    assert status == 400

    async def pinged() -> bool:
        return any(_PING.search(line) for line in _read_from(log, start))

    await eventually(pinged, timeout=10)
