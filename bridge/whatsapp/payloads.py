"""What an outbox row sends: tagged frozen dataclasses, serialised here and only here.

A row's payload is one `Content` (what Graph is asked to send: its `type` is the tag)
in an `Envelope` (who waits for it and what it relays: a staff event, a room event, a
notice, or nothing for a system message). `encode` gives the flat JSON object the queue
seals (`Privacy.cipher`, AAD_PAYLOAD); `decode` reads it back. The format is the one
the outbox has always stored, so rows queued before these types existed are sent
unchanged after an upgrade. `decode` refuses an unknown type or a missing field
(ValueError: such a row becomes a dead letter); keys it does not know are kept, as they
were, in `Envelope.extra`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

Pair = tuple[str, str]


@dataclass(frozen=True)
class Text:
    tag: ClassVar[str] = "text"
    body: str
    reply_to: str | None = None


@dataclass(frozen=True)
class Buttons:
    tag: ClassVar[str] = "buttons"
    body: str
    buttons: tuple[Pair, ...]


@dataclass(frozen=True)
class ListMessage:
    tag: ClassVar[str] = "list"
    body: str
    button: str
    section: str
    rows: tuple[Pair, ...]


@dataclass(frozen=True)
class Template:
    tag: ClassVar[str] = "template"
    name: str
    language: str
    components: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class Reaction:
    tag: ClassVar[str] = "reaction"
    message_id: str
    emoji: str  # "": remove the reaction


@dataclass(frozen=True)
class Location:
    tag: ClassVar[str] = "location"
    latitude: float
    longitude: float
    name: str | None = None
    address: str | None = None
    reply_to: str | None = None


@dataclass(frozen=True)
class Media:
    """A Matrix file (`url`, encrypted when `file` holds its keys) sent as `kind`."""
    tag: ClassVar[str] = "media"
    kind: str
    url: str
    mimetype: str
    filename: str
    requested: str | None = None  # the kind staff sent, before size limits
    file: dict[str, Any] | None = None
    caption: str | None = None
    reply_to: str | None = None


Content = Text | Buttons | ListMessage | Template | Reaction | Location | Media
_KINDS: dict[str, type[Content]] = {k.tag: k for k in
                                    (Text, Buttons, ListMessage, Template, Reaction,
                                     Location, Media)}
_PAIRS = {"buttons", "rows"}


@dataclass(frozen=True)
class Envelope:
    """A send and what it is for: `system` (to anyone, consent or not), `event_id` and
    `part` (a staff message in a portal), `wa_room`/`wr_event` (a room send, only while
    the citizen is a member; the room event it relays), `notice_id` (a notice of
    availability, only while that consent is granted)."""
    content: Content
    system: bool = False
    event_id: str | None = None
    part: int = 0
    wa_room: str | None = None
    wr_event: str | None = None
    notice_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys, kept as they were

    @property
    def type(self) -> str:
        return self.content.tag


_ENVELOPE = ("system", "event_id", "part", "wa_room", "wr_event", "notice_id")


def encode(envelope: Envelope) -> dict[str, Any]:
    """The JSON object the queue seals (the format of every row ever queued)."""
    out: dict[str, Any] = {**envelope.extra, "type": envelope.content.tag}
    for f in fields(envelope.content):
        value = getattr(envelope.content, f.name)
        out[f.name] = [list(p) for p in value] if f.name in _PAIRS else (
            list(value) if isinstance(value, tuple) else value)
    defaults = Envelope(envelope.content)
    for name in _ENVELOPE:
        value = getattr(envelope, name)
        if value != getattr(defaults, name):
            out[name] = value
    return out


def decode(data: dict[str, Any]) -> Envelope:
    """An envelope from what `encode` (or any earlier version of the outbox) stored."""
    kind = _KINDS.get(data.get("type"))  # type: ignore[arg-type]
    if kind is None:
        raise ValueError(f"unknown outbox payload type {data.get('type')!r}")
    names = {f.name for f in fields(kind)}
    try:
        content = kind(**{n: _frozen(n, data[n]) for n in names if n in data})
    except TypeError as exc:  # a field missing
        raise ValueError(f"malformed {kind.tag} payload") from exc
    envelope = {n: data[n] for n in _ENVELOPE if data.get(n) is not None}
    extra = {k: v for k, v in data.items()
             if k not in names and k not in _ENVELOPE and k != "type"}
    return Envelope(content, extra=extra, **envelope)


def _frozen(name: str, value: Any) -> Any:
    if name in _PAIRS:
        return tuple((str(a), str(b)) for a, b in value)
    if name == "components":
        return tuple(value)
    return value


def envelope_of(payload: Envelope | dict[str, Any]) -> Envelope:
    return payload if isinstance(payload, Envelope) else decode(payload)
