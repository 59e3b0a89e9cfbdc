"""The outbox in batches (a room post to many members), on SQLite and PostgreSQL
(fixture `db`) against the Cloud API simulator: each citizen's sends in order under
concurrency, a batch stopped midway loses nothing and sends nothing twice, a 429 backs
off only the send it hit, and rows queued in the payload format of before are sent.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest

from bridge.db import Citizen, Database
from bridge.devtools.simulator import CloudAPISimulator
from bridge.matrix.api import MatrixAPI
from bridge.metrics import Metrics
from bridge.privacy import AAD_IDENTIFIER, AAD_PAYLOAD, AAD_WA_ID, Cipher, KeyedIndex, Privacy
from bridge.types import RoomID, UserID
from bridge.whatsapp.graph import GraphClient
from bridge.whatsapp.outbox import Outbox

pytestmark = pytest.mark.integration
PHONE_ID = "109876543210"
ROOM = RoomID("!announcements:agency.example")


class Rig:
    def __init__(self, db: Database, sim: CloudAPISimulator, http: aiohttp.ClientSession,
                 api_base: str) -> None:
        self.db, self.sim, self.http = db, sim, http
        self.privacy = Privacy(cipher=Cipher(os.urandom(32)), index=KeyedIndex(os.urandom(32)))
        self.graph = GraphClient(http, api_base=api_base, phone_number_id=PHONE_ID,
                                 access_token=sim.access_token)
        self.notices: list[str] = []

    def outbox(self, concurrency: int = 8) -> Outbox:
        async def notify(room: RoomID, text: str) -> None:
            self.notices.append(text)
        box = Outbox(self.db, self.privacy, self.graph,
                     MatrixAPI(self.http, "http://127.0.0.1:9", "as"), UserID("@bot:x"),
                     notify, Metrics(), confirm_window=timedelta(minutes=10))
        box.concurrency = concurrency
        return box

    async def members(self, n: int) -> list[Citizen]:
        await self.db.rooms.create(ROOM, "announcement", "Avisos", UserID("@a:x"))
        out = []
        for i in range(n):
            wa_id = f"3460{i:07d}"
            citizen = await self.db.citizens.create(
                index_hash=self.privacy.index.digest(wa_id),
                identifier_ct=self.privacy.cipher.encrypt(wa_id, aad=AAD_IDENTIFIER),
                wa_id_ct=self.privacy.cipher.encrypt(wa_id, aad=AAD_WA_ID),
                pseudonym_code=f"B{i:06d}")
            member = await self.db.wa_rooms.invite(ROOM, citizen.id, f"V{i}", "t", "0" * 64)
            await self.db.wa_rooms.set_state(member.id, "joined")
            out.append(citizen)
        return out

    async def post(self, box: Outbox, citizens: list[Citizen], posts: int) -> None:
        for p in range(posts):
            for c in citizens:
                await box.room(c, f"wr:$p{p}:{c.id}", {"type": "text", "body": f"post {p}",
                                                       "wa_room": ROOM, "wr_event": f"$p{p}"})

    def bodies_per_recipient(self) -> dict[str, list[str]]:
        per: dict[str, list[str]] = {}
        for body in self.sim.sent:
            per.setdefault(body["to"], []).append(body["text"]["body"])
        return per


@pytest.fixture
async def rig(db: Database) -> AsyncIterator[Rig]:
    sim = CloudAPISimulator(access_token=secrets.token_urlsafe(16),
                            app_secret=secrets.token_hex(16), phone_number_id=PHONE_ID,
                            display_phone_number="+34 900 000 000")
    api_base = await sim.start()
    async with aiohttp.ClientSession() as http:
        yield Rig(db, sim, http, api_base)
    await sim.stop()


async def test_each_citizens_sends_stay_in_order_under_concurrency(rig: Rig) -> None:
    citizens = await rig.members(40)
    box = rig.outbox(concurrency=8)
    await rig.post(box, citizens, 4)
    box.start()
    try:
        await asyncio.wait_for(_until(lambda: len(rig.sim.sent) >= 160), 60)
        await asyncio.wait_for(box.idle.wait(), 30)  # every outcome recorded
    finally:
        await box.stop()
    per = rig.bodies_per_recipient()
    assert len(per) == 40 and len(rig.sim.sent) == 160
    assert all(got == [f"post {p}" for p in range(4)] for got in per.values())
    assert await rig.db.outbox.depth() == 0
    # Each send linked its wamid to the room event (recorded in the batch transaction).
    links = [await rig.db.wa_rooms.by_wamid(rig.privacy.index.wamid(w))
             for w in rig.sim.sent_ids[:160] if w]
    assert len(links) == 160 and all(link is not None for link in links)


async def test_a_batch_stopped_midway_loses_nothing_and_sends_nothing_twice(rig: Rig) -> None:
    citizens = await rig.members(60)
    box = rig.outbox(concurrency=4)
    await rig.post(box, citizens, 2)
    box.start()
    await asyncio.wait_for(_until(lambda: len(rig.sim.sent) >= 20), 60)
    await box.stop()  # mid-batch: some of its sends posted, some not
    # Meta's statuses settle the sends whose answers the stopped outbox never read.
    box = rig.outbox(concurrency=4)
    for wamid, data in list(rig.sim.callback_data.items()):
        await box.settle_by_status(data, wamid, "sent")
    box.start()
    try:
        # Those never posted are due again at once: well within the 10-minute window.
        await asyncio.wait_for(_until(lambda: len(rig.sim.sent) >= 120), 30)
        await asyncio.sleep(1.0)  # anything sent twice would show now
    finally:
        await box.stop()
    per = rig.bodies_per_recipient()
    assert len(rig.sim.sent) == 120
    assert all(got == ["post 0", "post 1"] for got in per.values())
    assert await rig.db.outbox.depth() == 0


async def test_a_429_in_a_batch_backs_off_only_the_send_it_hit(rig: Rig) -> None:
    citizens = await rig.members(20)
    box = rig.outbox(concurrency=4)
    await rig.post(box, citizens, 2)
    rig.sim.fail_next(130429, 429)
    box.start()
    try:
        await asyncio.wait_for(_until(lambda: len(rig.sim.sent) >= 37), 30)
        await asyncio.sleep(0.5)
        retried = [i for i in await rig.db.outbox.due(datetime.now(UTC) + timedelta(days=1))]
        # The one send hit is backing off, its citizen's next send waits behind it;
        # every other citizen got both posts.
        assert len(retried) == 2 and {i.citizen_id for i in retried} == {retried[0].citizen_id}
        hit = min(retried, key=lambda i: i.id)
        assert hit.attempts == 1 and hit.last_error is not None and "429" in hit.last_error
        per = rig.bodies_per_recipient()
        assert sum(got == ["post 0", "post 1"] for got in per.values()) == 19
        await asyncio.wait_for(_until(lambda: len(rig.sim.sent) >= 40), 30)
    finally:
        await box.stop()
    assert all(got == ["post 0", "post 1"] for got in rig.bodies_per_recipient().values())


async def test_a_slow_send_does_not_hold_up_other_citizens(rig: Rig) -> None:
    """Batches are pipelined: while Graph sits on one send, the batches after it go out
    to the other citizens (before, everything waited for the slowest send of a batch).
    Its batch-mates' next sends wait until the batch is recorded (a citizen's sends go
    one after another), and so does the slow citizen's."""
    box = rig.outbox(concurrency=2)
    size = box.batch_size  # the first batch holds members 0 to size - 1
    members = 3 * size
    citizens = await rig.members(members)
    await rig.post(box, citizens, 2)
    numbers = ["3460" + f"{i:07d}" for i in range(members)]
    release = rig.sim.hold_next_send(lambda body: body["to"] == numbers[0], timeout=60)
    box.start()
    try:
        before_release = size + 2 * (members - size)
        await asyncio.wait_for(_until(lambda: len(rig.sim.sent) >= before_release), 30)
        await asyncio.sleep(0.5)
        per = rig.bodies_per_recipient()
        assert len(rig.sim.sent) == before_release
        assert per[numbers[0]] == ["post 0"]  # recorded by the simulator, answer held
        assert all(per[n] == ["post 0"] for n in numbers[1:size])
        assert all(per[n] == ["post 0", "post 1"] for n in numbers[size:])
        release.set()
        await asyncio.wait_for(_until(lambda: len(rig.sim.sent) >= 2 * members), 30)
        await asyncio.wait_for(box.idle.wait(), 30)
    finally:
        await box.stop()
    assert len(rig.sim.sent) == 2 * members
    assert all(got == ["post 0", "post 1"] for got in rig.bodies_per_recipient().values())


async def test_rows_queued_in_the_old_dict_format_are_sent(rig: Rig) -> None:
    """A row sealed by the outbox before its payloads were typed goes out unchanged."""
    (citizen,) = await rig.members(1)
    await rig.db.citizens.touch_inbound(citizen.id, datetime.now(UTC))
    old = {"type": "buttons", "body": "¿Acepta?", "buttons": [["si", "Sí"], ["no", "No"]],
           "system": True}
    await rig.db.outbox.add("optin:old", citizen.id, RoomID(""),
                            rig.privacy.cipher.encrypt_json(old, aad=AAD_PAYLOAD))
    box = rig.outbox()
    box.start()
    try:
        await asyncio.wait_for(_until(lambda: len(rig.sim.sent) >= 1), 30)
        await asyncio.wait_for(box.idle.wait(), 30)
    finally:
        await box.stop()
    (body,) = rig.sim.sent
    buttons = body["interactive"]["action"]["buttons"]
    assert [b["reply"]["id"] for b in buttons] == ["si", "no"]
    assert (await rig.db.outbox.by_key("optin:old")).status == "sent"  # type: ignore[union-attr]


async def _until(check: object) -> None:
    while not check():  # type: ignore[operator]
        await asyncio.sleep(0.02)


async def test_stop_right_as_it_is_woken_stops(rig: Rig) -> None:
    """A stop that comes as the idle loop is woken (a post queued at that moment) is
    not lost: 3.11's asyncio.wait_for could swallow it, and stop() hung."""
    box = rig.outbox()
    box.start()
    try:
        for _ in range(30):
            await asyncio.wait_for(box.idle.wait(), 10)
            await asyncio.sleep(0.01)
            box.wake()
            await asyncio.sleep(0)
            box._task.cancel()  # type: ignore[union-attr]
            await asyncio.wait_for(asyncio.gather(box._task, return_exceptions=True), 5)
            box = rig.outbox()
            box.start()
    finally:
        await box.stop()


async def test_members_given_one_payload_share_one_sealed_copy(rig: Rig) -> None:
    """A fan-out hands every member of a room the same payload object: it is sealed once
    (the rows' keys name the members), and each member still gets it."""
    citizens = await rig.members(4)
    box = rig.outbox()
    shared = {"type": "text", "body": "post 0", "wa_room": ROOM, "wr_event": "$p0"}
    alone = dict(shared)  # equal, but another object: sealed on its own
    async with rig.db.transaction() as tx:
        await box.room_many([(c, f"wr:$p0:{c.id}", shared) for c in citizens[:3]]
                            + [(citizens[3], f"wr:$p0:{citizens[3].id}", alone)], tx)
    rows = await rig.db.outbox.due(datetime.now(UTC) + timedelta(seconds=1))
    assert [r.idempotency_key for r in rows] == [f"wr:$p0:{c.id}" for c in citizens]
    assert len({r.payload for r in rows[:3]}) == 1 and rows[3].payload != rows[0].payload
    box.start()
    try:
        await asyncio.wait_for(_until(lambda: len(rig.sim.sent) >= 4), 30)
    finally:
        await box.stop()
    assert all(got == ["post 0"] for got in rig.bodies_per_recipient().values())
    assert len(rig.bodies_per_recipient()) == 4
