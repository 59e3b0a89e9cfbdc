"""Staff receipts and typing: what the bridge asks Synapse for and reads from transactions."""

from __future__ import annotations

import json
from typing import Any

from bridge.config import parse_config
from bridge.matrix.appservice import parse_transaction
from bridge.registration import make_registration
from bridge.whatsapp.receipts import StaffSignal, staff_signals
from tests.unit.test_config import valid


def test_registration_asks_for_ephemeral_events() -> None:
    registration = make_registration(parse_config(valid()))
    assert registration["receive_ephemeral"] is True
    assert registration["de.sorunome.msc2409.push_ephemeral"] is True


def _is_ours(user: str) -> bool:
    return user.startswith("@cb_")


def test_staff_signals_from_ephemeral_events() -> None:
    events: list[dict[str, Any]] = [
        {"type": "m.receipt", "room_id": "!p", "content": {
            "$a": {"m.read": {"@ana:hs": {"ts": 1}, "@cb_ghost:hs": {"ts": 1}},
                   "m.read.private": {"@luis:hs": {"ts": 1}}}}},
        {"type": "m.typing", "room_id": "!p", "content": {"user_ids": ["@cb_bot:hs"]}},
        {"type": "m.typing", "room_id": "!q", "content": {"user_ids": ["@cb_x:hs", "@eva:hs"]}},
        {"type": "m.presence", "content": {"presence": "online"}},
        {"type": "m.receipt", "room_id": "!p", "content": {"$b": "nonsense"}},
    ]
    assert staff_signals(events, _is_ours) == [
        StaffSignal("read", "!p", "@ana:hs", "$a"),  # type: ignore[arg-type]
        StaffSignal("typing", "!q", "@eva:hs"),  # type: ignore[arg-type]
    ]


def test_transaction_ephemeral_under_either_key() -> None:
    receipt = {"type": "m.typing", "room_id": "!p", "content": {"user_ids": ["@a:hs"]}}
    stable = parse_transaction(b'{"events": [], "ephemeral": [%s]}' % _json(receipt))
    assert stable.ephemeral == [receipt]
    unstable = parse_transaction(
        b'{"events": [], "de.sorunome.msc2409.ephemeral": [%s]}' % _json(receipt))
    assert unstable.ephemeral == [receipt]
    assert parse_transaction(b'{"events": []}').ephemeral == []


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()
