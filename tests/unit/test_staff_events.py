"""What each staff event becomes on WhatsApp (the pure half of the outbound relay)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bridge.whatsapp.staff_events import (
    MB,
    Ignored,
    NotSent,
    media_kind,
    parse_geo_uri,
    translate,
)

MXC = "mxc://localhost/abc"


@pytest.mark.parametrize(("uri", "point"), [
    ("geo:40.4168,-3.7038", (40.4168, -3.7038)),
    ("geo:40.4168,-3.7038;u=35", (40.4168, -3.7038)),
    ("geo:-33.9,151.2,12.5;crs=wgs84", (-33.9, 151.2)),
    ("GEO:1,2", (1.0, 2.0)),
    ("geo:91,0", None),
    ("geo:0,181", None),
    ("geo:abc", None),
    ("https://maps.example/40,3", None),
])
def test_parse_geo_uri(uri: str, point: tuple[float, float] | None) -> None:
    assert parse_geo_uri(uri) == point


@pytest.mark.parametrize(("requested", "mime", "size", "kind"), [
    ("image", "image/jpeg", 1000, "image"),
    ("image", "image/png", 6 * MB, "document"),  # over the 5 MB image limit
    ("image", "image/gif", 1000, "document"),  # WhatsApp images are JPEG or PNG
    ("sticker", "image/webp", 90_000, "sticker"),
    ("sticker", "image/webp", 600_000, "document"),
    ("sticker", "image/png", 90_000, "image"),  # not WebP: an image
    ("video", "video/mp4", 10 * MB, "video"),
    ("video", "video/quicktime", 10 * MB, "document"),
    ("audio", "audio/ogg; codecs=opus", 100_000, "audio"),
    ("document", "application/pdf", 100 * MB, "document"),
    ("document", "application/pdf", 100 * MB + 1, None),
    ("image", "image/jpeg", None, "image"),
])
def test_media_kind_follows_meta_types_and_limits(requested: str, mime: str, size: int | None,
                                                  kind: str | None) -> None:
    assert media_kind(requested, mime, size) == kind


def test_formatted_text_is_converted_and_long_text_split() -> None:
    payloads = translate("m.room.message", {
        "msgtype": "m.text", "body": "**hola**", "format": "org.matrix.custom.html",
        "formatted_body": "<strong>hola</strong> <em>mundo</em>"}, "wamid.A")
    assert payloads == [{"type": "text", "body": "*hola* _mundo_", "reply_to": "wamid.A"}]
    long = ("Una frase de prueba. " * 400).strip()
    parts = translate("m.room.message", {"msgtype": "m.text", "body": long}, "wamid.A")
    assert isinstance(parts, list) and len(parts) == 3
    assert [p["reply_to"] for p in parts] == ["wamid.A", None, None]
    assert " ".join(p["body"] for p in parts) == long


@pytest.mark.parametrize("reply_to", ["wamid.A", None])
def test_reply_fallback_removed_from_plain_body(reply_to: str | None) -> None:
    """Also when the message replied to is not on WhatsApp (a colleague's): the fallback
    quotes a Matrix ID the citizen must not see."""
    payloads = translate("m.room.message", {
        "msgtype": "m.text", "body": "> <@ana:agencia.es> pregunta\n\nrespuesta",
        "m.relates_to": {"m.in_reply_to": {"event_id": "$x"}}}, reply_to)
    assert isinstance(payloads, list)
    assert payloads == [{"type": "text", "body": "respuesta", "reply_to": reply_to}]


def test_location_and_sticker() -> None:
    loc = translate("m.room.message", {"msgtype": "m.location", "body": "Ayuntamiento",
                                       "geo_uri": "geo:40.4168,-3.7038;u=10"}, None)
    assert loc == [{"type": "location", "latitude": 40.4168, "longitude": -3.7038,
                    "name": "Ayuntamiento", "reply_to": None}]
    element = translate("m.room.message", {
        "msgtype": "m.location", "body": "Ubicación geo:1,2 a las 10:00", "geo_uri": "geo:1,2",
        "org.matrix.msc3488.location": {"uri": "geo:1,2"}}, None)
    assert isinstance(element, list) and "name" not in element[0]
    sticker = translate("m.sticker", {"body": "gato", "url": MXC,
                                      "info": {"mimetype": "image/webp", "size": 20_000}}, None)
    assert isinstance(sticker, list) and sticker[0]["kind"] == "sticker"
    assert sticker[0]["caption"] is None


def test_caption_on_audio_or_too_long_follows_as_text() -> None:
    caption = "Escuche este audio"
    payloads = translate("m.room.message", {
        "msgtype": "m.audio", "body": caption, "filename": "nota.ogg", "url": MXC,
        "info": {"mimetype": "audio/ogg", "size": 1000}}, None)
    assert isinstance(payloads, list)
    assert [p["type"] for p in payloads] == ["media", "text"]
    assert payloads[0]["caption"] is None and payloads[1]["body"] == caption
    long = "x " * 700
    payloads = translate("m.room.message", {
        "msgtype": "m.image", "body": long, "filename": "a.png", "url": MXC,
        "info": {"mimetype": "image/png", "size": 1000}}, None)
    assert isinstance(payloads, list) and [p["type"] for p in payloads] == ["media", "text"]


@pytest.mark.parametrize(("etype", "content", "reason"), [
    ("m.room.message", {"msgtype": "m.file", "body": "big.zip", "url": MXC,
                        "info": {"mimetype": "application/zip", "size": 200 * MB}}, "too_large"),
    ("m.room.message", {"msgtype": "m.location", "body": "x", "geo_uri": "geo:nope"}, "invalid"),
    ("m.room.message", {"msgtype": "m.image", "body": "sin url"}, "invalid"),
    ("m.room.message", {"msgtype": "org.example.custom", "body": "x"}, "unsupported"),
    ("m.room.message", {"msgtype": "m.text", "body": "   "}, "invalid"),
    ("m.poll.start", {}, "unsupported"),
    ("org.matrix.msc3381.poll.start", {}, "unsupported"),
    ("m.call.invite", {}, "unsupported"),
    ("org.example.event", {}, "unsupported"),
])
def test_not_sent_reasons(etype: str, content: dict[str, object], reason: str) -> None:
    decision = translate(etype, dict(content), None)
    assert isinstance(decision, NotSent) and decision.reason == reason
    assert decision.notice.startswith("No enviado a WhatsApp")


@pytest.mark.parametrize("etype", ["m.key.verification.start", "m.call.candidates",
                                   "m.poll.response", "m.beacon"])
def test_protocol_events_are_ignored(etype: str) -> None:
    assert isinstance(translate(etype, {}, None), Ignored)


def test_pure_module_imports_no_io() -> None:
    code = ("import sys, bridge.whatsapp.staff_events; "
            "print(sorted(m for m in ('aiohttp', 'nio', 'sqlalchemy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
