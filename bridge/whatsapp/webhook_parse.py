"""Sans-I/O parser for WhatsApp Cloud API webhook payloads.

The body is untrusted input (even after the signature check it is only as good as
Meta's serialiser), so the parser is strict about the envelope and lenient inside it:

* `WebhookFormatError` is raised only for a structurally invalid envelope (not an
  object, wrong `object`, `entry`/`changes` not lists ...). Nothing else escapes.
* Inside a change, an item that cannot be used (no id, no sender, bad timestamp, a
  change for another phone number) is skipped and a reason is added to
  `WebhookBatch.ignored`. Reasons are fixed strings plus index paths; they never
  contain payload content, so they are safe to log.
* A message type we do not know, or a known type whose object is malformed, becomes
  kind ``"unsupported"`` with `raw_type` kept, so the relay can still tell staff that
  something arrived.

The kind-specific content is parsed in `message_content` (and the structured types
in `rich_content`); this module keeps the envelope, senders, messages and statuses.

Dataclass reprs leave out personal data (numbers, BSUIDs, names, text), so logging a
parsed message by mistake does not leak it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from bridge.errors import BadRequest
from bridge.privacy import KeyedIndex
from bridge.whatsapp.limits import MAX_CALLBACK_DATA  # the send's limit, echoed on statuses
from bridge.whatsapp.message_content import (
    MEDIA_KINDS,
    Edit,
    Location,
    MediaRef,
    MessageKind,
    Reaction,
    SystemChange,
    parse_content,
)
from bridge.whatsapp.rich_content import ContactCard, FlowReply, Order, Referral, parse_referral

__all__ = ["MEDIA_KINDS", "OBJECT", "Edit", "InboundMessage", "Location", "MediaRef",
           "MessageKind", "Reaction", "Sender", "StatusUpdate", "SystemChange",
           "WebhookBatch", "WebhookFormatError", "WhatsAppError", "citizen_lane", "lane_of",
           "parse_webhook"]

OBJECT: Final = "whatsapp_business_account"
# Unix seconds as Meta sends them; the bound keeps datetime in range.
_TIMESTAMP = re.compile(r"^[0-9]{1,11}$")



class WebhookFormatError(BadRequest):
    """The envelope is not a WhatsApp Business Account webhook; `reason` is safe to log."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"invalid webhook payload: {reason}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Sender:
    """Who wrote: BSUID (`user_id`) and/or phone-based `wa_id`; at least one is set."""

    wa_id: str | None = field(repr=False)
    user_id: str | None = field(repr=False)
    profile_name: str | None = field(default=None, repr=False)
    username: str | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        """The identity the bridge keys a citizen by: the BSUID when present, else wa_id."""
        return self.user_id or self.wa_id or ""


@dataclass(frozen=True, slots=True)
class WhatsAppError:
    code: int | None
    title: str | None


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """One user message. Exactly the fields that belong to `kind` are set."""

    wamid: str
    sender: Sender
    timestamp: datetime
    kind: MessageKind
    raw_type: str
    text: str | None = field(default=None, repr=False)
    caption: str | None = field(default=None, repr=False)
    media: MediaRef | None = None
    location: Location | None = None
    reaction: Reaction | None = None
    context_id: str | None = None
    forwarded: bool = False
    button_id: str | None = field(default=None, repr=False)
    button_title: str | None = field(default=None, repr=False)
    button_description: str | None = field(default=None, repr=False)  # list rows
    contacts: tuple[ContactCard, ...] = ()
    order: Order | None = None
    flow: FlowReply | None = None
    referral: Referral | None = None  # the ad or post the citizen came from
    referred_product: str | None = None  # a catalogue product the message asks about
    unsupported_type: str | None = None  # what an `unsupported` message was, if said
    edit: Edit | None = None
    revoke_of: str | None = None
    system: SystemChange | None = None
    errors: tuple[WhatsAppError, ...] = ()


def follow_up_target(msg: InboundMessage) -> str | None:
    """The wamid an edit, a revoke or a reaction is about (None for other messages)."""
    if msg.kind == "edit" and msg.edit is not None:
        return msg.edit.original_message_id
    if msg.kind == "revoke":
        return msg.revoke_of
    if msg.kind == "reaction" and msg.reaction is not None:
        return msg.reaction.message_id
    return None


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    """Delivery status of a message the bridge sent."""

    wamid: str
    status: str  # sent | delivered | read | played | failed (or a newer value, kept as is)
    timestamp: datetime
    recipient_wa_id: str | None = field(default=None, repr=False)
    recipient_user_id: str | None = field(default=None, repr=False)
    errors: tuple[WhatsAppError, ...] = ()
    conversation_id: str | None = None
    pricing_category: str | None = None
    callback_data: str | None = None  # `biz_opaque_callback_data`, if any and well-formed

    @property
    def recipient_key(self) -> str | None:
        return self.recipient_user_id or self.recipient_wa_id


@dataclass(frozen=True, slots=True)
class WebhookBatch:
    messages: tuple[InboundMessage, ...] = ()
    statuses: tuple[StatusUpdate, ...] = ()
    errors: tuple[WhatsAppError, ...] = ()  # value-level `errors[]` about our number
    ignored: tuple[str, ...] = ()


# -- helpers ---------------------------------------------------------------------------


def _str(value: Any) -> str | None:
    # Blank counts as absent: a blank identifier cannot be hashed (normalise_identifier).
    return value if isinstance(value, str) and value.strip() else None


def _opt_str(value: Any) -> str | None:
    """Like _str but keeps the empty string (a text body may legitimately be empty)."""
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _dict(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _timestamp(value: Any) -> datetime | None:
    if isinstance(value, str) and _TIMESTAMP.match(value):
        seconds = int(value)
    elif (n := _int(value)) is not None and 0 <= n < 10**11:
        seconds = n
    else:
        return None
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _errors(value: Any) -> tuple[WhatsAppError, ...]:
    return tuple(
        WhatsAppError(_int(e.get("code")), _str(e.get("title")) or _str(e.get("message")))
        for e in _list(value)
        if isinstance(e, dict)
    )


# -- items -----------------------------------------------------------------------------


def _contacts(value: dict[str, Any]) -> list[Sender]:
    found = []
    for contact in _list(value.get("contacts")):
        if not isinstance(contact, dict):
            continue
        profile = _dict(contact.get("profile")) or {}
        found.append(Sender(
            wa_id=_str(contact.get("wa_id")),
            user_id=_str(contact.get("user_id")),
            profile_name=_str(profile.get("name")),
            username=_str(profile.get("username")),
        ))
    return found


def _sender(msg: dict[str, Any], contacts: list[Sender]) -> Sender | None:
    wa_id, user_id = _str(msg.get("from")), _str(msg.get("from_user_id"))
    match: Sender | None = None
    for contact in contacts:
        if (wa_id and contact.wa_id == wa_id) or (user_id and contact.user_id == user_id):
            match = contact
            break
    if match is None and wa_id is None and user_id is None and len(contacts) == 1:
        match = contacts[0]  # some payloads identify the user only in contacts[]
    if match is not None:
        wa_id, user_id = wa_id or match.wa_id, user_id or match.user_id
    if wa_id is None and user_id is None:
        return None
    return Sender(wa_id, user_id,
                  match.profile_name if match else None, match.username if match else None)


def _message(msg: Any, contacts: list[Sender], where: str, ignored: list[str]
             ) -> InboundMessage | None:
    if not isinstance(msg, dict):
        ignored.append(f"{where}: not an object")
        return None
    wamid = _str(msg.get("id"))
    timestamp = _timestamp(msg.get("timestamp"))
    sender = _sender(msg, contacts)
    problem = ("missing id" if wamid is None else "invalid timestamp" if timestamp is None
               else "no sender (neither from/wa_id nor from_user_id/user_id)"
               if sender is None else None)
    if problem is not None:
        ignored.append(f"{where}: {problem}")
        return None
    assert wamid is not None and timestamp is not None and sender is not None
    raw_type = _str(msg.get("type")) or ""
    context = _dict(msg.get("context")) or {}
    return InboundMessage(
        wamid=wamid,
        sender=sender,
        timestamp=timestamp,
        raw_type=raw_type,
        context_id=_str(context.get("id")),
        forwarded=context.get("forwarded") is True or context.get("frequently_forwarded") is True,
        errors=_errors(msg.get("errors")),
        referral=parse_referral(msg.get("referral")),
        referred_product=_str((_dict(context.get("referred_product")) or {}).get(
            "product_retailer_id")),
        **parse_content(raw_type, msg.get(raw_type)),
    )


def _status(item: Any, where: str, ignored: list[str]) -> StatusUpdate | None:
    if not isinstance(item, dict):
        ignored.append(f"{where}: not an object")
        return None
    wamid, status = _str(item.get("id")), _str(item.get("status"))
    timestamp = _timestamp(item.get("timestamp"))
    if wamid is None or status is None or timestamp is None:
        ignored.append(f"{where}: missing id, status or timestamp")
        return None
    conversation = _dict(item.get("conversation")) or {}
    pricing = _dict(item.get("pricing")) or {}
    callback = _str(item.get("biz_opaque_callback_data"))
    return StatusUpdate(
        wamid=wamid,
        status=status,
        timestamp=timestamp,
        recipient_wa_id=_str(item.get("recipient_id")),
        recipient_user_id=_str(item.get("recipient_user_id")),
        errors=_errors(item.get("errors")),
        conversation_id=_str(conversation.get("id")),
        pricing_category=_str(pricing.get("category")),
        callback_data=callback if callback and len(callback) <= MAX_CALLBACK_DATA else None,
    )


def _change_value(value: dict[str, Any], phone_number_id: str, where: str,
                  out: _Collector) -> None:
    if value.get("messaging_product", "whatsapp") != "whatsapp":
        out.ignored.append(f"{where}: messaging_product is not whatsapp")
        return
    metadata = _dict(value.get("metadata")) or {}
    if metadata.get("phone_number_id") != phone_number_id:
        out.ignored.append(f"{where}: metadata.phone_number_id is not ours")
        return
    contacts = _contacts(value)
    for i, msg in enumerate(_list(value.get("messages"))):
        if (parsed := _message(msg, contacts, f"{where}.messages[{i}]", out.ignored)):
            out.messages.append(parsed)
    for i, item in enumerate(_list(value.get("statuses"))):
        if (status := _status(item, f"{where}.statuses[{i}]", out.ignored)):
            out.statuses.append(status)
    out.errors.extend(_errors(value.get("errors")))


@dataclass
class _Collector:
    messages: list[InboundMessage] = field(default_factory=list)
    statuses: list[StatusUpdate] = field(default_factory=list)
    errors: list[WhatsAppError] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def parse_webhook(body: Any, phone_number_id: str) -> WebhookBatch:
    """Parse a decoded webhook body for our `phone_number_id`.

    Raises WebhookFormatError only for an invalid envelope; see the module docstring.
    """
    if not isinstance(body, dict):
        raise WebhookFormatError("body is not a JSON object")
    if body.get("object") != OBJECT:
        raise WebhookFormatError(f"object is not {OBJECT}")
    entries = body.get("entry")
    if not isinstance(entries, list):
        raise WebhookFormatError("entry is not a list")
    out = _Collector()
    for e, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise WebhookFormatError(f"entry[{e}] is not an object")
        changes = entry.get("changes")
        if not isinstance(changes, list):
            raise WebhookFormatError(f"entry[{e}].changes is not a list")
        for c, change in enumerate(changes):
            where = f"entry[{e}].changes[{c}]"
            if not isinstance(change, dict):
                raise WebhookFormatError(f"{where} is not an object")
            if change.get("field") != "messages":
                out.ignored.append(f"{where}: field is not 'messages'")
                continue
            value = change.get("value")
            if not isinstance(value, dict):
                raise WebhookFormatError(f"{where}.value is not an object")
            _change_value(value, phone_number_id, where, out)
    return WebhookBatch(tuple(out.messages), tuple(out.statuses), tuple(out.errors),
                        tuple(out.ignored))


def lane_of(value: dict[str, Any], index: KeyedIndex) -> str:
    """The worker lane of one stored item: a citizen's messages are processed in order,
    different citizens in parallel; so are the statuses of sends to one recipient, in
    a lane of their own (one lane for every status backed up under load: the soak
    bench saw hundreds waiting while messages flowed).

    The lane is the keyed hash of the sender as the parser resolves it (`Sender.key`),
    so it equals `citizen_lane(Citizen.index_hash)` and no identifier is stored in the
    clear; a status lane hashes the recipient the same way (BSUID, else number).
    """
    contacts = _contacts(value)
    for msg in _list(value.get("messages")):
        if isinstance(msg, dict) and (sender := _sender(msg, contacts)) is not None:
            return citizen_lane(index.digest(sender.key))
    for status in _list(value.get("statuses")):
        if isinstance(status, dict):
            recipient = _str(status.get("recipient_user_id")) or _str(status.get("recipient_id"))
            if recipient:
                return status_lane(index.digest(recipient))
    return STATUS_LANE


STATUS_LANE = "statuses"  # + ":<recipient's keyed hash>" when the status names one


def dedupe_key(index: KeyedIndex, wamid: str, status: str | None = None) -> str:
    """The inbound queue's key of a message (`msg:<wamid hash>`) or of one status of a
    message (`status:<wamid hash>:<status>`)."""
    digest = index.wamid(wamid)
    return _bounded(f"msg:{digest}" if status is None else f"status:{digest}:{status}")


def _bounded(key: str) -> str:
    """A dedupe key that fits its column (255): one with an overlong status is hashed,
    the same way every time, so redeliveries still match."""
    if len(key) <= _MAX_KEY:
        return key
    kind = key.split(":", 1)[0]
    return f"{kind}:sha256:{hashlib.sha256(key.encode()).hexdigest()}"


_MAX_KEY = 200


def status_lane(index_hash: str) -> str:
    """The lane of the statuses of sends to a citizen, from their keyed hash."""
    return f"{STATUS_LANE}:{index_hash}"


def citizen_lane(index_hash: str) -> str:
    """The lane of a citizen's messages, from their keyed hash (`Citizen.index_hash`)."""
    return "citizen:" + index_hash
