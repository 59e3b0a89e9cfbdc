"""The bot's keys under a burst of new senders (issue 16, bench/scale.py): every room key
sent to the bot by Olm decrypts, also one encrypted to a fallback key that was in use
when the sender claimed it and was reported used twice, 30 s apart, before the message
was read.

Each new device that shares a room key with the bot claims one of the bot's one-time
keys; once they run out, Synapse hands out the bot's fallback key to every claimer and
reports it used in each transaction that concerns the bot. A pre-key message needs the
private half of the key it was encrypted to. The account keeps only the current fallback
key and the one before (tests/unit/test_fallback_keys.py): a message encrypted to a key
two generations old fails with `SessionCreationException` and its room key is lost.
Messages reach the bot's device late: they wait in Synapse's appservice queue and then in
the bot's to-device lane (one lane, in order) while the counts of later transactions are
applied on arrival. Here the lag is made by the senders holding their messages, which
the bridge cannot tell apart from a queue.
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import aiohttp
import nio
import pytest

from tests.fixtures.bridge import BridgeHarness

pytestmark = pytest.mark.integration

T = TypeVar("T")
# More than the bot's 50 one-time keys: the last ones get its fallback key.
BURST = 60
HELD = 6  # of those given the fallback key, the ones whose messages are held
# Past the wait after which the bridge believed a new "fallback key used" report (30 s
# before this test), so that the second report comes after it.
SECOND_REPORT_AFTER = 31.0


async def _gather(items: Iterable[Awaitable[T]], limit: int = 8) -> list[T]:
    gate = asyncio.Semaphore(limit)

    async def one(item: Awaitable[T]) -> T:
        async with gate:
            return await item

    return await asyncio.gather(*(one(i) for i in items))


class Sender:
    """A new device of a user outside the bridge: a nio client that shares a room key
    with the bot's device, as a staff member's new Element session does."""

    def __init__(self, client: nio.AsyncClient, bot: str, bot_device: str) -> None:
        self.client = client
        self.bot, self.bot_device = bot, bot_device
        # The room as this device sees it: the bot is its only other member.
        self.room_id = f"!burst{secrets.token_hex(6)}"
        room = nio.MatrixRoom(self.room_id, client.user_id, encrypted=True)
        room.add_member(bot, None, None)
        client.rooms[self.room_id] = room
        self.claimed: dict[str, Any] = {}

    @classmethod
    async def login(cls, h: BridgeHarness, localpart: str, password: str, bot: str,
                    bot_device: str, store: str) -> Sender:
        synapse = h.synapse.synapse
        client = nio.AsyncClient(synapse.url, f"@{localpart}:{synapse.server_name}",
                                 store_path=tempfile.mkdtemp(dir=store),
                                 config=nio.AsyncClientConfig(encryption_enabled=True))
        resp = await client.login(password, device_name="burst")
        assert isinstance(resp, nio.LoginResponse), resp
        assert isinstance(await client.keys_upload(), nio.KeysUploadResponse)
        assert client.olm is not None
        client.olm.users_for_key_query.add(bot)
        assert isinstance(await client.keys_query(), nio.KeysQueryResponse)
        return cls(client, bot, bot_device)

    async def claim(self) -> dict[str, Any]:
        """Claim one of the bot's keys (an Olm session to its device from now on)."""
        resp = await self.client.keys_claim({self.bot: [self.bot_device]})
        assert isinstance(resp, nio.KeysClaimResponse), resp
        keys = resp.one_time_keys[self.bot][self.bot_device]
        self.claimed = next(iter(keys.values()))
        return self.claimed

    async def send(self) -> None:
        """Share the room key with the bot: an Olm pre-key message on the session."""
        resp = await self.client.share_group_session(self.room_id,
                                                     ignore_unverified_devices=True)
        assert isinstance(resp, nio.ShareGroupSessionResponse), resp
        assert (self.bot, self.bot_device) in resp.users_shared_with

    def received_by(self, bot_olm: Any) -> bool:
        assert self.client.olm is not None
        session = self.client.olm.outbound_group_sessions[self.room_id]
        key = self.client.olm.account.identity_keys["curve25519"]
        return bot_olm.inbound_group_store.get(self.room_id, key, session.id) is not None


async def _claim_raw(h: BridgeHarness, token: str, bot: str, bot_device: str
                     ) -> dict[str, Any]:
    """One claim of the bot's keys, no session made (what a burst of claimers does to
    the bot's stock)."""
    async with aiohttp.ClientSession() as http, http.post(
            f"{h.synapse.synapse.url}/_matrix/client/v3/keys/claim",
            headers={"Authorization": f"Bearer {token}"},
            json={"one_time_keys": {bot: {bot_device: "signed_curve25519"}}}) as resp:
        assert resp.status == 200
        body = await resp.json()
    key: dict[str, Any] = next(iter(body["one_time_keys"][bot][bot_device].values()))
    return key


async def _served_fallback(h: BridgeHarness, token: str, bot: str, bot_device: str) -> str:
    """Drain the bot's one-time keys; the fallback key the server hands out then."""
    for _ in range(500):
        key = await _claim_raw(h, token, bot, bot_device)
        if key.get("fallback"):
            return str(key["key"])
    raise AssertionError("the bot's one-time keys never ran out")


async def _acted_on_report(h: BridgeHarness, token: str, bot: str, bot_device: str) -> str:
    """Wait until the bot has acted on a report of no one-time key left and its fallback
    key used: its one-time keys topped up (a fallback key replaced then is uploaded
    right after them). The fallback key served once they are drained again."""
    for _ in range(300):
        if not (await _claim_raw(h, token, bot, bot_device)).get("fallback"):
            return await _served_fallback(h, token, bot, bot_device)
        await asyncio.sleep(0.1)
    raise AssertionError("the bot never topped its one-time keys up")


async def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not check():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_every_room_key_of_a_burst_decrypts_after_fallback_key_reports(
        bridge: BridgeHarness) -> None:
    h = bridge
    b = h.running.bridge
    bot = b.ghosts.bot
    bot_device = b.devices.get_open(bot)
    assert bot_device is not None and bot_device.fed and bot_device.client.olm is not None
    bot_olm = bot_device.client.olm
    bot_device_id = str(bot_device.client.device_id)
    lane = f"to-device:{bot}"
    dead_before = (await b.db.inbound.count_lane("matrix", lane)).get("dead", 0)

    localpart = f"burst_{secrets.token_hex(3)}"
    password = secrets.token_urlsafe(12)
    await h.synapse.synapse.register_user(localpart, password)
    _, drain_token, _ = await h.synapse.synapse.login(localpart, password)
    senders: list[Sender] = []
    with tempfile.TemporaryDirectory() as store:
        try:
            async def login() -> Sender:
                sender = await Sender.login(h, localpart, password, bot, bot_device_id, store)
                senders.append(sender)
                return sender

            burst = await _gather(login() for _ in range(BURST))
            await _gather(s.claim() for s in burst)
            given_fallback = [s for s in burst if s.claimed.get("fallback")]
            assert len(given_fallback) >= HELD, "the burst never reached the fallback key"
            first_fallback = given_fallback[0].claimed["key"]
            held = given_fallback[:HELD]
            # Every other sender's room key goes out at once: the transactions carrying
            # them report the one-time keys gone and the fallback key used.
            await _gather(s.send() for s in burst if s not in held)
            await _until(lambda: all(s.received_by(bot_olm) for s in burst if s not in held),
                         30, "the burst's room keys at the bot")
            served = [first_fallback,
                      await _acted_on_report(h, drain_token, bot, bot_device_id)]
            await asyncio.sleep(SECOND_REPORT_AFTER)
            # A new sender now: its transaction reports the fallback key served used.
            late = await login()
            await late.claim()
            await late.send()
            await _until(lambda: late.received_by(bot_olm), 30, "the late room key at the bot")
            served.append(await _acted_on_report(h, drain_token, bot, bot_device_id))
            # The held messages arrive: encrypted to the first fallback key.
            await _gather(s.send() for s in held)
            await h.running.idle()
            await asyncio.sleep(0.5)
            lost = [s for s in held if not s.received_by(bot_olm)]
            dead = (await b.db.inbound.count_lane("matrix", lane)).get("dead", 0) - dead_before
            assert not lost and dead == 0, (
                f"{len(lost)} of {HELD} room keys encrypted to an earlier fallback key were "
                f"lost; {dead} to-device item(s) set aside as dead letters; fallback keys "
                f"served: {len(set(served))} distinct of {len(served)}")
            assert all(s.received_by(bot_olm) for s in burst)
        finally:
            await asyncio.gather(*(s.client.close() for s in senders))
