"""The outbox across a crash mid-send: Graph accepted a message, the bridge never read
the answer. Its delivery status (which echoes `biz_opaque_callback_data`) settles the
row; only without one, after the confirmation window, is it sent again. A send stopped
before it reached Graph's messages endpoint goes out after the restart without waiting.

Real Synapse, the bridge over real HTTP, the Cloud API simulator holding the answer.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from nio.crypto.attachments import encrypt_attachment
from sqlalchemy import select

from bridge.db import OutboxItem
from bridge.db.models import InboundRow, OutboxRow
from bridge.services import Bridge
from bridge.whatsapp.outbox import callback_data, callback_item
from bridge.whatsapp.webhook_parse import dedupe_key
from tests.fixtures.bridge import BridgeHarness
from tests.fixtures.wamids import opened
from tests.integration.test_notices import entry, send, subscribe, templates_to
from tests.integration.test_whatsapp import (
    Journey,
    body_is,
    new_citizen,
    opt_in,
    to_citizen,
    wait_until,
)

pytestmark = pytest.mark.integration
# whatsapp.outbox_confirm_window_seconds as the test bridge has it: the default.
CONFIRM_WINDOW = timedelta(minutes=10)


def text_to(j: Journey, text: str) -> Callable[[dict[str, Any]], bool]:
    return lambda s: to_citizen(s, j.citizen) and s.get("text", {}).get("body") == text


async def crash_mid_send(j: Journey, text: str) -> tuple[OutboxItem, str, str]:
    """Staff send `text`; the simulator accepts and records it but holds its answer; the
    bridge stops meanwhile and comes back on the same database. Returns the outbox row
    as the crash left it, the wamid WhatsApp gave the message, and the Matrix event id."""
    h = j.h
    is_it = text_to(j, text)
    release = h.wa.hold_next_send(is_it)
    try:
        event_id = await j.desk.send_text(j.room_id, text)
        sent = await h.wa.wait_for_sent(is_it, timeout=30)
        wamid = h.wa.sent_ids[next(i for i, s in enumerate(h.wa.sent) if s is sent)]
        assert wamid is not None
        item_id = callback_item(sent.get("biz_opaque_callback_data"))
        assert item_id is not None, "the send carries no callback data of an outbox row"
        item = await h.running.bridge.db.outbox.get(item_id)
        assert item is not None and item.idempotency_key == event_id
        assert item.status == "pending" and item.sending_at is not None
        await h.running.stop()
    finally:
        release.set()
    await h.running.start()
    return item, wamid, event_id


async def row_in(b: Bridge, item_id: int, status: str) -> OutboxItem | None:
    item = await b.db.outbox.get(item_id)
    return item if item is not None and item.status == status else None


async def row_for(b: Bridge, event_id: str) -> OutboxItem:
    """The outbox row of a staff event (its idempotency key)."""
    async with b.db.session() as session:
        item_id = await session.scalar(
            select(OutboxRow.id).where(OutboxRow.idempotency_key == event_id))
    assert item_id is not None, "the staff event was not queued"
    item = await b.db.outbox.get(item_id)
    assert item is not None
    return item


async def send_file(j: Journey, data: bytes, filename: str) -> str:
    """Staff upload `data` encrypted and send it as an m.file; returns the event id."""
    ciphertext, keys = encrypt_attachment(data)
    async with aiohttp.ClientSession() as http, http.post(
            f"{j.h.synapse.synapse.url}/_matrix/media/v3/upload", data=ciphertext,
            params={"filename": filename},
            headers={"Authorization": f"Bearer {j.desk.client.access_token}",
                     "Content-Type": "application/octet-stream"}) as up:
        mxc = (await up.json())["content_uri"]
    resp = await j.desk.client.room_send(j.room_id, "m.room.message", {
        "msgtype": "m.file", "body": filename, "filename": filename,
        "info": {"mimetype": "application/pdf", "size": len(data)},
        "file": {**keys, "url": mxc}}, ignore_unverified_devices=True)
    return str(resp.event_id)


async def test_crash_mid_send_is_confirmed_by_its_status_and_not_resent(
        bridge: BridgeHarness) -> None:
    h = bridge
    j = await opt_in(h, new_citizen(), "hola, espero su respuesta")
    try:
        await j.seen(body_is("hola, espero su respuesta"))
        text = "respuesta aceptada por WhatsApp justo antes del fallo"
        item, wamid, event_id = await crash_mid_send(j, text)
        assert item.next_attempt_at - item.sending_at >= CONFIRM_WINDOW - timedelta(seconds=5)
        b = h.running.bridge

        # Within the window the restarted bridge waits for the status (its outbox polls
        # every second): nothing resent, the row still unconfirmed.
        await asyncio.sleep(3)
        assert sum(map(text_to(j, text), h.wa.sent)) == 1
        waiting = await b.db.outbox.get(item.id)
        assert waiting is not None and waiting.status == "pending" and waiting.sending_at

        # Meta's `sent` status echoes the callback data: the row is sent with that wamid,
        # linked to the staff event like a normal success.
        await j.write(h.wa.status_update(wamid, "sent", j.citizen))
        confirmed = await wait_until(lambda: row_in(b, item.id, "sent"), 30, "confirmed")
        assert confirmed.wamid_hash == b.privacy.index.wamid(wamid)
        assert confirmed.sending_at is None
        link = await b.db.messages.by_wamid(b.privacy.index.wamid(wamid))
        assert link is not None and (link.event_id, link.room_id, link.direction) == (
            event_id, j.room_id, "out")

        # So the citizen's read status becomes the ghost's read receipt on that event.
        await j.write(h.wa.status_update(wamid, "read", j.citizen))
        ghost = (await b.db.citizens.by_index(
            b.privacy.index.digest(j.citizen.user_id))).ghost_user_id

        async def receipt() -> bool:
            await j.desk.sync_once(timeout_ms=200)
            room = j.desk.client.rooms[j.room_id]
            return ghost in room.read_receipts and \
                room.read_receipts[ghost].event_id == event_id
        await wait_until(receipt, 30, "read receipt")
        await asyncio.sleep(1.5)
        assert sum(map(text_to(j, text), h.wa.sent)) == 1
    finally:
        await j.desk.close()


async def test_crash_mid_send_without_status_is_resent_once_after_the_window(
        bridge: BridgeHarness) -> None:
    h = bridge
    j = await opt_in(h, new_citizen(), "hola, ¿me contestan?")
    try:
        await j.seen(body_is("hola, ¿me contestan?"))
        h.running.bridge.outbox.confirm_window = timedelta(seconds=2)  # this process only
        text = "respuesta cuyo estado nunca llega"
        item, first_wamid, event_id = await crash_mid_send(j, text)
        assert item.sending_at is not None
        assert timedelta(seconds=1) < item.next_attempt_at - item.sending_at < timedelta(seconds=3)
        b = h.running.bridge

        await wait_until(lambda: sum(map(text_to(j, text), h.wa.sent)) == 2, 30, "resend")
        resent = await wait_until(lambda: row_in(b, item.id, "sent"), 30, "resent row")
        second_wamid = h.wa.sent_ids[max(i for i, s in enumerate(h.wa.sent)
                                         if text_to(j, text)(s))]
        assert second_wamid != first_wamid and resent.sending_at is None
        assert resent.wamid_hash == b.privacy.index.wamid(second_wamid)
        assert [s.get("biz_opaque_callback_data") for s in h.wa.sent
                if text_to(j, text)(s)] == [callback_data(item.id)] * 2
        link = await b.db.messages.by_event(event_id)
        assert link is not None and opened(b, link) == second_wamid
        assert any(f"outbox #{item.id}: no delivery status within the confirmation window"
                   in line for line in h.log_lines)
        await asyncio.sleep(2)
        assert sum(map(text_to(j, text), h.wa.sent)) == 2  # once, not again and again
    finally:
        await j.desk.close()


async def test_crash_mid_send_then_failed_status_is_a_permanent_error(
        bridge: BridgeHarness) -> None:
    h = bridge
    j = await opt_in(h, new_citizen(), "hola, escribo desde un número raro")
    try:
        await j.seen(body_is("hola, escribo desde un número raro"))
        text = "respuesta que WhatsApp no podrá entregar"
        item, wamid, _ = await crash_mid_send(j, text)
        b = h.running.bridge
        await j.write(h.wa.status_update(wamid, "failed", j.citizen,
                                         errors=[(131026, "Message undeliverable")]))
        failed = await wait_until(lambda: row_in(b, item.id, "failed"), 30, "failed row")
        assert failed.last_error == "status failed 131026" and failed.sending_at is None
        await j.seen(lambda e: getattr(e, "body", "").startswith(
            "Mensaje no enviado a WhatsApp: message undeliverable to this recipient. "))
        await asyncio.sleep(1.5)
        assert sum(map(text_to(j, text), h.wa.sent)) == 1
    finally:
        await j.desk.close()


async def test_notice_cut_short_by_a_crash_is_logged_from_its_status(
        bridge: BridgeHarness) -> None:
    """A notice of availability: its log entry gets the wamid from the first status."""
    h = bridge
    citizen = new_citizen()
    code = await subscribe(h, citizen)
    is_it = lambda s: to_citizen(s, citizen) and s.get("type") == "template"  # noqa: E731
    release = h.wa.hold_next_send(is_it)
    try:
        status, data = await send(h, code, "NOT-2026/CRASH")
        assert status == 202, data
        sent = await h.wa.wait_for_sent(is_it, timeout=30)
        await h.running.stop()
    finally:
        release.set()
    wamid = h.wa.sent_ids[next(i for i, s in enumerate(h.wa.sent) if s is sent)]
    assert wamid is not None
    await h.running.start()
    b = h.running.bridge
    logged = await b.db.notices.get(data["id"])
    assert logged is not None and logged.wamid_hash is None  # Graph's answer was never read
    await asyncio.sleep(2)
    assert len(templates_to(h, citizen)) == 1

    assert await h.wa.deliver(h.webhook_url, h.wa.status_update(wamid, "delivered",
                                                                citizen)) == 200

    async def delivered() -> bool:
        return bool((await entry(h, "NOT-2026/CRASH"))["status"] == "delivered")
    await wait_until(delivered, 30, "notice delivered")
    shown = await entry(h, "NOT-2026/CRASH")
    assert shown["has_wamid"] and shown["sent_at"] and shown["delivered_at"]
    logged = await b.db.notices.get(data["id"])
    assert logged is not None and logged.wamid_hash == b.privacy.index.wamid(wamid)
    item_id = callback_item(sent["biz_opaque_callback_data"])
    assert item_id is not None and await row_in(b, item_id, "sent") is not None
    await asyncio.sleep(1.5)
    assert len(templates_to(h, citizen)) == 1


async def test_statuses_with_unknown_or_junk_callback_data_change_nothing(
        bridge: BridgeHarness) -> None:
    h = bridge
    j = await opt_in(h, new_citizen(), "hola, una pregunta rápida")
    b = h.running.bridge
    try:
        await j.seen(body_is("hola, una pregunta rápida"))
        text = "respuesta normal, confirmada por Graph"
        event_id = await j.desk.send_text(j.room_id, text)
        sent = await h.wa.wait_for_sent(text_to(j, text), timeout=30)
        link = await wait_until(lambda: b.db.messages.by_event(event_id), 30, "link")
        item_id = callback_item(sent["biz_opaque_callback_data"])
        assert item_id is not None
        before = await b.db.outbox.get(item_id)
        assert before is not None and (before.status, before.wamid_hash) == ("sent",
                                                                              link.wamid_hash)

        # Unknown rows, junk, and the callback data of a row already settled, each on
        # a status (sent and failed) of a message the bridge does not know.
        junk: list[Any] = ["cb1.999999999", "garbage", "cb1.", "x" * 600, 42, {"id": item_id},
                           ["cb1.1"], callback_data(item_id)]
        strangers = ["wamid." + secrets.token_urlsafe(24) for _ in junk]
        for stranger, data in zip(strangers, junk, strict=True):
            for status in ("sent", "failed"):
                await j.write(h.wa.status_update(
                    stranger, status, j.citizen, callback_data=data,
                    errors=[(131026, "Message undeliverable")] if status == "failed" else None))
        # Statuses run in one lane, in order: the receipt shows the junk was handled.
        await j.write(h.wa.status_update(opened(b, link), "read", j.citizen))
        ghost = (await b.db.citizens.by_index(
            b.privacy.index.digest(j.citizen.user_id))).ghost_user_id

        async def receipt() -> bool:
            await j.desk.sync_once(timeout_ms=200)
            room = j.desk.client.rooms[j.room_id]
            return ghost in room.read_receipts and \
                room.read_receipts[ghost].event_id == event_id
        await wait_until(receipt, 30, "read receipt")

        after = await b.db.outbox.get(item_id)
        assert after == before
        for stranger in strangers:
            assert await b.db.messages.by_wamid(b.privacy.index.wamid(stranger)) is None
            assert await b.db.outbox.by_wamid(b.privacy.index.wamid(stranger)) is None
        keys = [dedupe_key(b.privacy.index, w, status) for w in strangers
                for status in ("sent", "failed")]
        async with b.db.session() as session:
            statuses = list(await session.scalars(
                select(InboundRow.status).where(InboundRow.dedupe_key.in_(keys))))
        assert statuses == ["done"] * len(keys)
        assert not any(getattr(e, "body", "").startswith("Mensaje no enviado")
                       for e in j.desk._timeline[j.room_id])
    finally:
        await j.desk.close()


async def test_media_send_stopped_mid_upload_goes_out_once_without_waiting(
        bridge: BridgeHarness) -> None:
    """Stopped while its media was being uploaded to Graph, a send had created no
    message: it is not in flight, and after the restart it goes out at once (not after
    the confirmation window), exactly once."""
    h = bridge
    j = await opt_in(h, new_citizen(), "hola, ¿me mandan el impreso?")
    try:
        await j.seen(body_is("hola, ¿me mandan el impreso?"))
        data = b"%PDF-1.4 impreso " + secrets.token_bytes(16)
        is_it = lambda s: to_citizen(s, j.citizen) and s.get("type") == "document"  # noqa: E731
        hold = h.wa.hold_next_upload()
        try:
            event_id = await send_file(j, data, "impreso.pdf")
            await asyncio.wait_for(hold.arrived.wait(), 30)
            item = await row_for(h.running.bridge, event_id)
            assert item.status == "pending" and item.sending_at is None
            assert item.next_attempt_at <= datetime.now(UTC)
            await h.running.stop()
        finally:
            hold.release.set()
        assert not any(map(is_it, h.wa.sent))

        await h.running.start()
        b = h.running.bridge
        assert b.outbox.confirm_window == CONFIRM_WINDOW
        sent = await h.wa.wait_for_sent(is_it, timeout=30)
        assert sent["biz_opaque_callback_data"] == callback_data(item.id)
        assert h.wa.media[sent["document"]["id"]].data == data
        done = await wait_until(lambda: row_in(b, item.id, "sent"), 30, "sent row")
        assert done.sending_at is None and done.attempts == 1
        link = await b.db.messages.by_event(event_id)
        assert link is not None and link.wamid_hash == done.wamid_hash
        assert not any(f"outbox #{item.id}: no delivery status" in line
                       for line in h.log_lines)
        await asyncio.sleep(1.5)
        assert sum(map(is_it, h.wa.sent)) == 1
    finally:
        await j.desk.close()
