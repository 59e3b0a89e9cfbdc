"""Nothing lost, nothing stuck: transient failures retry for ever, permanent ones become
dead letters that admins see, retry or discard — on SQLite and PostgreSQL, and end to
end against the real Synapse and the WhatsApp Cloud API simulator."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest_asyncio
import yaml
from sqlalchemy.engine import make_url

from bridge.db import Citizen, Database, InboundItem, InboundStatus, OutboxItem, upgrade
from bridge.deadletters import DeadLetters
from bridge.devtools.simulator import SimulatedUser
from bridge.matrix.api import MatrixError
from bridge.metrics import Metrics
from bridge.privacy import AAD_PAYLOAD, DecryptError
from bridge.retry import is_transient
from bridge.types import RoomID, UserID
from bridge.whatsapp.consent import OPT_IN_BUTTON
from bridge.whatsapp.webhook_parse import citizen_lane
from bridge.worker import InboundWorker
from tests.fixtures.bridge import BridgeHarness
from tests.fixtures.db import PgServer
from tests.fixtures.staff import staff_login
from tests.integration.test_whatsapp import (
    Journey,
    body_is,
    new_citizen,
    opt_in,
    to_citizen,
    wait_until,
)

Handler = Callable[[InboundItem], Awaitable[InboundStatus | None]]


async def _queue(db: Database, lane: str, payload: str, source: str = "whatsapp") -> int:
    item_id = await db.inbound.enqueue(source, f"k:{payload}", payload, lane=lane)  # type: ignore[arg-type]
    assert item_id is not None
    return item_id


async def _until(predicate: Callable[[], Awaitable[bool] | bool], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while True:
            result = predicate()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await asyncio.sleep(0.02)


async def _status(db: Database, item_id: int) -> str:
    item = await db.inbound.get(item_id)
    assert item is not None
    return item.status


# --- storage and worker (both backends) -------------------------------------------------


async def test_a_poison_item_is_set_aside_and_its_lane_goes_on(db: Database) -> None:
    order: list[str] = []
    announced: list[str] = []

    async def handler(item: InboundItem) -> None:
        if item.payload == "a1":
            raise DecryptError("token failed authentication")
        order.append(item.payload)

    async def on_dead(letter_id: str) -> None:
        announced.append(letter_id)

    a1 = await _queue(db, "citizen:abc", "a1")
    await _queue(db, "citizen:abc", "a2")
    await _queue(db, "citizen:abc", "a3")
    worker = InboundWorker(db, {"whatsapp": handler}, on_dead=on_dead)
    worker.start()
    try:
        await _until(lambda: order == ["a2", "a3"] and announced == [f"in-{a1}"])
    finally:
        await worker.stop()
    item = await db.inbound.get(a1)
    assert item is not None and item.status == "dead" and item.attempts == 1
    assert item.payload == "a1"  # kept as stored (encrypted, in real life)
    [letter] = await db.dead_letters.list()
    assert (letter.id, letter.source, letter.lane_kind, letter.reason, letter.error,
            letter.attempts) == (f"in-{a1}", "whatsapp", "citizen", "undecryptable",
                                 "DecryptError", 1)
    assert letter.first_failed_at == letter.last_failed_at
    assert await db.dead_letters.count() == 1
    # Not finished: no retention purge takes it.
    assert await db.inbound.purge_finished(datetime.now(UTC) + timedelta(days=365)) == 2
    assert await db.dead_letters.get(f"in-{a1}") is not None


async def test_transient_failures_retry_past_the_old_limit_in_order(db: Database) -> None:
    """The old worker gave up after 5 attempts; now the item is retried until it goes
    through, and the item behind it in its lane waits for it (order per citizen)."""
    failures = 12
    seen: list[str] = []

    async def handler(item: InboundItem) -> None:
        seen.append(item.payload)
        if item.payload == "a1" and seen.count("a1") <= failures:
            raise MatrixError(502, "M_UNKNOWN", "bad gateway")

    a1 = await _queue(db, "!room:x", "a1", source="matrix")
    a2 = await _queue(db, "!room:x", "a2", source="matrix")
    worker = InboundWorker(db, {"matrix": handler}, backoff=lambda n: 0.01)
    worker.start()
    try:
        await _until(lambda: "a2" in seen, 20)
    finally:
        await worker.stop()
    assert seen == ["a1"] * (failures + 1) + ["a2"]
    first = await db.inbound.get(a1)
    assert first is not None and first.status == "done" and first.attempts == failures
    assert await _status(db, a2) == "done"
    assert await db.dead_letters.list() == []


async def test_a_retried_lane_loses_its_priority_not_its_place(db: Database) -> None:
    a1 = await _queue(db, "a", "a1")
    await _queue(db, "a", "a2")
    b1 = await _queue(db, "b", "b1")
    g1 = await _queue(db, "", "g1")
    await db.inbound.note_failure(a1, "ConnectionError", 3)
    heads = await db.inbound.lane_heads("whatsapp")
    assert [h.id for h in heads] == [b1, g1, a1]
    failed = await db.inbound.get(a1)
    assert failed is not None and failed.status == "pending" and failed.attempts == 3


async def test_retry_and_discard_of_dead_letters(db: Database) -> None:
    citizen, _ = await db.citizens.get_or_create(index_hash="h" * 64, identifier_ct="x",
                                                 wa_id_ct=None, pseudonym_code="ABCD")
    i1 = await _queue(db, "citizen:h", "i1")
    item = await db.inbound.get(i1)
    assert item is not None
    await db.inbound.note_failure(i1, "ConnectionError", 1)
    await db.inbound.set_aside(item, "bad_payload", "KeyError", 2)
    o1 = await db.outbox.add("evt1", citizen.id, "!portal:x", "token")  # type: ignore[arg-type]
    o2 = await db.outbox.add("availability:9", citizen.id, "", "token")  # type: ignore[arg-type]
    assert o1 is not None and o2 is not None
    assert await db.outbox.set_aside(o1, "graph_refused", "400 131026")
    assert await db.outbox.set_aside(o2, "undecryptable", "DecryptError")
    assert not await db.outbox.set_aside(o2, "undecryptable", "DecryptError")  # not pending
    letters = {d.id: d for d in await db.dead_letters.list()}
    assert set(letters) == {f"in-{i1}", f"out-{o1}", f"out-{o2}"}
    assert letters[f"in-{i1}"].first_failed_at <= letters[f"in-{i1}"].last_failed_at
    assert (letters[f"out-{o1}"].lane_kind, letters[f"out-{o2}"].lane_kind) == ("staff",
                                                                               "notice")
    assert letters[f"out-{o1}"].room_id == "!portal:x"
    assert await db.outbox.depth() == 0

    assert await db.dead_letters.retry("in-999999") is None
    assert await db.dead_letters.retry("nonsense") is None
    assert await db.dead_letters.retry(f"in-{i1}") is not None
    again = await db.inbound.get(i1)
    assert again is not None and (again.status, again.attempts) == ("pending", 0)
    assert await db.dead_letters.retry(f"in-{i1}") is None  # no longer dead
    assert await db.dead_letters.retry(f"out-{o1}") is not None
    out = await db.outbox.get(o1)
    assert out is not None and (out.status, out.attempts) == ("pending", 0)
    assert [x.id for x in await db.outbox.due(datetime.now(UTC))] == [o1]
    assert await db.dead_letters.discard(f"out-{o2}") is not None
    gone = await db.outbox.get(o2)
    assert gone is not None and gone.status == "cancelled"
    assert await db.dead_letters.count() == 0


# --- end to end: real Synapse, the Cloud API simulator, the admin API --------------------

UNDECRYPTABLE = "v1.zz.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"  # e.g. its data key retired
LETTER_FIELDS = {"id", "source", "lane_kind", "reason", "error", "attempts",
                 "first_failed_at", "last_failed_at"}


@pytest_asyncio.fixture(loop_scope="session")
async def journey(bridge: BridgeHarness) -> AsyncIterator[Journey]:
    j = await opt_in(bridge, new_citizen(), "Hola, tengo una consulta")
    yield j
    await j.desk.close()


def _has(text: str) -> Callable[[Any], bool]:
    return lambda ev: text in str(getattr(ev, "body", ""))


async def _letters(h: BridgeHarness) -> dict[str, dict[str, Any]]:
    status, answer = await h.running.call("GET", "/admin/v1/dead-letters")
    assert status == 200
    return {d["id"]: d for d in answer["dead_letters"]}


async def _metric(h: BridgeHarness, sample: str) -> float:
    status, text = await h.running.call("GET", "/metrics", token=None)
    assert status == 200
    for line in str(text).splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


async def _citizen_row(h: BridgeHarness, citizen: SimulatedUser) -> Citizen:
    b = h.running.bridge
    row = await b.db.citizens.by_index(b.privacy.index.digest(citizen.user_id))
    assert row is not None
    return row


async def test_poison_inbound_item_becomes_a_dead_letter_and_the_lane_goes_on(
        journey: Journey) -> None:
    j, h = journey, journey.h
    b = h.running.bridge
    counted = 'civic_bridge_dead_letters_total{reason="undecryptable",source="whatsapp"}'
    before = await _metric(h, counted)
    lane = citizen_lane((await _citizen_row(h, j.citizen)).index_hash)
    poison = await b.db.inbound.enqueue("whatsapp", f"msg:poison-{secrets.token_hex(4)}",
                                        UNDECRYPTABLE, lane=lane)
    assert poison is not None
    letter_id = f"in-{poison}"
    b.worker.wake("whatsapp", lane)
    await j.write(h.wa.text_message(j.citizen, "escrito tras un mensaje ilegible"))  # 200
    await j.seen(body_is("escrito tras un mensaje ilegible"))
    notice = await j.seen(_has(letter_id))
    assert notice.body.startswith("Un mensaje de WhatsApp no se ha podido reenviar")

    letter = (await _letters(h))[letter_id]
    assert set(letter) == LETTER_FIELDS  # nothing more: no payload, room or person
    assert (letter["source"], letter["lane_kind"], letter["reason"], letter["error"],
            letter["attempts"]) == ("whatsapp", "citizen", "undecryptable", "DecryptError", 1)
    assert await _metric(h, counted) == before + 1
    assert await _metric(h, "civic_bridge_dead_letters_current") >= 1

    path = f"/admin/v1/dead-letters/{letter_id}"
    assert (await h.running.call("POST", f"{path}/retry", {}))[0] == 400  # a reason, please
    assert (await h.running.call("POST", "/admin/v1/dead-letters/in-999999999/retry",
                                 {"reason": "x"}))[0] == 404
    status, answer = await h.running.call("POST", f"{path}/retry",
                                          {"reason": "clave restaurada, ticket 41"})
    assert status == 200 and answer["status"] == "pending"
    # Still undecryptable: it is processed again and set aside again.
    await wait_until(lambda: _metric_above(h, counted, before + 1), 30, "second failure")
    assert letter_id in await _letters(h)
    status, answer = await h.running.call("POST", f"{path}/discard",
                                          {"reason": "no recuperable, ticket 41"})
    assert status == 200 and answer["status"] == "discarded"
    assert letter_id not in await _letters(h)
    item = await b.db.inbound.get(poison)
    assert item is not None and item.status == "dropped"

    status, audit = await h.running.call("GET", "/admin/v1/audit?limit=20")
    mine = [(e["actor"], e["action"], e["reason"]) for e in audit["entries"]
            if e["object"] == letter_id]
    assert mine == [("api:admin", "dead_letter.discard", "no recuperable, ticket 41"),
                    ("api:admin", "dead_letter.retry", "clave restaurada, ticket 41")]


async def _metric_above(h: BridgeHarness, sample: str, value: float) -> bool:
    return await _metric(h, sample) > value


async def test_outbox_dead_letters_never_block_later_sends(journey: Journey) -> None:
    j, h = journey, journey.h
    b = h.running.bridge
    citizen = await _citizen_row(h, j.citizen)
    # A row whose payload no longer decrypts: set aside, the sends behind it go out.
    broken = await b.db.outbox.add(f"$broken-{secrets.token_hex(4)}", citizen.id,
                                   RoomID(j.room_id), UNDECRYPTABLE)
    assert broken is not None
    b.outbox.wake()
    await j.desk.send_text(j.room_id, "detrás de la fila rota")
    await j.sent_to_citizen(lambda s: s.get("text", {}).get("body") == "detrás de la fila rota")
    notice = await j.seen(_has(f"out-{broken}"))
    assert notice.body.startswith("Mensaje no enviado a WhatsApp")
    assert (await _letters(h))[f"out-{broken}"]["reason"] == "undecryptable"

    # Graph refuses a send for good: a dead letter, staff told why, the next one goes.
    h.wa.fail_next(code=131026, http_status=400)
    await j.desk.send_text(j.room_id, "rechazado por WhatsApp")
    refused = await j.seen(lambda e: "message undeliverable" in str(getattr(e, "body", "")))
    letter_id = re.search(r"out-\d+", refused.body).group(0)  # type: ignore[union-attr]
    letter = (await _letters(h))[letter_id]
    assert (letter["source"], letter["lane_kind"], letter["reason"], letter["error"]) == (
        "outbox", "staff", "graph_refused", "400 131026")
    await j.desk.send_text(j.room_id, "el siguiente sí sale")
    await j.sent_to_citizen(lambda s: s.get("text", {}).get("body") == "el siguiente sí sale")

    # An admin retries it (say, the citizen's number works again): it goes out once.
    status, _ = await h.running.call("POST", f"/admin/v1/dead-letters/{letter_id}/retry",
                                     {"reason": "número reactivado"})
    assert status == 200
    await j.sent_to_citizen(lambda s: s.get("text", {}).get("body") == "rechazado por WhatsApp")
    row_id = int(letter_id.removeprefix("out-"))

    async def sent() -> bool:
        row = await b.db.outbox.get(row_id)
        return row is not None and row.status == "sent"

    await wait_until(sent, 30, "the retried row marked sent")
    assert [s.get("text", {}).get("body") for s in h.wa.sent].count(
        "rechazado por WhatsApp") == 1
    assert letter_id not in await _letters(h)


async def test_synapse_outage_longer_than_the_old_give_up_loses_nothing(
        bridge: BridgeHarness) -> None:
    """Synapse stopped for 40 s (the old worker gave up after about 30 s) while a new
    citizen writes, opts in and writes again: afterwards all of it is in the portal and
    nothing was set aside."""
    h = bridge
    b = h.running.bridge
    before = set(await b.db.dead_letters.list())
    desk = await staff_login(h.synapse.synapse, h.desk.localpart, h.desk.password)
    citizen = new_citizen("Lucía Gómez")
    try:
        await h.synapse.synapse.stop()
        try:
            outage = asyncio.get_running_loop().time()
            assert await h.wa.deliver(h.webhook_url, h.wa.text_message(
                citizen, "primer mensaje con el servidor caído")) == 200
            await h.wa.wait_for_sent(lambda s: s.get("type") == "interactive"
                                     and to_citizen(s, citizen), timeout=30)
            tap = h.wa.button_reply(citizen, OPT_IN_BUTTON, "Acepto")
            assert await h.wa.deliver(h.webhook_url, tap) == 200
            assert await h.wa.deliver(h.webhook_url, h.wa.text_message(
                citizen, "segundo mensaje con el servidor caído")) == 200
            await asyncio.sleep(40 - (asyncio.get_running_loop().time() - outage))
            row = await _citizen_row(h, citizen)
            lane = citizen_lane(row.index_hash)
            waiting = await b.db.inbound.count_lane("whatsapp", lane)
            assert waiting.get("pending", 0) >= 1 and "dead" not in waiting
        finally:
            await h.synapse.synapse.start()
        room = await wait_until(lambda: b.db.rooms.portal_for(row.id), 150, "portal")
        await desk.join(room.room_id)
        j = Journey(h, citizen, room.room_id, desk)
        await j.seen(body_is("primer mensaje con el servidor caído"), timeout=60)
        await j.seen(body_is("segundo mensaje con el servidor caído"), timeout=60)
        assert set(await b.db.dead_letters.list()) == before
        assert (await b.db.citizens.get(row.id)).consent_state == "granted"  # type: ignore[union-attr]
    finally:
        await desk.close()


async def test_announcements_go_to_the_conversation_or_the_management_room(
        db: Database) -> None:
    """A dead letter is announced in the open portal of the citizen it concerns, else in
    the management room; the notice names the letter and the reason class, no content."""
    told: list[tuple[str, str]] = []

    async def notify(room_id: RoomID, text: str) -> None:
        told.append((room_id, text))

    metrics = Metrics()
    letters = DeadLetters(db, metrics, notify, management_room="!mgmt:x")
    with_portal, _ = await db.citizens.get_or_create(
        index_hash="a" * 64, identifier_ct="x", wa_id_ct=None, pseudonym_code="AAAA")
    await db.rooms.create(RoomID("!portal:x"), "portal", "WhatsApp", UserID("@bot:x"),
                          citizen_id=with_portal.id)
    ids = []
    for index_hash, body in (("a" * 64, "secreto uno"), ("b" * 64, "secreto dos")):
        item_id = await _queue(db, citizen_lane(index_hash), body)
        item = await db.inbound.get(item_id)
        assert item is not None
        await db.inbound.set_aside(item, "bad_payload", "KeyError", 1)
        ids.append(f"in-{item_id}")
        await letters.announce(f"in-{item_id}")
    assert [room for room, _ in told] == ["!portal:x", "!mgmt:x"]
    for (_, text), letter_id in zip(told, ids, strict=True):
        assert letter_id in text and "formato válido" in text and "secreto" not in text
    sample = metrics.registry.get_sample_value(
        "civic_bridge_dead_letters_total", {"source": "whatsapp", "reason": "bad_payload"})
    assert sample == 2
    assert metrics.registry.get_sample_value("civic_bridge_dead_letters_current") == 2

    await letters.discard("tester", ids[0], "duplicado")
    assert metrics.registry.get_sample_value("civic_bridge_dead_letters_current") == 1
    [entry] = await db.audit.list(limit=1)
    assert (entry.actor, entry.action, entry.object, entry.reason) == (
        "tester", "dead_letter.discard", ids[0], "duplicado")


async def test_the_admin_cli_lists_retries_and_discards(bridge: BridgeHarness,
                                                        tmp_path: Path) -> None:
    h = bridge
    b = h.running.bridge
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(h.running.config.model_dump(mode="json")),
                      encoding="utf-8")
    # A transaction whose message event has a timestamp that is not a number: stored and
    # answered 200 (never a 5xx that Synapse would retry for ever), then a dead letter.
    room = f"!elsewhere{secrets.token_hex(4)}:localhost"
    junk = {"type": "m.room.message", "room_id": room, "sender": h.desk.user_id,
            "event_id": f"$junk{secrets.token_hex(4)}", "origin_server_ts": "ayer",
            "content": {"msgtype": "m.text", "body": "hora ilegible"}}
    status, _ = await h.running.call(
        "PUT", f"/_matrix/app/v1/transactions/junk{secrets.token_hex(4)}",
        {"events": [junk]}, token="hs")
    assert status == 200
    [item] = await _lane_items(b.db, room)
    letter_id = f"in-{item}"
    await wait_until(lambda: b.db.dead_letters.get(letter_id), 30, "dead letter")

    code, out, _ = await _cli(config, "dead-letters")
    assert code == 0
    [line] = [x for x in out.splitlines() if x.startswith(letter_id + " ")]
    assert line.split()[:4] == [letter_id, "matrix", "room", "bad_payload"]
    code, _, err = await _cli(config, "dead-letters", "retry", letter_id)
    assert code == 2 and "--reason" in err
    code, out, _ = await _cli(config, "dead-letters", "retry", letter_id, "--reason", "prueba")
    assert code == 0 and "pending" in out
    await wait_until(lambda: b.db.dead_letters.get(letter_id), 30, "dead letter again")
    code, out, _ = await _cli(config, "dead-letters", "discard", letter_id,
                              "--reason", "evento basura")
    assert code == 0 and "discarded" in out
    code, out, _ = await _cli(config, "--json", "dead-letters")
    assert code == 0 and letter_id not in {d["id"] for d in json.loads(out)["dead_letters"]}
    code, _, err = await _cli(config, "dead-letters", "discard", "in-999999999",
                              "--reason", "x")
    assert code == 1 and "M_NOT_FOUND" in err


async def _lane_items(db: Database, lane: str) -> list[int]:
    return [i.id for i in await db.inbound.after(0, 100_000) if i.lane == lane]


async def _cli(config: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "admin", "-c", str(config), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_outbox_never_gives_up_on_a_transient_failure(journey: Journey) -> None:
    """The old outbox failed a send for good at its 8th attempt; at its 51st, a Graph 500
    still only schedules the next attempt, at most 5 minutes ahead."""
    j, h = journey, journey.h
    b = h.running.bridge
    citizen = await _citizen_row(h, j.citizen)
    later = datetime.now(UTC) + timedelta(hours=1)
    token = b.privacy.cipher.encrypt_json(
        {"type": "text", "body": "insistente", "system": True}, aad=AAD_PAYLOAD)
    row_id = await b.db.outbox.add(f"persistent-{secrets.token_hex(4)}", citizen.id,
                                   RoomID(""), token, not_before=later)
    assert row_id is not None
    for _ in range(49):
        await b.db.outbox.retry_later(row_id, later, "500 1")
    h.wa.fail_next(code=1, http_status=500)
    await b.db.outbox.retry_later(row_id, datetime.now(UTC), "500 1")  # due now: #51
    b.outbox.wake()

    async def failed_again() -> OutboxItem | None:
        row = await b.db.outbox.get(row_id)
        return row if row is not None and row.attempts == 51 else None

    row = await wait_until(failed_again, 30, "the 51st attempt")
    assert row.status == "pending" and row.last_error == "500 1"
    assert row.next_attempt_at <= datetime.now(UTC) + timedelta(seconds=300)
    await b.db.outbox.retry_later(row_id, datetime.now(UTC), "500 1")  # due now: #52
    b.outbox.wake()
    await j.sent_to_citizen(lambda s: s.get("text", {}).get("body") == "insistente")


async def test_a_postgresql_connection_cut_is_a_transient_failure(pg_server: PgServer) -> None:
    """What the worker sees when PostgreSQL restarts under it mid-transaction (its
    connection is terminated): a transient failure, so the item is retried; the next
    attempt gets a fresh connection."""
    url = await pg_server.create()
    await upgrade(url)
    name = make_url(url).database
    async with await Database.open(url) as db:
        item_id = await _queue(db, "a", "a1")
        failure: BaseException | None = None
        try:
            async with db.transaction() as tx:
                await tx.inbound.get(item_id)
                admin = await pg_server._admin()
                try:
                    await admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = $1 AND pid <> pg_backend_pid()", name)
                finally:
                    await admin.close()
                await tx.inbound.note_failure(item_id, "x", 1)
        except Exception as exc:
            failure = exc
        assert failure is not None, "the connection was not cut: the test proves nothing"
        assert is_transient(failure), repr(failure)
        await db.inbound.note_failure(item_id, "ConnectionError", 1)  # reconnects
        assert await _status(db, item_id) == "pending"
    await pg_server.drop(url)
