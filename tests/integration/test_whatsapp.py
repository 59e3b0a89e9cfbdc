"""WhatsApp mirroring end to end: Cloud API simulator ⇄ bridge ⇄ real Synapse ⇄ staff."""

from __future__ import annotations

import asyncio
import json
import secrets
import string
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import pytest_asyncio
import yaml
from nio import RoomMessage
from nio.crypto.attachments import decrypt_attachment, encrypt_attachment

from bridge.devtools.simulator import SimulatedUser
from bridge.privacy import AAD_PAYLOAD
from bridge.types import EventID, Pseudonym, RoomID, UserID
from bridge.whatsapp import consent, stored
from bridge.whatsapp.consent import OPT_IN_BUTTON, OPT_OUT_BUTTON
from bridge.whatsapp.webhook_parse import InboundMessage, citizen_lane, dedupe_key
from tests.fixtures.bridge import BridgeHarness
from tests.fixtures.loopwatch import LoopWatch
from tests.fixtures.staff import StaffClient, staff_login

pytestmark = pytest.mark.integration

# Every identifier a test citizen uses; the privacy sweep looks for all of them in
# everything staff saw (decrypted) and everything the run stored or logged.
USED_IDENTIFIERS: list[str] = []
DECRYPTED_SEEN: list[str] = []


def new_citizen(name: str = "María Pérez", with_number: bool = True) -> SimulatedUser:
    wa_id = "346" + "".join(secrets.choice(string.digits) for _ in range(8))
    bsuid = "ES." + "".join(secrets.choice(string.ascii_letters + string.digits)
                            for _ in range(20))
    USED_IDENTIFIERS.extend([wa_id, bsuid, wa_id[2:]])
    return SimulatedUser(wa_id=wa_id if with_number else None, user_id=bsuid, name=name)


def to_citizen(sent: dict[str, Any], citizen: SimulatedUser) -> bool:
    return (sent.get("to") == citizen.wa_id if citizen.wa_id
            else sent.get("recipient") == citizen.user_id)


def wamid_of(value: dict[str, Any]) -> str:
    return str(value["messages"][0]["id"])


async def wait_until(predicate: Callable[[], Any], timeout: float = 30, what: str = "") -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.1)


@dataclass
class Journey:
    """A citizen who has opted in, with the service desk joined to their portal."""

    h: BridgeHarness
    citizen: SimulatedUser
    room_id: str
    desk: StaffClient

    async def write(self, value: dict[str, Any]) -> str:
        assert await self.h.wa.deliver(self.h.webhook_url, value) == 200
        return wamid_of(value) if "messages" in value else ""

    async def seen(self, predicate: Callable[[Any], bool], timeout: float = 30) -> Any:
        """The first decrypted room event in the portal matching `predicate`."""
        async def find() -> Any:
            await self.desk.sync_once(timeout_ms=200)
            for ev in self.desk._timeline.get(self.room_id, []):
                DECRYPTED_SEEN.append(str(ev.source))
                if predicate(ev):
                    return ev
            return None
        return await wait_until(find, timeout, "event in portal")

    async def sent_to_citizen(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first send to this citizen matching `predicate` (the simulator is shared
        by every test of the session)."""
        return await self.h.wa.wait_for_sent(
            lambda s: to_citizen(s, self.citizen) and predicate(s), timeout=30)


async def opt_in(h: BridgeHarness, citizen: SimulatedUser, first: str) -> Journey:
    """First contact → notice → opt-in button → portal; the desk joins it.

    The desk's device exists before the citizen opts in, as a staff member's Element
    does: the ghost shares its room keys with the devices of invited staff (a device
    created later only reads messages sent after it appeared; see docs/e2ee.md).
    """
    desk = await staff_login(h.synapse.synapse, h.desk.localpart, h.desk.password)
    try:
        assert await h.wa.deliver(h.webhook_url, h.wa.text_message(citizen, first)) == 200
        notice = await h.wa.wait_for_sent(
            lambda s: s.get("type") == "interactive" and to_citizen(s, citizen), timeout=30)
        buttons = notice["interactive"]["action"]["buttons"]
        assert [b["reply"]["id"] for b in buttons] == [OPT_IN_BUTTON, OPT_OUT_BUTTON]
        b = h.running.bridge
        tap = h.wa.button_reply(citizen, OPT_IN_BUTTON, "Acepto")
        assert await h.wa.deliver(h.webhook_url, tap) == 200
        citizen_row = await wait_until(lambda: _in_state(h, citizen, "granted"), 30, "opt-in")
        room = await wait_until(lambda: b.db.rooms.portal_for(citizen_row.id), 30, "portal")
        await desk.join(room.room_id)
    except BaseException:
        await desk.close()
        raise
    return Journey(h, citizen, room.room_id, desk)


async def _in_state(h: BridgeHarness, citizen: SimulatedUser, state: str) -> Any:
    """The citizen's row once its consent state is `state`, else None."""
    b = h.running.bridge
    row = await b.db.citizens.by_index(b.privacy.index.digest(citizen.user_id))
    return row if row is not None and row.consent_state == state else None


@pytest_asyncio.fixture(loop_scope="session")
async def journey(bridge: BridgeHarness) -> AsyncIterator[Journey]:
    j = await opt_in(bridge, new_citizen(), "Hola, quería preguntar por mi solicitud")
    yield j
    await j.desk.close()


def body_is(text: str) -> Callable[[Any], bool]:
    return lambda ev: isinstance(ev, RoomMessage) and getattr(ev, "body", None) == text


async def test_webhook_handshake_and_signature(bridge: BridgeHarness,
                                              loop_watch: LoopWatch) -> None:
    token = bridge.running.config.whatsapp.verify_token
    assert await bridge.wa.verify_handshake(bridge.webhook_url, token, "12345") == (200, "12345")
    assert (await bridge.wa.verify_handshake(bridge.webhook_url, "wrong-token"))[0] == 403
    assert (await bridge.wa.verify_handshake(bridge.webhook_url, token, mode="other"))[0] == 403

    b = bridge.running.bridge
    citizen = new_citizen()
    value = bridge.wa.text_message(citizen, "mensaje falsificado")
    for signing in ("forged", "missing"):
        assert await bridge.wa.deliver(bridge.webhook_url, value, signing=signing) == 401
    assert await b.db.inbound.pending("whatsapp") == []
    assert await b.db.citizens.by_index(b.privacy.index.digest(citizen.user_id)) is None
    assert await bridge.wa.deliver_raw(bridge.webhook_url, b"{not json") == 400
    assert await bridge.wa.deliver_raw(bridge.webhook_url, b'{"object": "page"}') == 400
    # Unknown fields and future message types are tolerated.
    odd = bridge.wa.unsupported_message(citizen, kind="hologram") | {"new_field": {"x": 1}}
    assert await bridge.wa.deliver(bridge.webhook_url, odd) == 200


async def test_consent_journey(bridge: BridgeHarness) -> None:
    h, b = bridge, bridge.running.bridge
    citizen = new_citizen()
    first = "Buenos días, necesito un certificado"
    j = await opt_in(h, citizen, first)
    try:
        # The held first message is mirrored after opt-in, decryptable by staff who
        # were only invited when the portal was created.
        held = await j.seen(body_is(first))
        row = await b.db.citizens.by_index(b.privacy.index.digest(citizen.user_id))
        assert row is not None and held.sender == row.ghost_user_id
        await j.sent_to_citizen(lambda s: "conversación privada" in s.get("text", {}).get(
            "body", ""))
        # The opt-in tap itself is not mirrored.
        assert not any(getattr(e, "body", "") == "Acepto" for e in j.desk._timeline[j.room_id])

        reply = "Hola, le atiende el servicio de atención"
        await j.desk.send_text(j.room_id, reply)
        sent = await j.sent_to_citizen(lambda s: s.get("text", {}).get("body") == reply)
        assert sent["to"] == citizen.wa_id and sent["type"] == "text"

        # Opt-out, with accents and case: confirmed, relay stops both ways, ghost leaves.
        await j.write(h.wa.text_message(citizen, "  Cancelar "))
        await j.sent_to_citizen(lambda s: "no reenviaremos" in s.get("text", {}).get("body", ""))
        await j.seen(lambda e: "retirado su consentimiento" in getattr(e, "body", ""))
        members = await b.api.members(b.ghosts.bot, j.room_id)
        assert row.ghost_user_id not in {m["state_key"] for m in members}
        count = len(h.wa.sent)
        await j.desk.send_text(j.room_id, "¿Sigue ahí?")
        await j.seen(lambda e: "no tiene activo el reenvío" in getattr(e, "body", ""))
        assert not any(s.get("text", {}).get("body") == "¿Sigue ahí?" for s in h.wa.sent[count:])

        # Writing again later: asked again, not mirrored.
        again = "Perdón, otra pregunta"
        await j.write(h.wa.text_message(citizen, again))
        await wait_until(lambda: sum(s.get("type") == "interactive" and to_citizen(s, citizen)
                                     for s in h.wa.sent) == 2, 30, "second notice")
        await asyncio.sleep(1)
        await j.desk.sync_once()
        assert not any(getattr(e, "body", "") == again for e in j.desk._timeline[j.room_id])

        records = await b.db.consent.for_citizen(row.id)
        assert [r.state for r in records] == ["prompted", "granted", "withdrawn", "prompted"]
        shown = consent.notice_hash(b.config.consent)
        assert all(r.purpose == "mirroring" and r.notice_version == "2"
                   and r.notice_hash == shown and r.evidence for r in records)
    finally:
        await j.desk.close()


async def test_refusal_and_expiry_of_held_messages(bridge: BridgeHarness) -> None:
    h, b = bridge, bridge.running.bridge
    citizen = new_citizen()
    await h.wa.deliver(h.webhook_url, h.wa.text_message(citizen, "hola"))
    row = await wait_until(lambda: b.db.citizens.by_index(b.privacy.index.digest(
        citizen.user_id)), 30)
    await wait_until(lambda: b.db.inbound.held_for(row.id), 30, "held message")
    await h.wa.deliver(h.webhook_url, h.wa.button_reply(citizen, OPT_OUT_BUTTON, "No, gracias"))
    await wait_until(lambda: _in_state(h, citizen, "refused"), 30, "refused")
    # The state flips first (relay stops at once); the held message is dropped next.
    async def none_held() -> bool:
        return await b.db.inbound.held_for(row.id) == []
    await wait_until(none_held, 30, "held message dropped")
    assert await b.db.rooms.portal_for(row.id) is None

    # A held message past consent.hold_hours is deleted by the retention purge.
    other = new_citizen()
    await h.wa.deliver(h.webhook_url, h.wa.text_message(other, "me olvidaré"))
    row2 = await wait_until(lambda: b.db.citizens.by_index(b.privacy.index.digest(
        other.user_id)), 30)
    await wait_until(lambda: b.db.inbound.held_for(row2.id), 30, "held message")
    later = datetime.now(UTC) + timedelta(hours=b.config.consent.hold_hours + 1)
    assert await b.db.inbound.purge_expired_holds(later) >= 1
    assert await b.db.inbound.held_for(row2.id) == []


async def _download(j: Journey, content: dict[str, Any]) -> bytes:
    f = content["file"]
    server, media_id = f["url"][len("mxc://"):].split("/", 1)
    url = f"{j.h.synapse.synapse.url}/_matrix/client/v1/media/download/{server}/{media_id}"
    async with aiohttp.ClientSession() as http, http.get(
            url, headers={"Authorization": f"Bearer {j.desk.client.access_token}"}) as resp:
        assert resp.status == 200
        data = await resp.read()
    return bytes(decrypt_attachment(data, f["key"]["k"], f["hashes"]["sha256"], f["iv"]))


async def test_every_inbound_type_reaches_staff(journey: Journey) -> None:
    j, wa = journey, journey.h.wa
    c = j.citizen
    text_id = await j.write(wa.text_message(c, "texto simple"))
    text_ev = await j.seen(body_is("texto simple"))

    media = {"image": (b"\x89PNG fake image bytes", "image/png"),
             "document": (b"%PDF-1.4 fake", "application/pdf"),
             "audio": (b"OggS fake voice", "audio/ogg"),
             "video": (b"\x00\x00\x00\x18ftypmp4 fake", "video/mp4"),
             "sticker": (b"RIFF fake webp", "image/webp")}
    msgtypes = {"image": "m.image", "document": "m.file", "audio": "m.audio",
                "video": "m.video", "sticker": "m.image"}
    for kind, (data, mime) in media.items():
        media_id = wa.add_media(data, mime)
        caption = f"adjunto {kind}"
        extra: dict[str, Any] = {"filename": "informe.pdf"} if kind == "document" else {}
        if kind not in ("audio", "sticker"):
            extra["caption"] = caption
        await j.write(wa.media_message(c, kind, media_id, **extra))
        ev = await j.seen(lambda e, k=kind: e.source.get("content", {}).get("msgtype")
                          == msgtypes[k] and e.source["content"].get("info", {}).get(
                              "mimetype") == media[k][1])
        assert "url" not in ev.source["content"]  # encrypted attachment only
        assert await _download(j, ev.source["content"]) == data

    await j.write(wa.location_message(c, 40.4168, -3.7038, name="Ayuntamiento"))
    loc = await j.seen(lambda e: e.source.get("content", {}).get("msgtype") == "m.location")
    assert loc.source["content"]["geo_uri"] == "geo:40.4168,-3.7038"

    await j.write(wa.text_message(c, "esto es una respuesta", context_id=text_id))
    reply = await j.seen(body_is("esto es una respuesta"))
    assert reply.source["content"]["m.relates_to"]["m.in_reply_to"]["event_id"] == \
        text_ev.event_id

    await j.write(wa.edit_message(c, text_id, "texto corregido"))
    edit = await j.seen(lambda e: e.source.get("content", {}).get("m.new_content", {}).get(
        "body") == "texto corregido")
    assert edit.source["content"]["m.relates_to"] == {"rel_type": "m.replace",
                                                      "event_id": text_ev.event_id}

    await j.write(wa.reaction_message(c, text_id, "👍"))
    b = j.h.running.bridge
    reaction_id = await wait_until(lambda: b.db.reactions.get(
        UserID(text_ev.sender), EventID(text_ev.event_id)), 30, "reaction")
    event = await b.api.request("GET", f"/_matrix/client/v3/rooms/{j.room_id}/event/"
                                f"{reaction_id}", as_user=b.ghosts.bot)
    assert event["content"]["m.relates_to"]["key"] == "👍"

    doomed_id = await j.write(wa.text_message(c, "lo borraré"))
    doomed = await j.seen(body_is("lo borraré"))
    await j.write(wa.revoke_message(c, doomed_id))

    async def redacted() -> bool:
        ev = await b.api.request("GET", f"/_matrix/client/v3/rooms/{j.room_id}/event/"
                                 f"{doomed.event_id}", as_user=b.ghosts.bot)
        return "redacted_because" in ev.get("unsigned", {})
    await wait_until(redacted, 30, "revoke")

    await j.write(wa.unsupported_message(c))
    await j.seen(lambda e: "no compatible" in e.source.get("content", {}).get("body", ""))


async def test_outbound_types_and_statuses(journey: Journey) -> None:
    j, wa, b = journey, journey.h.wa, journey.h.running.bridge
    c = j.citizen
    asked = await j.write(wa.text_message(c, "¿Qué documentos necesito?"))
    asked_ev = await j.seen(body_is("¿Qué documentos necesito?"))

    # A reply keeps its context.
    resp = await j.desk.client.room_send(j.room_id, "m.room.message", {
        "msgtype": "m.text", "body": f"> <{asked_ev.sender}> ¿Qué documentos necesito?\n\nEl DNI",
        "m.relates_to": {"m.in_reply_to": {"event_id": asked_ev.event_id}}},
        ignore_unverified_devices=True)
    sent = await j.sent_to_citizen(lambda s: s.get("text", {}).get("body") == "El DNI")
    assert sent["context"] == {"message_id": asked}
    reply_event = resp.event_id

    # Media: staff upload an encrypted file, WhatsApp gets an uploaded media id.
    data = b"%PDF-1.4 instrucciones"
    ciphertext, keys = encrypt_attachment(data)
    async with aiohttp.ClientSession() as http, http.post(
            f"{j.h.synapse.synapse.url}/_matrix/media/v3/upload", data=ciphertext,
            params={"filename": "instrucciones.pdf"},
            headers={"Authorization": f"Bearer {j.desk.client.access_token}",
                     "Content-Type": "application/octet-stream"}) as up:
        mxc = (await up.json())["content_uri"]
    await j.desk.client.room_send(j.room_id, "m.room.message", {
        "msgtype": "m.file", "body": "instrucciones.pdf", "filename": "instrucciones.pdf",
        "info": {"mimetype": "application/pdf", "size": len(data)},
        "file": {**keys, "url": mxc}}, ignore_unverified_devices=True)
    doc = await j.sent_to_citizen(lambda s: s.get("type") == "document")
    assert doc["document"]["filename"] == "instrucciones.pdf"
    # The upload is deleted from Meta once the send is accepted.
    await wait_until(lambda: doc["document"]["id"] in wa.deleted_media, 30, "media deleted")
    assert doc["document"]["id"] not in wa.media
    assert wa.deleted_media[doc["document"]["id"]].data == data

    # Reaction to the citizen's message.
    await j.desk.client.room_send(j.room_id, "m.reaction", {"m.relates_to": {
        "rel_type": "m.annotation", "event_id": asked_ev.event_id, "key": "✅"}},
        ignore_unverified_devices=True)
    react = await j.sent_to_citizen(lambda s: s.get("type") == "reaction")
    assert react["reaction"] == {"message_id": asked, "emoji": "✅"}

    # Statuses: read → the ghost's read receipt; failed → a notice naming the error.
    link = await wait_until(lambda: b.db.messages.by_event(reply_event), 30, "link")
    reply_wamid = wa.sent_ids[wa.sent.index(sent)]
    assert reply_wamid is not None and link.wamid_hash == b.privacy.index.wamid(reply_wamid)
    await j.write(wa.status_update(reply_wamid, "read", c))

    async def receipt() -> bool:
        ghost = (await b.db.citizens.by_index(b.privacy.index.digest(c.user_id))).ghost_user_id
        await j.desk.sync_once(timeout_ms=200)
        room = j.desk.client.rooms[j.room_id]
        return ghost in room.read_receipts and \
            room.read_receipts[ghost].event_id == reply_event
    await wait_until(receipt, 30, "read receipt")
    await j.write(wa.status_update(reply_wamid, "failed", c,
                                   errors=[(131026, "Message undeliverable")]))
    await j.seen(lambda e: "Message undeliverable" in getattr(e, "body", ""))


async def test_duplicates_retries_and_permanent_errors(journey: Journey) -> None:
    j, wa = journey, journey.h.wa
    value = wa.text_message(j.citizen, "entregado tres veces")
    for _ in range(3):
        assert await wa.deliver(j.h.webhook_url, value) == 200
    await j.seen(body_is("entregado tres veces"))
    await asyncio.sleep(1.5)
    await j.desk.sync_once()
    copies = [e for e in j.desk._timeline[j.room_id] if body_is("entregado tres veces")(e)]
    assert len(copies) == 1

    wa.fail_next(code=1, http_status=500)
    await j.desk.send_text(j.room_id, "tras un error 500")
    await j.sent_to_citizen(lambda s: s.get("text", {}).get("body") == "tras un error 500")
    await asyncio.sleep(1)
    assert [s.get("text", {}).get("body") for s in wa.sent].count("tras un error 500") == 1

    wa.fail_next(code=131047, http_status=400)
    await j.desk.send_text(j.room_id, "fuera de ventana según Meta")
    await j.seen(lambda e: getattr(e, "body", "").startswith("Mensaje no enviado a WhatsApp"))
    assert all(s.get("text", {}).get("body") != "fuera de ventana según Meta" for s in wa.sent)


async def test_24h_window_refuses_free_form_reply(bridge: BridgeHarness) -> None:
    h = bridge
    citizen = new_citizen()
    real_clock = h.wa.clock
    h.wa.clock = lambda: real_clock() - 25 * 3600
    try:
        j = await opt_in(h, citizen, "mensaje de ayer")
    finally:
        h.wa.clock = real_clock
    try:
        await j.seen(body_is("mensaje de ayer"))
        count = len(h.wa.sent)
        await j.desk.send_text(j.room_id, "respuesta tardía")
        await j.seen(lambda e: "más de 24 horas" in getattr(e, "body", ""))
        assert all(s.get("text", {}).get("body") != "respuesta tardía" for s in h.wa.sent[count:])
    finally:
        await j.desk.close()


async def test_message_survives_crash_between_ack_and_matrix(journey: Journey) -> None:
    j, h = journey, journey.h
    # Processing stops right after the webhook is acknowledged (stored), then the
    # bridge goes away and comes back.
    await h.running.bridge.worker.stop()
    value = h.wa.text_message(j.citizen, "enviado justo antes del fallo")
    status = await h.wa.deliver(h.webhook_url, value)
    assert status == 200, (status, h.log_lines[-20:])
    await h.running.stop()
    await h.running.start()
    await j.seen(body_is("enviado justo antes del fallo"), timeout=60)


async def test_stored_items_are_parsed_messages_and_old_rows_still_run(
        journey: Journey, monkeypatch: pytest.MonkeyPatch) -> None:
    """The row holds the parsed message: the worker relays it without parsing a webhook
    again. A row queued by an earlier version (the webhook's value for one message) is
    converted when the bridge starts, then relayed like any other."""
    j, h = journey, journey.h
    b = h.running.bridge

    def no_parsing(*_: Any) -> Any:
        raise AssertionError("the worker parsed a stored webhook again")

    with monkeypatch.context() as patched:
        patched.setattr(stored, "parse_webhook", no_parsing)
        wamid = await j.write(h.wa.text_message(j.citizen, "guardado ya analizado"))
        await j.seen(body_is("guardado ya analizado"))
    [row] = [i for i in await b.db.inbound.after(0, 10_000)
             if i.dedupe_key == dedupe_key(b.privacy.index, wamid)]
    assert not stored.is_legacy(b.privacy.cipher.decrypt_json(row.payload, aad=AAD_PAYLOAD))

    # Before an upgrade: the worker is stopped, an old-format row is queued, and the
    # bridge restarts (a new version starting on an old queue).
    await b.worker.stop()
    value = h.wa.text_message(j.citizen, "encolado por la versión anterior")
    old_wamid = wamid_of(value)
    lane = citizen_lane(b.privacy.index.digest(str(j.citizen.user_id)))
    item_id = await b.db.inbound.enqueue(
        "whatsapp", dedupe_key(b.privacy.index, old_wamid),
        b.privacy.cipher.encrypt_json(value, aad=AAD_PAYLOAD), lane=lane)
    assert item_id is not None
    await h.running.stop()
    await h.running.start()
    await j.seen(body_is("encolado por la versión anterior"), timeout=60)
    # Staff can see the event before the worker has recorded the row as done.
    await h.running.idle("whatsapp")
    b = h.running.bridge
    converted = await b.db.inbound.get(item_id)
    assert converted is not None and converted.status == "done"
    item = stored.load(b.privacy.cipher.decrypt_json(converted.payload, aad=AAD_PAYLOAD),
                       b.config.whatsapp.phone_number_id)
    assert isinstance(item, InboundMessage) and item.text == "encolado por la versión anterior"


async def test_username_only_citizen_without_phone_number(bridge: BridgeHarness) -> None:
    citizen = new_citizen(with_number=False)
    j = await opt_in(bridge, citizen, "hola, no tengo número visible")
    try:
        await j.seen(body_is("hola, no tengo número visible"))
        await j.desk.send_text(j.room_id, "respuesta por BSUID")
        sent = await j.sent_to_citizen(
            lambda s: s.get("text", {}).get("body") == "respuesta por BSUID")
        assert sent.get("recipient") == citizen.user_id and "to" not in sent
    finally:
        await j.desk.close()


async def test_staff_message_with_a_personal_id_is_held_until_confirmed(
        bridge: BridgeHarness) -> None:
    """DPO requirement 13: an outbound DNI/IBAN is held; ✅ (or a reply «enviar») sends it."""
    citizen = new_citizen()
    j = await opt_in(bridge, citizen, "necesito el número de cuenta para pagar")
    b = bridge.running.bridge
    try:
        await j.seen(body_is("necesito el número de cuenta para pagar"))
        iban = "Ingrese en ES91 2100 0418 4502 0005 1332, concepto 2026/17."
        held = await j.desk.send_text(j.room_id, iban)
        notice = await j.seen(lambda ev: getattr(ev, "body", "").startswith("Retenido"))
        assert "iban" in notice.body
        dni = "Su DNI consta como 12345678Z."
        held_dni = await j.desk.send_text(j.room_id, dni)
        await j.seen(lambda ev: "dni" in getattr(ev, "body", "") and ev.event_id != notice.event_id
                     and getattr(ev, "body", "").startswith("Retenido"))
        plain = "Gracias, lo revisamos."
        await j.desk.send_text(j.room_id, plain)
        await j.sent_to_citizen(lambda s: to_citizen(s, citizen)
                                and s.get("text", {}).get("body") == plain)
        assert not [s for s in bridge.wa.sent if s.get("text", {}).get("body") in (iban, dni)]

        await j.desk.client.room_send(j.room_id, "m.reaction", {"m.relates_to": {
            "rel_type": "m.annotation", "event_id": held, "key": "✅"}},
            ignore_unverified_devices=True)
        sent = await j.sent_to_citizen(lambda s: to_citizen(s, citizen)
                                       and s.get("text", {}).get("body") == iban)
        assert sent["type"] == "text"
        await j.desk.client.room_send(j.room_id, "m.room.message", {
            "msgtype": "m.text", "body": f"> <{j.desk.user_id}> {dni}\n\nenviar",
            "m.relates_to": {"m.in_reply_to": {"event_id": held_dni}}},
            ignore_unverified_devices=True)
        await j.sent_to_citizen(lambda s: to_citizen(s, citizen)
                                and s.get("text", {}).get("body") == dni)
        # Each held message goes once, and the hold left a trail.
        await asyncio.sleep(0.5)
        assert [s.get("text", {}).get("body") for s in bridge.wa.sent].count(iban) == 1
        actions = [e.action for e in await b.db.audit.list(limit=20)]
        assert actions.count("message.hold") >= 2 and actions.count("message.release") >= 2
        assert await b.db.held.get(EventID(held)) is None
    finally:
        await j.desk.close()


async def bridge_cli(h: BridgeHarness, tmp_path: Path, command: str, *args: str,
                     timeout: float | None = None) -> tuple[int, str, str]:
    """`civic-bridge COMMAND -c CONFIG ARGS` with the running bridge's config: (exit
    code, stdout, stderr)."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(h.running.config.model_dump(mode="json")),
                      encoding="utf-8")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", command, "-c", str(config), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def admin_cli(h: BridgeHarness, tmp_path: Path, *args: str) -> str:
    """`civic-bridge admin ARGS` against the running bridge; its stdout (exit 0 asserted)."""
    code, out, err = await bridge_cli(h, tmp_path, "admin", *args)
    assert code == 0, err
    return out


async def test_citizen_data_export_and_erasure(bridge: BridgeHarness, tmp_path: Path) -> None:
    """GDPR art. 15/17: the citizen's own data out (identifiers included, for them
    only), then erased: relay stops, staff are told, the ghost leaves, identifiers and
    queued webhooks go; consent evidence and the audit trail stay, by pseudonym."""
    citizen = new_citizen()
    j = await opt_in(bridge, citizen, "quiero mis datos y después borrarlos")
    b = bridge.running.bridge
    try:
        await j.seen(body_is("quiero mis datos y después borrarlos"))
        index_hash = b.privacy.index.digest(citizen.user_id)
        row = await b.db.citizens.by_index(index_hash)
        assert row is not None and row.ghost_user_id is not None
        path = "/admin/v1/citizens/" + quote(row.ghost_user_id, safe="")
        assert (await bridge.running.call("GET", path + "/export", token=None))[0] == 401
        status, data = await bridge.running.call("GET", path + "/export")
        assert status == 400 and "reason" in data["error"]  # re-identification needs one

        status, data = await bridge.running.call("GET", path + "/export?reason=acceso%2017")
        assert status == 200, data
        assert data["whatsapp"] == {"wa_id": citizen.wa_id, "identifier": citizen.user_id}
        assert data["pseudonym"] == row.pseudonym_code
        assert data["matrix_user_id"] == row.ghost_user_id
        assert data["consent_state"] == "granted"
        assert [r["state"] for r in data["consent_records"]][-1] == "granted"
        assert data["portal"]["room_id"] == j.room_id and data["portal"]["closed_at"] is None

        # What staff wrote to them and is held for confirmation goes with the erasure.
        held = await j.desk.send_text(j.room_id, "Su DNI consta como 12345678Z.")
        await j.seen(lambda ev: getattr(ev, "body", "").startswith("Retenido"))
        assert await b.db.held.get(EventID(held)) is not None

        # The ghost's device kept its room keys for staff devices that appear later.
        kept = await b.db.room_keys.load(row.ghost_user_id)
        assert kept.keys and kept.deliveries

        # The same from the command line, which also erases (exit 0, the API's answer).
        exported = await admin_cli(bridge, tmp_path, "citizen", "export", row.ghost_user_id,
                                   "--reason", "solicitud de acceso")
        assert json.loads(exported)["whatsapp"] == data["whatsapp"]
        erased = await admin_cli(bridge, tmp_path, "citizen", "erase", row.ghost_user_id,
                                 "--reason", "derecho de supresión")
        assert "erased: True" in erased and row.pseudonym_code in erased
        assert await b.db.citizens.by_index(index_hash) is None
        assert await b.db.held.get(EventID(held)) is None
        assert await b.db.inbound.count_lane("whatsapp", citizen_lane(index_hash)) == {}
        records = await b.db.consent.for_pseudonym(Pseudonym(row.pseudonym_code))
        assert records[-1].state == "withdrawn" and records[-1].evidence == "erasure"
        assert all(r.citizen_id is None for r in records)
        actions = {(e.action, e.reason) for e in await b.db.audit.list(limit=20)}
        assert ("citizen.export", "acceso 17") in actions
        assert ("citizen.export", "solicitud de acceso") in actions
        assert ("citizen.erase", "derecho de supresión") in actions
        assert (await bridge.running.call("GET", path + "/export?reason=x"))[0] == 404
        assert (await bridge.running.call("DELETE", path, {}))[0] == 404

        await j.seen(lambda ev: getattr(ev, "body", "").startswith(
            "Los datos de esta persona se han borrado"))
        members = await b.api.members(b.ghosts.bot, RoomID(j.room_id))
        assert row.ghost_user_id not in {m["state_key"] for m in members}
        # The ghost's account is deactivated for good, its keys and record gone.
        ghost_localpart = row.ghost_user_id[1:].split(":", 1)[0]
        # (Asked of Synapse's admin API: the bridge itself no longer logs devices in.)
        async with aiohttp.ClientSession() as http, http.get(
                f"{b.config.homeserver.url}/_synapse/admin/v2/users/"
                f"{quote(row.ghost_user_id)}", headers={
                    "Authorization":
                    f"Bearer {b.config.moderation.synapse_admin_token}"}) as resp:
            assert resp.status == 200
            assert (await resp.json())["deactivated"] is True
        assert await b.db.ghosts.get(row.ghost_user_id) is None
        assert b.devices.get_open(row.ghost_user_id) is None
        assert not (Path(b.config.appservice.store_dir) / ghost_localpart).exists()
        kept = await b.db.room_keys.load(row.ghost_user_id)
        assert kept.keys == [] and kept.deliveries == []

        # Writing again is a first contact: asked again, nothing relayed.
        notices = len([s for s in bridge.wa.sent if to_citizen(s, citizen)
                       and s.get("type") == "interactive"])
        assert await bridge.wa.deliver(bridge.webhook_url, bridge.wa.text_message(
            citizen, "hola de nuevo")) == 200
        async with asyncio.timeout(30):
            while len([s for s in bridge.wa.sent if to_citizen(s, citizen)
                       and s.get("type") == "interactive"]) == notices:
                await asyncio.sleep(0.1)
        again = await b.db.citizens.by_index(index_hash)
        assert again is not None and again.pseudonym_code != row.pseudonym_code
        assert again.consent_state in ("unknown", "prompted")
    finally:
        await j.desk.close()


async def test_privacy_sweep_finds_no_identifiers(bridge: BridgeHarness) -> None:
    """Room state, display names, events as the homeserver stores them, metrics, and
    every log record of the run: none carries a test phone number or BSUID."""
    b = bridge.running.bridge
    assert USED_IDENTIFIERS, "run with the other tests of this module"
    haystack: list[str] = []
    for room in await b.db.rooms.list(include_closed=True):
        haystack.append(str(await b.api.get_state(b.ghosts.bot, room.room_id)))
        msgs = await b.api.request("GET", f"/_matrix/client/v3/rooms/{room.room_id}/messages",
                                   as_user=b.ghosts.bot, params={"dir": "b", "limit": "500"})
        haystack.append(str(msgs))
    for ghost in await b.db.ghosts.all():
        haystack.append(ghost.user_id + ghost.display_name)
    status, metrics = await bridge.running.call("GET", "/metrics", token=None)
    assert status == 200
    haystack.append(str(metrics))
    haystack.extend(bridge.log_lines)
    haystack.extend(DECRYPTED_SEEN)
    assert DECRYPTED_SEEN
    text = "\n".join(haystack)
    for identifier in USED_IDENTIFIERS:
        assert identifier not in text, "an identifier leaked"


async def test_a_relayed_message_costs_its_lane_one_write_session_and_one_read(
        journey: Journey, monkeypatch: pytest.MonkeyPatch) -> None:
    """A citizen's messages are relayed one after another, and on SQLite every write
    session waits for the one writer: the lane's bookkeeping is one read before the
    send (who, where, their rooms: a snapshot, no writer turn) and one write after (the
    time of the message, the message map, the outcome and the lane's next item). It
    was five writes, then two."""
    j, h = journey, journey.h
    db = h.running.bridge.db
    opened: list[tuple[str, str]] = []

    def counted(kind: str, sessions: Any) -> Any:
        def session() -> Any:
            task = asyncio.current_task()
            opened.append((kind, task.get_name() if task else ""))
            return sessions()
        return session

    for warm in ("primero", "segundo"):  # the ghost's room key is out already
        await j.write(h.wa.text_message(j.citizen, warm))
        await j.seen(body_is(warm))
    await h.running.bridge.worker.idle["whatsapp"].wait()
    portal = await db.rooms.get(RoomID(j.room_id))
    assert portal is not None and portal.citizen_id is not None
    before = await db.citizens.get(portal.citizen_id)
    assert before is not None and before.last_inbound_at is not None
    # Every session of the bridge's database starts at one of these two.
    monkeypatch.setattr(db, "_sessions", counted("write", db._sessions))
    monkeypatch.setattr(db, "_read_sessions", counted("read", db._read_sessions))
    clock = h.wa.clock
    h.wa.clock = lambda: clock() + 120  # a message written two minutes later
    try:
        later = h.wa.text_message(j.citizen, "tercero")
    finally:
        h.wa.clock = clock
    wamid = await j.write(later)
    await j.seen(body_is("tercero"))
    link = await wait_until(lambda: h.running.bridge.db.messages.by_wamid(
        h.running.bridge.privacy.index.wamid(wamid)), 10, "the message map")
    assert link.direction == "in"
    await h.running.bridge.worker.idle["whatsapp"].wait()
    in_lane = [kind for kind, name in opened if name.startswith("inbound whatsapp lane")]
    assert sorted(in_lane) == ["read", "write"], opened
    after = await db.citizens.get(portal.citizen_id)
    assert after is not None and after.last_inbound_at is not None
    assert after.last_inbound_at > before.last_inbound_at + timedelta(seconds=100)
