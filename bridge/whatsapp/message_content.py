"""The kind-specific part of an inbound WhatsApp message: what `type` says it carries.

Sans-I/O and lenient (see `webhook_parse`): a known type whose object cannot be used
becomes kind ``"unsupported"``, so staff still learn that something arrived. Reprs
leave out what the citizen wrote.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from bridge.whatsapp.rich_content import parse_contacts, parse_flow, parse_order

MEDIA_KINDS: Final = frozenset({"image", "video", "sticker", "document", "audio"})

MessageKind = Literal[
    "text", "image", "video", "sticker", "document", "audio", "location", "reaction",
    "button", "edit", "revoke", "system", "unsupported", "contacts", "order", "flow",
]


@dataclass(frozen=True, slots=True)
class MediaRef:
    """A media attachment; `id` is fetched through the Graph API."""

    id: str
    mime_type: str | None
    sha256: str | None
    filename: str | None = field(default=None, repr=False)
    voice: bool = False
    animated: bool | None = None  # stickers: their size limit depends on it


@dataclass(frozen=True, slots=True)
class Location:
    latitude: float = field(repr=False)
    longitude: float = field(repr=False)
    name: str | None = field(default=None, repr=False)
    address: str | None = field(default=None, repr=False)
    url: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Reaction:
    message_id: str
    emoji: str  # "" when the reaction was removed

    @property
    def removed(self) -> bool:
        return self.emoji == ""


@dataclass(frozen=True, slots=True)
class Edit:
    """The new content of an edited message (text or a media caption)."""

    original_message_id: str
    kind: MessageKind
    text: str | None = field(default=None, repr=False)
    caption: str | None = field(default=None, repr=False)
    media: MediaRef | None = None


@dataclass(frozen=True, slots=True)
class SystemChange:
    """`user_changed_number` / `customer_identity_changed`; the body names numbers."""

    type: str
    body: str | None = field(default=None, repr=False)
    new_wa_id: str | None = field(default=None, repr=False)
    new_user_id: str | None = field(default=None, repr=False)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _opt_str(value: Any) -> str | None:
    """Like _str but keeps the empty string (a text body may legitimately be empty)."""
    return value if isinstance(value, str) else None


def _dict(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def _coordinate(value: Any, bound: float) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) and -bound <= number <= bound else None


def _media(kind: str, obj: dict[str, Any]) -> dict[str, Any] | None:
    media_id = _str(obj.get("id"))
    if media_id is None:
        return None
    ref = MediaRef(
        id=media_id,
        mime_type=_str(obj.get("mime_type")),
        sha256=_str(obj.get("sha256")),
        filename=_str(obj.get("filename")) if kind == "document" else None,
        voice=obj.get("voice") is True,
        animated=obj["animated"] if isinstance(obj.get("animated"), bool) else None,
    )
    return {"kind": kind, "media": ref, "caption": _str(obj.get("caption"))}


def _interactive(obj: dict[str, Any]) -> dict[str, Any] | None:
    sub = obj.get("type")
    if sub == "nfm_reply" and (flow := _dict(obj.get("nfm_reply"))) is not None:
        return {"kind": "flow", "flow": parse_flow(flow)}
    reply = _dict(obj.get(sub)) if sub in ("button_reply", "list_reply") else None
    if reply is None or _str(reply.get("id")) is None:
        return None
    return {"kind": "button", "button_id": reply["id"],
            "button_title": _opt_str(reply.get("title")),
            "button_description": _str(reply.get("description"))}


def parse_content(raw_type: str, obj: Any, *, nested: bool = False) -> dict[str, Any]:
    """Kind-specific fields for InboundMessage/Edit; unsupported when unusable."""
    unsupported: dict[str, Any] = {"kind": "unsupported"}
    if raw_type == "contacts" and not nested:  # the only type whose object is a list
        cards = parse_contacts(obj)
        return {"kind": "contacts", "contacts": cards} if cards else unsupported
    body = _dict(obj)
    if body is None:
        return unsupported
    if raw_type == "unsupported" and not nested:
        # Newer payloads name what the citizen sent (e.g. a poll): worth telling staff.
        return unsupported | {"unsupported_type": _str(body.get("type"))}
    result: dict[str, Any] | None = None
    if raw_type == "text":
        text = _opt_str(body.get("body"))
        result = None if text is None else {"kind": "text", "text": text}
    elif raw_type in MEDIA_KINDS:
        result = _media(raw_type, body)
    elif nested:
        result = None  # an edit only carries text or media
    elif raw_type == "location":
        lat, lon = _coordinate(body.get("latitude"), 90), _coordinate(body.get("longitude"), 180)
        if lat is not None and lon is not None:
            result = {"kind": "location", "location": Location(
                lat, lon, _str(body.get("name")), _str(body.get("address")), _str(body.get("url")))}
    elif raw_type == "reaction":
        target = _str(body.get("message_id"))
        if target is not None:
            result = {"kind": "reaction",
                      "reaction": Reaction(target, _opt_str(body.get("emoji")) or "")}
    elif raw_type == "interactive":
        result = _interactive(body)
    elif raw_type == "order":
        order = parse_order(body)
        result = None if order is None else {"kind": "order", "order": order}
    elif raw_type == "button":
        payload, label = _opt_str(body.get("payload")), _opt_str(body.get("text"))
        if payload is not None or label is not None:
            result = {"kind": "button", "button_id": payload, "button_title": label}
    elif raw_type == "edit":
        result = _edit(body)
    elif raw_type == "revoke":
        target = _str(body.get("original_message_id"))
        result = None if target is None else {"kind": "revoke", "revoke_of": target}
    elif raw_type == "system":
        result = _system(body)
    return result or unsupported


def _edit(body: dict[str, Any]) -> dict[str, Any] | None:
    original = _str(body.get("original_message_id"))
    inner = _dict(body.get("message"))
    if original is None or inner is None:
        return None
    inner_type = _str(inner.get("type")) or "text"
    content = parse_content(inner_type, inner.get(inner_type), nested=True)
    edit = Edit(original, content["kind"], content.get("text"), content.get("caption"),
                content.get("media"))
    return {"kind": "edit", "edit": edit}


def _system(body: dict[str, Any]) -> dict[str, Any] | None:
    change_type = _str(body.get("type"))
    if change_type is None:
        return None
    change = SystemChange(
        type=change_type,
        body=_str(body.get("body")),
        new_wa_id=_str(body.get("new_wa_id")) or _str(body.get("wa_id")),
        new_user_id=_str(body.get("new_user_id")) or _str(body.get("user_id")),
    )
    return {"kind": "system", "system": change}
