"""A WhatsApp item of the inbound queue: the parsed message or status, as JSON.

A webhook is parsed once, when it arrives (bridge.ingest); each row holds one parsed
`InboundMessage` or `StatusUpdate` (`dump`, encrypted like every queued payload), and
the worker reads it back with `load`: no webhook is parsed again.

Rows an earlier version queued hold the webhook's own value for one item instead (its
`metadata`, `contacts` and one message or status). `normalise_legacy` rewrites them when
the bridge starts (bridge.lifecycle); `load` still converts one that arrives later (the
previous process may queue one while a standby takes over).

Sans-I/O: the codec follows the dataclasses' type hints (str, int, float, bool, None,
datetime, Literal, tuples, nested dataclasses), so a field added to a parsed type is
stored without a change here; a field of another type fails `dump` loudly.
"""

from __future__ import annotations

import dataclasses
import types
from datetime import datetime
from functools import cache
from typing import Any, Final, Literal, Union, get_args, get_origin, get_type_hints

from bridge.privacy import AAD_PAYLOAD, Cipher, KeyedIndex
from bridge.whatsapp.webhook_parse import (
    OBJECT,
    STATUS_LANE,
    InboundMessage,
    StatusUpdate,
    citizen_lane,
    dedupe_key,
    lane_of,
    parse_webhook,
    status_lane,
)

Item = InboundMessage | StatusUpdate
FORMAT: Final = 2  # the webhook's own value (format 1) carried no tag


class StoredFormatError(ValueError):
    """A stored value that is neither format: permanent (a dead letter)."""


def dump(item: Item) -> dict[str, Any]:
    """The JSON value stored for a parsed message or status."""
    part = "message" if isinstance(item, InboundMessage) else "status"
    return {"format": FORMAT, part: _dump(item)}


def load(value: Any, phone_number_id: str) -> Item | None:
    """The message or status of a stored value (None: a legacy row the parser ignores)."""
    if is_legacy(value):
        return from_legacy(value, phone_number_id)
    if not isinstance(value, dict) or value.get("format") != FORMAT:
        raise StoredFormatError("unknown stored format")
    try:
        if "message" in value:
            message: InboundMessage = _load_as(InboundMessage, value["message"])
            return message
        status: StatusUpdate = _load_as(StatusUpdate, value["status"])
        return status
    except (KeyError, TypeError, ValueError) as exc:
        raise StoredFormatError(f"stored item does not load ({type(exc).__name__})") from None


def open_row(cipher: Cipher, payload: str, phone_number_id: str) -> Item | None:
    """The message or status a queued row holds (DecryptError if it does not open)."""
    return load(cipher.decrypt_json(payload, aad=AAD_PAYLOAD), phone_number_id)


def is_legacy(value: Any) -> bool:
    """A row queued before this format: the webhook's value for one item."""
    return isinstance(value, dict) and "format" not in value


def from_legacy(value: dict[str, Any], phone_number_id: str) -> Item | None:
    """Parse a legacy row's webhook value (its only item), as the worker used to."""
    envelope = {"object": OBJECT,
                "entry": [{"id": "", "changes": [{"field": "messages", "value": value}]}]}
    batch = parse_webhook(envelope, phone_number_id)
    items: list[Item] = [*batch.messages, *batch.statuses]
    return items[0] if items else None


def lane(item: Item, index: KeyedIndex) -> str:
    """The worker lane (bridge.whatsapp.webhook_parse.lane_of, from the parsed item): a
    citizen's messages in order; the statuses of sends to one recipient in their own."""
    if isinstance(item, InboundMessage):
        return citizen_lane(index.digest(item.sender.key))
    recipient = item.recipient_key
    return status_lane(index.digest(recipient)) if recipient else STATUS_LANE


def lane_of_value(value: Any, index: KeyedIndex) -> str:
    """The lane of a stored value of either format (re-keying recomputes lanes)."""
    if is_legacy(value):
        return lane_of(value, index)
    item = load(value, "")
    return lane(item, index) if item is not None else STATUS_LANE


def queue_key(item: Item, index: KeyedIndex) -> str:
    """The inbound queue's dedupe key (by the wamid's keyed hash)."""
    if isinstance(item, InboundMessage):
        return dedupe_key(index, item.wamid)
    return dedupe_key(index, item.wamid, item.status)


# --- the codec --------------------------------------------------------------------------

def _dump(value: Any) -> Any:
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, tuple):
        return [_dump(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # Fields at their default are left out: shorter rows, same item when loaded.
        return {f.name: _dump(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.default is dataclasses.MISSING or getattr(value, f.name) != f.default}
    raise TypeError(f"cannot store a {type(value).__name__}")


@cache
def _hints(cls: Any) -> dict[str, Any]:
    return get_type_hints(cls)


def _load_as(cls: Any, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise TypeError(f"{cls.__name__}: expected an object")
    hints = _hints(cls)
    return cls(**{f.name: _load(hints[f.name], raw[f.name])
                  for f in dataclasses.fields(cls) if f.name in raw})


def _load(kind: Any, raw: Any) -> Any:
    origin = get_origin(kind)
    if origin in (Union, types.UnionType):
        if raw is None and type(None) in get_args(kind):
            return None
        [inner] = [a for a in get_args(kind) if a is not type(None)]
        return _load(inner, raw)
    if origin is Literal:
        if raw not in get_args(kind):
            raise ValueError("value not allowed")
        return raw
    if origin is tuple:
        if not isinstance(raw, list):
            raise TypeError("expected a list")
        args = get_args(kind)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_load(args[0], r) for r in raw)
        if len(args) != len(raw):
            raise ValueError("wrong length")
        return tuple(_load(a, r) for a, r in zip(args, raw, strict=True))
    if kind is datetime:
        return datetime.fromisoformat(raw)
    if dataclasses.is_dataclass(kind):
        return _load_as(kind, raw)
    if kind is float and isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    if kind in (str, int, bool) and type(raw) is kind:
        return raw
    raise TypeError(f"expected {getattr(kind, '__name__', kind)}")
