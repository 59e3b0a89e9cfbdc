"""Input checks every admin verb shares: Matrix IDs and the audited reason."""

from __future__ import annotations

import re

from bridge.errors import InvalidParam
from bridge.types import EventID, UserID

MXID = re.compile(r"^@[^:\s]+:[A-Za-z0-9.\-]+(:\d+)?$")
EVENT_ID = re.compile(r"^\$[^\s]+$")
MAX_REASON = 500


def user_id(value: str) -> UserID:
    if not MXID.match(value):
        raise InvalidParam("user_id must be a Matrix user ID like @name:server")
    return UserID(value)


def event_id(value: str) -> EventID:
    if not EVENT_ID.match(value):
        raise InvalidParam("event_id must be a Matrix event ID like $abc")
    return EventID(value)


def reason(value: str | None, required: bool = True) -> str | None:
    text = (value or "").strip()
    if not text:
        if required:
            raise InvalidParam("reason: required for this action (it goes to the audit log)")
        return None
    if len(text) > MAX_REASON:
        raise InvalidParam(f"reason: at most {MAX_REASON} characters")
    return text
