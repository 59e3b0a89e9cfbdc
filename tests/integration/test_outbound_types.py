"""Every Matrix event staff can send in a portal, as the Cloud API simulator receives it,
and a notice (plus a metric by reason) for each one the bridge does not send.

Real Synapse, E2EE on: the desk's nio client sends encrypted events, the bridge's bot
decrypts them, and the simulator records the Graph request bodies.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from nio import RoomRedactResponse, RoomSendResponse
from nio.crypto.attachments import encrypt_attachment
from sqlalchemy import event as event_api

from bridge.types import EventID
from bridge.whatsapp.markup import MAX_TEXT
from bridge.whatsapp.outbound import (
    DROPPED_HELD_NOTICE,
    NO_CONSENT_NOTICE,
    WINDOW_NOTICE,
)
from bridge.whatsapp.staff_events import (
    EDIT_NOTICE,
    REACTION_TARGET_NOTICE,
    REDACTION_NOTICE,
)
from tests.fixtures.bridge import BridgeHarness
from tests.integration.test_whatsapp import (
    Journey,
    body_is,
    new_citizen,
    opt_in,
    wait_until,
)
from tests.integration.test_whatsapp import (
    test_privacy_sweep_finds_no_identifiers as _privacy_sweep,
)

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture(loop_scope="session")
async def journey(bridge: BridgeHarness) -> AsyncIterator[Journey]:
    j = await opt_in(bridge, new_citizen(), "Hola, tengo una consulta")
    yield j
    await j.desk.close()


async def send(j: Journey, content: dict[str, Any], event_type: str = "m.room.message"
               ) -> str:
    response = await j.desk.client.room_send(j.room_id, event_type, content,
                                             ignore_unverified_devices=True)
    assert isinstance(response, RoomSendResponse), response
    return str(response.event_id)


async def upload(j: Journey, data: bytes, name: str, *, encrypted: bool = True
                 ) -> dict[str, Any]:
    """Upload to the homeserver's media repository as staff clients do; returns the
    content fields that point at it (`file` when encrypted, else `url`)."""
    body, keys = encrypt_attachment(data) if encrypted else (data, None)
    async with aiohttp.ClientSession() as http, http.post(
            f"{j.h.synapse.synapse.url}/_matrix/media/v3/upload", data=body,
            params={"filename": name},
            headers={"Authorization": f"Bearer {j.desk.client.access_token}",
                     "Content-Type": "application/octet-stream"}) as resp:
        mxc = (await resp.json())["content_uri"]
    return {"file": {**keys, "url": mxc}} if keys else {"url": mxc}


async def citizen_message(j: Journey, text: str) -> tuple[str, str]:
    """The citizen writes `text`; returns (wamid, Matrix event id)."""
    wamid = await j.write(j.h.wa.text_message(j.citizen, text))
    event = await j.seen(body_is(text))
    return wamid, str(event.event_id)


async def media_sent_and_deleted(j: Journey, kind: str, data: bytes) -> dict[str, Any]:
    sent = await j.sent_to_citizen(lambda s: s.get("type") == kind)
    media_id = sent[kind]["id"]
    # Deleted from Meta once the send was accepted; what was uploaded was the file.
    await wait_until(lambda: media_id in j.h.wa.deleted_media, 30, f"{kind} deleted")
    assert media_id not in j.h.wa.media
    assert j.h.wa.deleted_media[media_id].data == data
    return sent


def not_sent(j: Journey, reason: str) -> float:
    value = j.h.running.bridge.metrics.registry.get_sample_value(
        "civic_bridge_outbound_not_sent_total", {"reason": reason})
    return value or 0.0


async def notice_count(j: Journey, text: str) -> int:
    await j.desk.sync_once(timeout_ms=200)
    return sum(1 for e in j.desk._timeline.get(j.room_id, [])
               if getattr(e, "body", None) == text)


async def expect_notice(j: Journey, text: str, before: int, *, prefix: bool = False) -> None:
    """`prefix`: a notice that starts with `text` (a dead letter's notice goes on with
    its id and how an admin retries it)."""
    async def more() -> bool:
        if not prefix:
            return await notice_count(j, text) > before
        await j.desk.sync_once(timeout_ms=200)
        return sum(1 for e in j.desk._timeline.get(j.room_id, [])
                   if str(getattr(e, "body", "")).startswith(text)) > before
    await wait_until(more, 30, f"notice {text[:40]!r}")


async def test_formatted_reply_and_long_text(journey: Journey) -> None:
    j = journey
    asked, asked_event = await citizen_message(j, "¿Qué necesito llevar?")
    await send(j, {
        "msgtype": "m.text", "body": "> <@x:localhost> ¿Qué necesito?\n\n**DNI** y _foto_",
        "format": "org.matrix.custom.html",
        "formatted_body": ("<mx-reply><blockquote>¿Qué necesito?</blockquote></mx-reply>"
                           "<p>Traiga:</p><ul><li><strong>DNI</strong></li>"
                           "<li><em>foto</em> reciente</li></ul>"
                           "<p>Más en <a href='https://sede.ejemplo.es/cita'>la sede</a></p>"),
        "m.relates_to": {"m.in_reply_to": {"event_id": asked_event}}})
    sent = await j.sent_to_citizen(lambda s: s.get("text", {}).get("body", "").startswith(
        "Traiga"))
    assert sent["text"]["body"] == ("Traiga:\n\n- *DNI*\n- _foto_ reciente\n\n"
                                    "Más en la sede (https://sede.ejemplo.es/cita)")
    assert sent["context"] == {"message_id": asked}
    assert sent["messaging_product"] == "whatsapp" and sent["recipient_type"] == "individual"

    paragraph = "Párrafo número {} de una respuesta larga que explica el trámite. "
    long = "\n\n".join((paragraph.format(i) * 12).strip() for i in range(12))
    assert len(long) > 2 * MAX_TEXT
    await send(j, {"msgtype": "m.text", "body": long})
    first = await j.sent_to_citizen(lambda s: s.get("text", {}).get("body", "").startswith(
        "Párrafo número 0"))
    start = j.h.wa.sent.index(first)

    async def all_parts() -> list[str]:
        bodies = [s.get("text", {}).get("body", "") for s in j.h.wa.sent[start:]
                  if s.get("to") == j.citizen.wa_id and s.get("type") == "text"]
        return bodies if "".join(bodies).replace("\n", "").replace(" ", "") == \
            long.replace("\n", "").replace(" ", "") else []
    parts = await wait_until(all_parts, 30, "every part, in order")
    assert len(parts) == 3 and all(len(p) <= MAX_TEXT for p in parts)
    assert all(p.endswith(".") for p in parts)  # cut between paragraphs


async def test_media_location_and_stickers(journey: Journey) -> None:
    j = journey
    png = b"\x89PNG\r\n\x1a\n fake image"
    await send(j, {"msgtype": "m.image", "body": "Así debe ser la foto", "filename": "foto.png",
                   "info": {"mimetype": "image/png", "size": len(png)},
                   **await upload(j, png, "foto.png")})
    image = await media_sent_and_deleted(j, "image", png)
    assert image["image"]["caption"] == "Así debe ser la foto"

    mp4 = b"\x00\x00\x00\x18ftypmp42 fake video"
    await send(j, {"msgtype": "m.video", "body": "video.mp4",
                   "info": {"mimetype": "video/mp4", "size": len(mp4)},
                   **await upload(j, mp4, "video.mp4")})
    video = await media_sent_and_deleted(j, "video", mp4)
    assert "caption" not in video["video"]

    ogg = b"OggS fake voice note"
    await send(j, {"msgtype": "m.audio", "body": "nota.ogg",
                   "info": {"mimetype": "audio/ogg", "size": len(ogg)},
                   **await upload(j, ogg, "nota.ogg")})
    await media_sent_and_deleted(j, "audio", ogg)

    await send(j, {"msgtype": "m.location", "body": "Oficina de atención",
                   "geo_uri": "geo:40.4168,-3.7038;u=20"})
    loc = await j.sent_to_citizen(lambda s: s.get("type") == "location")
    assert loc["location"] == {"latitude": 40.4168, "longitude": -3.7038,
                               "name": "Oficina de atención"}

    webp = b"RIFF\x10\x00\x00\x00WEBPVP8 fake sticker"
    await send(j, {"body": "pulgar", "info": {"mimetype": "image/webp", "size": len(webp),
                                              "w": 512, "h": 512},
                   **await upload(j, webp, "s.webp", encrypted=False)}, "m.sticker")
    sticker = await media_sent_and_deleted(j, "sticker", webp)
    assert set(sticker["sticker"]) == {"id"}

    # A sticker that is not WebP goes as an image.
    png_sticker = b"\x89PNG\r\n\x1a\n fake sticker"
    count = sum(1 for s in j.h.wa.sent if s.get("type") == "image")
    await send(j, {"body": "gato", "info": {"mimetype": "image/png",
                                            "size": len(png_sticker)},
                   **await upload(j, png_sticker, "gato.png", encrypted=False)}, "m.sticker")
    await wait_until(lambda: sum(1 for s in j.h.wa.sent if s.get("type") == "image") > count,
                     30, "png sticker as image")
    assert j.h.wa.sent[-1]["type"] == "image" and "caption" not in j.h.wa.sent[-1]["image"]


async def test_a_staff_message_reads_its_room_once(journey: Journey) -> None:
    """Every handler of a staff event (the relay to WhatsApp, management commands, the
    fan-out to WhatsApp members) needs the bridge's record of the room: it is read once
    per event, not once per handler."""
    j = journey
    engine = j.h.running.bridge.db.engine.sync_engine
    reads: list[str] = []

    def look(_conn: object, _cursor: object, statement: str, parameters: Any,
             *_rest: object) -> None:
        if "FROM rooms" in statement and "WHERE rooms.room_id =" in statement and \
                j.room_id in str(parameters):
            reads.append(statement)
    event_api.listen(engine, "before_cursor_execute", look)
    try:
        await send(j, {"msgtype": "m.text", "body": "Su cita es el lunes a las 10"})
        await j.sent_to_citizen(lambda s: s.get("text", {}).get("body") ==
                                "Su cita es el lunes a las 10")
    finally:
        event_api.remove(engine, "before_cursor_execute", look)
    assert len(reads) == 1, reads


async def test_reaction_and_its_removal(journey: Journey) -> None:
    j = journey
    wamid, event_id = await citizen_message(j, "Gracias por todo")
    reaction = await send(j, {"m.relates_to": {"rel_type": "m.annotation",
                                               "event_id": event_id, "key": "🙏"}},
                          "m.reaction")
    sent = await j.sent_to_citizen(lambda s: s.get("type") == "reaction"
                                   and s["reaction"]["message_id"] == wamid)
    assert sent["reaction"] == {"message_id": wamid, "emoji": "🙏"}
    # Queued before it is redacted: the reaction row must exist.
    await wait_until(lambda: j.h.running.bridge.db.messages.by_event(reaction), 30, "sent")
    redacted = await j.desk.client.room_redact(j.room_id, reaction)
    assert isinstance(redacted, RoomRedactResponse), redacted
    removal = await j.sent_to_citizen(lambda s: s.get("type") == "reaction"
                                      and s["reaction"] == {"message_id": wamid, "emoji": ""})
    assert removal["reaction"]["emoji"] == ""


async def test_every_event_not_sent_gets_a_notice_and_a_metric(journey: Journey) -> None:
    j, wa = journey, journey.h.wa
    _, asked_event = await citizen_message(j, "Una pregunta más")

    async def refused(reason: str, notice: str, content: dict[str, Any],
                      event_type: str = "m.room.message", *, redact: str | None = None
                      ) -> str:
        before_metric, before = not_sent(j, reason), await notice_count(j, notice)
        sent_before = len(wa.sent)
        if redact is not None:
            answer = await j.desk.client.room_redact(j.room_id, redact)
            assert isinstance(answer, RoomRedactResponse), answer
            event_id = str(answer.event_id)
        else:
            event_id = await send(j, content, event_type)
        await expect_notice(j, notice, before)
        assert not_sent(j, reason) == before_metric + 1
        assert not [s for s in wa.sent[sent_before:] if s.get("to") == j.citizen.wa_id
                    and s.get("type") != "reaction"]
        return event_id

    # An edit, and a redaction of a message that went out.
    original = await send(j, {"msgtype": "m.text", "body": "Cita el martes"})
    await j.sent_to_citizen(lambda s: s.get("text", {}).get("body") == "Cita el martes")
    await wait_until(lambda: j.h.running.bridge.db.messages.by_event(original), 30, "linked")
    await refused("edit", EDIT_NOTICE, {
        "msgtype": "m.text", "body": "* Cita el miércoles",
        "m.new_content": {"msgtype": "m.text", "body": "Cita el miércoles"},
        "m.relates_to": {"rel_type": "m.replace", "event_id": original}})
    await refused("redaction", REDACTION_NOTICE, {}, redact=original)

    # Types WhatsApp has no equivalent for.
    await refused("unsupported", "No enviado a WhatsApp: una encuesta no se puede enviar por "
                  "WhatsApp. Envíe el contenido como texto, imagen, archivo o ubicación.", {
                      "org.matrix.msc3381.poll.start": {
                          "question": {"org.matrix.msc1767.text": "¿Le va bien?"},
                          "kind": "org.matrix.msc3381.poll.disclosed", "max_selections": 1,
                          "answers": [{"id": "a", "org.matrix.msc1767.text": "Sí"}]},
                      "org.matrix.msc1767.text": "¿Le va bien?"},
                  "org.matrix.msc3381.poll.start")
    await refused("unsupported", "No enviado a WhatsApp: este tipo de mensaje no se puede "
                  "enviar por WhatsApp. Envíe el contenido como texto, imagen, archivo o "
                  "ubicación.", {"msgtype": "org.example.card", "body": "tarjeta"})

    # Over WhatsApp's largest attachment (refused before any download).
    await refused("too_large", "No enviado a WhatsApp: el archivo ocupa 200 MB y WhatsApp "
                  "admite archivos de hasta 100 MB. Envíe un archivo más pequeño o un enlace "
                  "para descargarlo.", {
                      "msgtype": "m.file", "body": "grabacion.zip",
                      "info": {"mimetype": "application/zip", "size": 200 * 1024 * 1024},
                      "url": "mxc://localhost/doesnotexist"})
    # Malformed: a location without coordinates.
    await refused("invalid", "No enviado a WhatsApp: la ubicación no trae coordenadas "
                  "válidas (geo:). Vuelva a enviarlo desde otro cliente o como texto.",
                  {"msgtype": "m.location", "body": "aquí", "geo_uri": "cerca del parque"})

    # A reaction to something that is not in the WhatsApp conversation (a bridge notice).
    await j.desk.sync_once()
    notice_event = next(e.event_id for e in j.desk._timeline[j.room_id]
                        if getattr(e, "body", None) == REDACTION_NOTICE)
    await refused("reaction_target", REACTION_TARGET_NOTICE, {"m.relates_to": {
        "rel_type": "m.annotation", "event_id": notice_event, "key": "👀"}}, "m.reaction")

    # Refused by Graph for good: the reason and what to do.
    advice = ("Mensaje no enviado a WhatsApp: message undeliverable to this recipient. Puede "
              "que la persona no tenga WhatsApp o haya bloqueado el número; contacte por otra "
              "vía.")
    before = not_sent(j, "graph_error")
    wa.fail_next(code=131026, http_status=400)
    await send(j, {"msgtype": "m.text", "body": "Este no llegará"})
    # A dead letter: the notice also names it, for an admin to retry or discard.
    await expect_notice(j, advice + " Queda apartado como out-", 0, prefix=True)
    assert not_sent(j, "graph_error") == before + 1
    # Something staff reply to still goes (a reply to the citizen's last message).
    await send(j, {"msgtype": "m.text", "body": "Este sí",
                   "m.relates_to": {"m.in_reply_to": {"event_id": asked_event}}})
    await j.sent_to_citizen(lambda s: s.get("text", {}).get("body") == "Este sí")


async def test_window_closed_and_no_consent_are_noticed(bridge: BridgeHarness) -> None:
    h = bridge
    real_clock = h.wa.clock
    h.wa.clock = lambda: real_clock() - 25 * 3600
    try:
        j = await opt_in(h, new_citizen(), "mensaje de anteayer")
    finally:
        h.wa.clock = real_clock
    try:
        await j.seen(body_is("mensaje de anteayer"))
        before = not_sent(j, "window_closed")
        await send(j, {"msgtype": "m.location", "body": "Oficina", "geo_uri": "geo:1,2"})
        await expect_notice(j, WINDOW_NOTICE, 0)
        assert not_sent(j, "window_closed") == before + 1

        await j.write(h.wa.text_message(j.citizen, "BAJA"))
        await j.seen(lambda e: "retirado su consentimiento" in getattr(e, "body", ""))
        before = not_sent(j, "no_consent")
        await send(j, {"msgtype": "m.text", "body": "¿Sigue ahí?"})
        await expect_notice(j, NO_CONSENT_NOTICE, 0)
        assert not_sent(j, "no_consent") == before + 1
        assert not [s for s in h.wa.sent if s.get("to") == j.citizen.wa_id
                    and s.get("type") == "location"]
    finally:
        await j.desk.close()


async def test_redacting_a_held_message_drops_it(journey: Journey) -> None:
    j, b = journey, journey.h.running.bridge
    await citizen_message(j, "¿Me confirma mis datos?")
    text = "Su DNI consta como 12345678Z."
    held = await send(j, {"msgtype": "m.text", "body": text})
    await wait_until(lambda: b.db.held.get(EventID(held)), 30, "held")
    before = await notice_count(j, DROPPED_HELD_NOTICE)
    answer = await j.desk.client.room_redact(j.room_id, held)
    assert isinstance(answer, RoomRedactResponse), answer
    await expect_notice(j, DROPPED_HELD_NOTICE, before)
    assert await b.db.held.get(EventID(held)) is None
    # A later ✅ on it sends nothing (the hold is gone), and staff are told.
    before = await notice_count(j, REACTION_TARGET_NOTICE)
    await send(j, {"m.relates_to": {"rel_type": "m.annotation", "event_id": held,
                                    "key": "✅"}}, "m.reaction")
    await expect_notice(j, REACTION_TARGET_NOTICE, before)
    assert not [s for s in j.h.wa.sent if s.get("to") == j.citizen.wa_id
                and s.get("text", {}).get("body") == text]
    actions = [e.action for e in await b.db.audit.list(limit=10)]
    assert "message.drop" in actions


async def test_parts_stay_in_order_when_the_first_is_retried(journey: Journey) -> None:
    j, wa = journey, journey.h.wa
    await citizen_message(j, "Cuénteme todo con detalle")
    sentence = "Frase {} de una explicación larga sobre el procedimiento administrativo. "
    long = "".join(sentence.format(i) for i in range(120))  # ~8,800 characters
    start = len(wa.sent)
    wa.fail_next(code=1, http_status=500)  # the first part's send: retried with backoff
    await send(j, {"msgtype": "m.text", "body": long})

    def parts() -> list[str]:
        return [s["text"]["body"] for s in wa.sent[start:]
                if s.get("to") == j.citizen.wa_id and s.get("type") == "text"]
    await wait_until(lambda: len(parts()) == 3, 60, "three parts")
    got = parts()
    assert got[0].startswith("Frase 0 ") and got[-1].endswith("Frase 119 de una "
                                                              "explicación larga sobre el "
                                                              "procedimiento administrativo.")
    assert " ".join(got) == long.strip()


async def test_privacy_sweep_after_outbound(bridge: BridgeHarness) -> None:
    """Last in this module: nothing above put a test citizen's number or BSUID in a
    room, a notice, a metric or a log line."""
    await _privacy_sweep(bridge)
