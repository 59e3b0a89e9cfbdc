"""Matrix events wait in the inbound queue sealed (bridge.matrix.queued): no message body
or kick reason in a database row, on SQLite and PostgreSQL; rows an earlier version
queued in clear are still handled (and sealed at start); a row that no longer opens
becomes a dead letter and its lane goes on."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import secrets
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import select

from bridge.app import make_app
from bridge.db import Database
from bridge.db.models import InboundRow
from bridge.devtools.synapse import free_port
from bridge.matrix.queued import open_event, row_aad, seal_event, seal_unsealed
from bridge.privacy import Cipher, DecryptError
from bridge.services import build_bridge
from tests.fixtures.bridge import BridgeHarness
from tests.fixtures.db import Backend
from tests.fixtures.synapse import build_test_config
from tests.integration.test_matrix_core import Captured, create_room

CIPHER = Cipher(os.urandom(32))
ROOM = "!abierta:agency.example"


def message(room_id: str, body: str, event_id: str | None = None) -> dict[str, Any]:
    return {"type": "m.room.message", "room_id": room_id, "sender": "@ana:localhost",
            "event_id": event_id or f"$m{secrets.token_hex(8)}", "origin_server_ts": 1,
            "content": {"msgtype": "m.text", "body": body}}


def kick(room_id: str, reason: str) -> dict[str, Any]:
    return {"type": "m.room.member", "room_id": room_id, "sender": "@ana:localhost",
            "state_key": "@pepe:localhost", "event_id": f"$k{secrets.token_hex(8)}",
            "origin_server_ts": 2, "content": {"membership": "leave", "reason": reason}}


async def raw_payloads(db: Database) -> list[str]:
    """What the database itself holds, not what a repository makes of it."""
    async with db.session() as session:
        return list(await session.scalars(select(InboundRow.payload).order_by(InboundRow.id)))


async def _until(check: Callable[[], Any], timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


# --- the repository, both backends ------------------------------------------------------


async def test_stored_events_hold_neither_body_nor_reason(db: Database) -> None:
    body, reason = f"mi DNI es {secrets.token_hex(4)}", f"motivo {secrets.token_hex(4)}"
    events = [message(ROOM, body), kick(ROOM, reason)]
    assert await db.transactions.store("t1", events, seal=partial(seal_event, CIPHER))
    payloads = await raw_payloads(db)
    assert len(payloads) == 2
    for payload in payloads:
        assert payload.startswith("v1.")
        assert body not in payload and reason not in payload and "pepe" not in payload
    items = await db.inbound.pending("matrix")
    assert [open_event(CIPHER, i) for i in items] == events


async def test_a_payload_copied_to_another_row_does_not_open(db: Database) -> None:
    await db.transactions.store("t1", [message(ROOM, "a"), message(ROOM, "b")],
                                seal=partial(seal_event, CIPHER))
    first, second = await db.inbound.pending("matrix")
    with pytest.raises(DecryptError):
        open_event(CIPHER, dataclasses.replace(second, payload=first.payload))
    with pytest.raises(DecryptError):  # another data key
        open_event(Cipher(os.urandom(32)), first)


async def test_rows_queued_in_clear_are_read_then_sealed(db: Database) -> None:
    old = message(ROOM, "escrito antes de la actualización")
    pending = await db.inbound.enqueue("matrix", old["event_id"], json.dumps(old), lane=ROOM)
    done = await db.inbound.enqueue("matrix", "$done", json.dumps(message(ROOM, "hecho")),
                                    lane=ROOM)
    sealed_whatsapp = CIPHER.encrypt_json({"messages": []})
    await db.inbound.enqueue("whatsapp", "msg:1", sealed_whatsapp, lane="citizen:x")
    assert pending is not None and done is not None
    await db.inbound.set_status(done, "done")
    item = await db.inbound.get(pending)
    assert item is not None and open_event(CIPHER, item) == old  # read as it was

    assert await seal_unsealed(db, CIPHER) == 2
    assert await seal_unsealed(db, CIPHER) == 0
    payloads = await raw_payloads(db)
    assert all(p.startswith("v1.") for p in payloads) and sealed_whatsapp in payloads
    assert not any("actualización" in p or "hecho" in p for p in payloads)
    item = await db.inbound.get(pending)
    assert item is not None and open_event(CIPHER, item) == old
    done_item = await db.inbound.get(done)
    assert done_item is not None and done_item.status == "done"


# --- the appservice route, both backends ------------------------------------------------


async def test_transaction_rows_are_sealed_on_each_backend(db_backend: Backend,
                                                           tmp_path: Path) -> None:
    """The public app over a real database, elected (so it stores transactions), with a
    homeserver that never answers: nothing is processed, only stored."""
    config = build_test_config(f"http://127.0.0.1:{free_port()}", free_port(), tmp_path)
    config = config.model_copy(update={"database": config.database.model_copy(
        update={"url": await db_backend.migrated()})})
    bridge = await build_bridge(config)
    # A row an earlier version queued in clear: sealed when the bridge starts.
    old = message(ROOM, "mensaje de antes")
    await bridge.db.inbound.enqueue("matrix", old["event_id"], json.dumps(old), lane=ROOM)
    client: TestClient[Any, Any] = TestClient(TestServer(make_app(config, bridge)))
    await client.start_server()
    try:
        async def sealed_at_start() -> bool:
            return all(p.startswith("v1.") for p in await raw_payloads(bridge.db))

        await _until(sealed_at_start)
        body, reason = f"cuerpo {secrets.token_hex(4)}", f"expulsado por {secrets.token_hex(4)}"
        events = [message(ROOM, body), kick(ROOM, reason)]
        resp = await client.put(f"/_matrix/app/v1/transactions/t{secrets.token_hex(4)}",
                                json={"events": events},
                                headers={"Authorization":
                                         f"Bearer {config.appservice.hs_token}"})
        assert resp.status == 200, await resp.text()
        payloads = await raw_payloads(bridge.db)
        assert len(payloads) == 3
        assert not any(body in p or reason in p or "antes" in p for p in payloads)
        items = await bridge.db.inbound.pending("matrix")
        assert [open_event(bridge.privacy.cipher, i) for i in items] == [old, *events]
    finally:
        await client.close()  # the app's cleanup closes the bridge


# --- the running bridge (real Synapse) --------------------------------------------------


@pytest.fixture
def captured(bridge: BridgeHarness) -> Captured:
    cap = Captured()
    bridge.running.bridge.relay.add_handler(cap)
    return cap


async def test_message_and_kick_reason_are_sealed_and_the_message_relayed(
        bridge: BridgeHarness, captured: Captured) -> None:
    room_id = await create_room(bridge, "team", "Sin cifrar")
    body, reason = f"hola {secrets.token_hex(4)}", f"por spam {secrets.token_hex(4)}"
    msg, kicked = message(room_id, body), kick(room_id, reason)
    status, _ = await bridge.running.call(
        "PUT", f"/_matrix/app/v1/transactions/seal{secrets.token_hex(4)}",
        json.dumps({"events": [msg, kicked]}).encode(), token="hs")
    assert status == 200
    relayed = await captured.wait_for(lambda e: e.event_id == msg["event_id"])
    assert relayed.content["body"] == body and not relayed.encrypted
    b = bridge.running.bridge
    async with b.db.session() as session:
        rows = (await session.execute(
            select(InboundRow.dedupe_key, InboundRow.payload)
            .where(InboundRow.dedupe_key.in_([msg["event_id"], kicked["event_id"]]))
            .order_by(InboundRow.id))).all()
    assert [key for key, _ in rows] == [msg["event_id"], kicked["event_id"]]
    assert not any(body in payload or reason in payload for _, payload in rows)
    assert [b.privacy.cipher.decrypt_json(payload, aad=row_aad(key))
            for key, payload in rows] == [msg, kicked]


async def test_an_event_queued_in_clear_before_the_upgrade_is_still_handled(
        bridge: BridgeHarness, captured: Captured) -> None:
    room_id = await create_room(bridge, "team", "Cola antigua")
    old = message(room_id, "en claro, de la versión anterior")
    b = bridge.running.bridge
    assert await b.db.inbound.enqueue("matrix", old["event_id"], json.dumps(old),
                                      lane=room_id) is not None
    b.worker.wake("matrix", room_id)
    relayed = await captured.wait_for(lambda e: e.event_id == old["event_id"])
    assert relayed.content["body"] == old["content"]["body"]


async def test_a_row_that_no_longer_opens_is_set_aside_and_its_lane_goes_on(
        bridge: BridgeHarness, captured: Captured) -> None:
    room_id = await create_room(bridge, "team", "Clave perdida")
    b = bridge.running.bridge
    lost, after = message(room_id, "con otra clave"), message(room_id, "el siguiente")
    foreign = Cipher(os.urandom(32)).encrypt_json(lost, aad=row_aad(lost["event_id"]))
    bad = await b.db.inbound.enqueue("matrix", lost["event_id"], foreign, lane=room_id)
    good = await b.db.inbound.enqueue("matrix", after["event_id"],
                                      seal_event(b.privacy.cipher, after["event_id"], after),
                                      lane=room_id)
    assert bad is not None and good is not None
    b.worker.wake("matrix", room_id)
    await captured.wait_for(lambda e: e.event_id == after["event_id"])
    letter = await b.db.dead_letters.get(f"in-{bad}")
    assert letter is not None
    assert (letter.source, letter.reason, letter.error) == ("matrix", "undecryptable",
                                                            "DecryptError")
    assert not any(e.event_id == lost["event_id"] for e in captured.events)
    status, _ = await bridge.running.call("POST", f"/admin/v1/dead-letters/in-{bad}/discard",
                                          {"reason": "prueba"})
    assert status == 200
