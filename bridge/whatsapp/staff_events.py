"""What a staff event in a portal becomes on WhatsApp: pure decisions, no I/O.

`translate` turns a Matrix event (type + content, the wamid it replies to already
looked up) into the outbox payloads to queue, in order, or a `NotSent` with the reason
(a metric label) and the notice staff get. Media kinds follow Meta's supported types
and sizes: what WhatsApp would refuse as an image/video/audio goes as a document,
which takes any file up to 100 MB; only bigger files are refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final, Literal

from bridge.texts.matrix import default as mx_text
from bridge.texts.whatsapp import default as wa_text
from bridge.whatsapp.markup import MAX_CAPTION, html_to_whatsapp, split_text, utf16_len

NotSentReason = Literal["unsupported", "too_large", "invalid", "edit", "redaction",
                        "reaction_target", "window_closed", "no_consent", "graph_error",
                        "internal"]

MB: Final = 1024 * 1024
# Meta's media limits (Cloud API "supported media types").
MEDIA_LIMITS: Final = {"image": 5 * MB, "video": 16 * MB, "audio": 16 * MB,
                       "document": 100 * MB, "sticker": 500 * 1024}
MEDIA_TYPES: Final = {
    "image": frozenset({"image/jpeg", "image/png"}),
    "video": frozenset({"video/mp4", "video/3gpp"}),
    "audio": frozenset({"audio/aac", "audio/amr", "audio/mpeg", "audio/mp4", "audio/ogg"}),
    "sticker": frozenset({"image/webp"}),
}
MSGTYPE_KIND: Final = {"m.image": "image", "m.video": "video", "m.audio": "audio",
                       "m.file": "document"}
TEXT_MSGTYPES: Final = ("m.text", "m.notice", "m.emote")

# Events staff clients send that are not messages for the citizen: never noticed.
_QUIET_PREFIXES: Final = ("m.key.verification.", "m.call.", "org.matrix.call.",
                          "m.poll.response", "org.matrix.msc3381.poll.response",
                          "m.poll.end", "org.matrix.msc3381.poll.end", "m.beacon",
                          "org.matrix.msc3672.beacon", "m.room.encrypted", "m.receipt",
                          "m.typing", "m.room.redaction", "m.reaction")
_NOTICED_TYPES: Final = {
    "m.poll.start": mx_text.POLL, "org.matrix.msc3381.poll.start": mx_text.POLL,
    "m.call.invite": mx_text.CALL,
}

# The notices live in bridge.texts.matrix; these names are what the outbox imports.
UNSUPPORTED_NOTICE: Final = mx_text.UNSUPPORTED_NOTICE
TOO_LARGE_NOTICE: Final = mx_text.TOO_LARGE_NOTICE
TOO_LARGE_ADVICE: Final = mx_text.TOO_LARGE_ADVICE
INVALID_NOTICE: Final = mx_text.INVALID_NOTICE
EDIT_NOTICE: Final = mx_text.EDIT_NOTICE
REDACTION_NOTICE: Final = mx_text.REDACTION_NOTICE
REACTION_TARGET_NOTICE: Final = mx_text.REACTION_TARGET_NOTICE


@dataclass(frozen=True, slots=True)
class NotSent:
    """A staff event the bridge does not send: why (metric label) and what staff read."""

    reason: NotSentReason
    notice: str


@dataclass(frozen=True, slots=True)
class Ignored:
    """Not a message for the citizen (verification, call signalling, state): no notice."""


Decision = list[dict[str, Any]] | NotSent | Ignored


def _size(n: int) -> str:
    return f"{n / MB:.0f} MB" if n >= MB else f"{max(1, round(n / 1024))} KB"


def strip_reply_fallback(body: str) -> str:
    """Drop the `> <@user> quoted` lines clients prepend to replies."""
    lines = body.split("\n")
    while lines and lines[0].startswith(">"):
        lines.pop(0)
    if lines and not lines[0].strip():
        lines.pop(0)
    return "\n".join(lines) or body


def _is_reply(content: dict[str, Any]) -> bool:
    relates = content.get("m.relates_to")
    return isinstance(relates, dict) and isinstance(relates.get("m.in_reply_to"), dict)


def rendered_text(content: dict[str, Any]) -> str:
    """The WhatsApp text of a message: its HTML converted when it has any, else its
    plain body. The reply fallback (which quotes a Matrix ID) is removed either way,
    also when the message replied to is not one the citizen has."""
    html = content.get("formatted_body")
    if content.get("format") == "org.matrix.custom.html" and isinstance(html, str):
        text = html_to_whatsapp(html)
        if text.strip():
            return text
    body = str(content.get("body") or "")
    return strip_reply_fallback(body) if _is_reply(content) else body


def text_payloads(text: str, reply_to: str | None) -> list[dict[str, Any]]:
    """Text parts of at most 4,096 characters; only the first carries the reply."""
    return [{"type": "text", "body": part, "reply_to": reply_to if i == 0 else None}
            for i, part in enumerate(split_text(text))]


def parse_geo_uri(uri: str) -> tuple[float, float] | None:
    """(latitude, longitude) of an RFC 5870 `geo:` URI, None if it is not one."""
    match = re.fullmatch(r"geo:([-+]?\d+(?:\.\d+)?),([-+]?\d+(?:\.\d+)?)(?:,[-+]?\d+(?:\.\d+)?)?"
                         r"(?:;.*)?", uri.strip(), flags=re.IGNORECASE)
    if match is None:
        return None
    lat, lon = float(match.group(1)), float(match.group(2))
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        return None
    return lat, lon


def media_kind(requested: str, mimetype: str, size: int | None) -> str | None:
    """The WhatsApp kind for a file: the one asked for when Meta supports its type and
    size, else a document; None when even a document would be too large."""
    mime = mimetype.split(";", 1)[0].strip().lower()
    candidates = [requested]
    if requested == "sticker":
        candidates.append("image")
    for kind in (*candidates, "document"):
        if kind != "document" and mime not in MEDIA_TYPES[kind]:
            continue
        if size is None or size <= MEDIA_LIMITS[kind]:
            return kind
    return None


def _location(content: dict[str, Any], reply_to: str | None) -> Decision:
    extensible = content.get("org.matrix.msc3488.location") or content.get("m.location") or {}
    uri = content.get("geo_uri") or (extensible.get("uri") if isinstance(extensible, dict)
                                     else None)
    point = parse_geo_uri(uri) if isinstance(uri, str) else None
    if point is None:
        return NotSent("invalid", INVALID_NOTICE.format(
            what=mx_text.INVALID_LOCATION))
    payload: dict[str, Any] = {"type": "location", "latitude": point[0],
                               "longitude": point[1], "reply_to": reply_to}
    description = extensible.get("description") if isinstance(extensible, dict) else None
    body = content.get("body")
    name = description if isinstance(description, str) and description.strip() else (
        body if isinstance(body, str) and "geo:" not in body else None)
    if name and name.strip():
        payload["name"] = name.strip()[:1000]
    return [payload]


def _media(requested: str, content: dict[str, Any], reply_to: str | None) -> Decision:
    source = content.get("file") if isinstance(content.get("file"), dict) else None
    url = (source or {}).get("url") or content.get("url")
    if not isinstance(url, str) or not url.startswith("mxc://"):
        return NotSent("invalid", INVALID_NOTICE.format(what=mx_text.INVALID_NO_FILE))
    raw_info = content.get("info")
    info: dict[str, Any] = raw_info if isinstance(raw_info, dict) else {}
    mimetype = str(info.get("mimetype") or "application/octet-stream")
    size = info.get("size") if isinstance(info.get("size"), int) else None
    kind = media_kind(requested, mimetype, size)
    if kind is None:
        assert size is not None
        return NotSent("too_large", TOO_LARGE_NOTICE.format(
            size=_size(size), kind=mx_text.MEDIA_PLURALS["document"],
            limit=_size(MEDIA_LIMITS["document"])))
    body = content.get("body") if isinstance(content.get("body"), str) else ""
    filename = content.get("filename") if isinstance(content.get("filename"), str) else None
    caption = None
    if filename and body and body != filename:  # MSC2530: body is the caption
        caption = rendered_text(content).strip() or None
    filename = filename or body or wa_text.DEFAULT_FILENAME
    payloads: list[dict[str, Any]] = [{
        "type": "media", "kind": kind, "requested": requested, "url": url, "file": source,
        "filename": filename, "mimetype": mimetype, "reply_to": reply_to, "caption": None}]
    if caption and kind not in ("audio", "sticker") and utf16_len(caption) <= MAX_CAPTION:
        payloads[0]["caption"] = caption
    elif caption:  # not allowed on this kind, or too long: it follows as text
        payloads.extend(text_payloads(caption, None))
    return payloads


def translate(etype: str, content: dict[str, Any], reply_to: str | None) -> Decision:
    """Payloads for an `m.room.message` or `m.sticker` (or why it is not sent), or
    Ignored / NotSent for other non-state event types. Reactions, redactions and
    edits need the message map and are the caller's."""
    if etype == "m.sticker":
        return _media("sticker", content, reply_to)
    if etype != "m.room.message":
        if etype in _NOTICED_TYPES:
            return NotSent("unsupported", UNSUPPORTED_NOTICE.format(what=_NOTICED_TYPES[etype]))
        if etype.startswith(_QUIET_PREFIXES):
            return Ignored()
        return NotSent("unsupported", UNSUPPORTED_NOTICE.format(
            what=mx_text.THIS_EVENT_TYPE))
    msgtype = content.get("msgtype")
    if msgtype in TEXT_MSGTYPES:
        payloads = text_payloads(rendered_text(content), reply_to)
        return payloads or NotSent("invalid", INVALID_NOTICE.format(what=mx_text.INVALID_EMPTY))
    if msgtype in MSGTYPE_KIND:
        return _media(MSGTYPE_KIND[msgtype], content, reply_to)
    if msgtype == "m.location":
        return _location(content, reply_to)
    if isinstance(msgtype, str) and msgtype.startswith("m.key.verification."):
        return Ignored()
    return NotSent("unsupported", UNSUPPORTED_NOTICE.format(
        what=mx_text.THIS_MESSAGE_TYPE if msgtype else mx_text.UNTYPED_MESSAGE))


def failure_advice(code: int | None) -> str:
    """What staff can do after Graph refused a send for good (by Graph error code)."""
    if code == 131047:
        return mx_text.ADVICE_WINDOW_CLOSED
    if code in (131026, 131062):
        return mx_text.ADVICE_UNREACHABLE
    if code in (100, 131051, 131052, 131053):
        return mx_text.ADVICE_CHECK_FORMAT
    return mx_text.ADVICE_RETRY
