"""A WhatsApp row of the inbound queue holds the parsed message or status
(bridge.whatsapp.stored), so the worker never parses a webhook again; rows an earlier
version queued (the webhook's value for one item) still load, to the same item."""

from __future__ import annotations

import dataclasses
import json
import os
import types
from datetime import UTC, datetime
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import pytest
from hypothesis import HealthCheck, given, settings

from bridge.errors import BadRequest
from bridge.jsonbody import load_body
from bridge.privacy import AAD_PAYLOAD, Cipher, KeyedIndex
from bridge.whatsapp import stored
from bridge.whatsapp.webhook import prepare_delivery
from bridge.whatsapp.webhook_parse import (
    InboundMessage,
    StatusUpdate,
    lane_of,
    parse_webhook,
)
from tests.fixtures.webhook_fuzz import bodies, encode
from tests.unit.test_webhook_parse import PHONE_ID, envelope, msg, value

CIPHER = Cipher(os.urandom(32))
INDEX = KeyedIndex(os.urandom(32))


def filled(kind: Any, name: str = "x") -> Any:
    """A value of `kind` with every field set (not at its default), nested all the way."""
    origin = get_origin(kind)
    if origin in (Union, types.UnionType):
        return filled(next(a for a in get_args(kind) if a is not type(None)), name)
    if origin is Literal:
        return get_args(kind)[-1]
    if origin is tuple:
        args = get_args(kind)
        if len(args) == 2 and args[1] is Ellipsis:
            return (filled(args[0], name + "0"), filled(args[0], name + "1"))
        return tuple(filled(a, f"{name}{i}") for i, a in enumerate(args))
    if kind is datetime:
        return datetime(2026, 12, 2, 4, 30, 15, tzinfo=UTC)
    if dataclasses.is_dataclass(kind):
        hints = get_type_hints(kind)
        return kind(**{f.name: filled(hints[f.name], f.name)  # type: ignore[operator]
                       for f in dataclasses.fields(kind)})
    return {str: f"{name}-é\u2028", int: 7, float: 40.4168, bool: True}[kind]


@pytest.mark.parametrize("kind", [InboundMessage, StatusUpdate])
def test_every_field_round_trips_through_json(kind: type[Any]) -> None:
    item = filled(kind)
    value = json.loads(json.dumps(stored.dump(item)))
    assert stored.load(value, PHONE_ID) == item
    assert not stored.is_legacy(value)


def test_fields_at_their_default_are_left_out_and_come_back() -> None:
    [message] = parse_webhook(envelope(value([msg("text", {"body": "hola"})])),
                              PHONE_ID).messages
    dumped = stored.dump(message)["message"]
    assert "media" not in dumped and "contacts" not in dumped
    assert stored.load(stored.dump(message), PHONE_ID) == message


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies(PHONE_ID))
def test_each_row_holds_the_parsed_item_in_its_lane(body: dict[str, Any]) -> None:
    raw = encode(body)
    try:
        delivery = prepare_delivery(raw, PHONE_ID, INDEX, CIPHER)
    except BadRequest:
        return
    batch = parse_webhook(load_body(raw), PHONE_ID)
    items: list[stored.Item] = [*batch.messages, *batch.statuses]
    assert len(delivery.rows) == len(items)
    for (key, payload, lane), parsed in zip(delivery.rows, items, strict=True):
        item = stored.open_row(CIPHER, payload, PHONE_ID)
        assert item == parsed and key == stored.queue_key(parsed, INDEX)
        assert item is not None and lane == stored.lane(item, INDEX)


def test_the_worker_reads_a_row_without_the_webhook_parser(
        monkeypatch: pytest.MonkeyPatch) -> None:
    raw = encode(envelope(value([msg("text", {"body": "hola"})])))
    [(_, payload, _)] = prepare_delivery(raw, PHONE_ID, INDEX, CIPHER).rows

    def no_parsing(*_: Any) -> Any:
        raise AssertionError("a stored row was parsed as a webhook again")

    monkeypatch.setattr(stored, "parse_webhook", no_parsing)
    item = stored.open_row(CIPHER, payload, PHONE_ID)
    assert isinstance(item, InboundMessage) and item.text == "hola"


def legacy_row(item_value: dict[str, Any]) -> str:
    """A row as an earlier version stored it: the webhook's value for one item."""
    return CIPHER.encrypt_json(item_value, aad=AAD_PAYLOAD)


def test_a_row_queued_by_an_earlier_version_loads_to_the_same_item() -> None:
    old_message = value([msg("text", {"body": "de antes"})])
    old_status = {**value(), "statuses": [{"id": "wamid.OUT1", "status": "read",
                                           "timestamp": "1760000000",
                                           "recipient_id": "34600111222"}]}
    for old in (old_message, old_status):
        [expected] = [*parse_webhook(envelope(old), PHONE_ID).messages,
                      *parse_webhook(envelope(old), PHONE_ID).statuses]
        assert stored.is_legacy(old)
        assert stored.open_row(CIPHER, legacy_row(old), PHONE_ID) == expected
        # Re-keying computes the same lane from either format.
        assert stored.lane_of_value(old, INDEX) == lane_of(old, INDEX) \
            == stored.lane_of_value(stored.dump(expected), INDEX)


@pytest.mark.parametrize("bad", [
    {"format": 99, "message": {}}, {"format": 2, "message": {"wamid": "x"}},
    {"format": 2, "status": {"wamid": 1}}, ["not", "an", "object"]])
def test_an_unreadable_stored_value_is_a_payload_error(bad: Any) -> None:
    with pytest.raises(ValueError, match="stored"):
        stored.load(bad, PHONE_ID)


def test_a_field_of_a_type_the_codec_does_not_know_fails_loudly() -> None:
    @dataclasses.dataclass(frozen=True)
    class Odd:
        when: set[str]

    with pytest.raises(TypeError):
        stored.dump(Odd({"x"}))  # type: ignore[arg-type]
