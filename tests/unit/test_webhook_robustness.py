"""The webhook pipeline (decode, parse, split, encrypt) on arbitrary input: a body is
either refused whole with a 400 error, or every message the parser accepts becomes a
stored row (holding the parsed message); nothing else escapes. Plus the JSON decoding
rules behind it."""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.errors import BadRequest
from bridge.jsonbody import REPLACEMENT, BodyError, load_body
from bridge.privacy import AAD_PAYLOAD, Cipher, KeyedIndex, is_keyed_hash
from bridge.whatsapp import stored
from bridge.whatsapp.webhook import prepare_delivery
from bridge.whatsapp.webhook_parse import InboundMessage, parse_webhook
from tests.fixtures.webhook_fuzz import TS, bodies, encode

PHONE_ID = "106540352242922"
CIPHER = Cipher(os.urandom(32))
INDEX = KeyedIndex(os.urandom(32))


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies(PHONE_ID))
def test_every_accepted_message_becomes_a_row(body: dict[str, Any]) -> None:
    raw = encode(body)
    try:
        delivery = prepare_delivery(raw, PHONE_ID, INDEX, CIPHER)
    except BadRequest:
        return
    keys = {key for key, _, _ in delivery.rows}
    for message in parse_webhook(load_body(raw), PHONE_ID).messages:
        assert f"msg:{INDEX.wamid(message.wamid)}" in keys
    # A wamid embeds the number: a dedupe key names it by its keyed hash only.
    assert all(is_keyed_hash(key.split(":")[1]) or key.split(":")[1] == "sha256"
               for key in keys)
    for _, payload, lane in delivery.rows:
        # Each row holds its parsed item (bridge.whatsapp.stored), which loads again.
        assert stored.load(CIPHER.decrypt_json(payload, aad=AAD_PAYLOAD), PHONE_ID)
        assert lane.startswith(("statuses", "citizen:"))


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes_are_refused_with_400_or_accepted(raw: bytes) -> None:
    try:
        prepare_delivery(raw, PHONE_ID, INDEX, CIPHER)
    except BadRequest as exc:
        assert exc.status == 400


def _value(**parts: Any) -> dict[str, Any]:
    return {"object": "whatsapp_business_account", "entry": [{"changes": [
        {"field": "messages", "value": {"messaging_product": "whatsapp", **parts}}]}]}


MESSAGE = {"id": "wamid.A", "from": "34600111222", "timestamp": TS, "type": "text",
           "text": {"body": "hola"}}


@pytest.mark.parametrize("parts", [
    {"metadata": True, "messages": [MESSAGE]},
    {"metadata": ["x"], "messages": [MESSAGE]},
    {"metadata": {"phone_number_id": PHONE_ID}, "messages": 5},
    {"metadata": {"phone_number_id": PHONE_ID}, "messages": {"id": "x"}},
    {"metadata": {"phone_number_id": PHONE_ID}, "statuses": 1.5},
])
def test_malformed_parts_are_ignored_not_fatal(parts: dict[str, Any]) -> None:
    delivery = prepare_delivery(encode(_value(**parts)), PHONE_ID, INDEX, CIPHER)
    assert delivery.rows == []


def test_lone_surrogate_is_replaced_and_the_message_kept() -> None:
    message = {**MESSAGE, "id": "wamid.\ud800", "text": {"body": "a\udfffb"}}
    raw = encode(_value(metadata={"phone_number_id": PHONE_ID}, messages=[message],
                        contacts=[{"wa_id": "34600111222", "profile": {"name": "\udbff"}}]))
    assert b"\\ud800" in raw
    (key, payload, _), = prepare_delivery(raw, PHONE_ID, INDEX, CIPHER).rows
    assert key == f"msg:{INDEX.wamid(f'wamid.{REPLACEMENT}')}"
    kept = stored.open_row(CIPHER, payload, PHONE_ID)
    assert isinstance(kept, InboundMessage) and kept.text == f"a{REPLACEMENT}b"


def test_overlong_message_id_gets_a_bounded_stable_key() -> None:
    raw = encode(_value(metadata={"phone_number_id": PHONE_ID},
                        messages=[{**MESSAGE, "id": "w" * 1000}]))
    first = prepare_delivery(raw, PHONE_ID, INDEX, CIPHER).rows[0][0]
    again = prepare_delivery(raw, PHONE_ID, INDEX, CIPHER).rows[0][0]
    assert first == again and len(first) <= 255 and first.startswith("msg:")


def test_items_sent_before_the_window_are_replays_not_rows() -> None:
    sent = int(TS)
    status = {"id": "wamid.OUT", "status": "read", "timestamp": str(sent - 10),
              "recipient_id": "34600111222"}
    messages = [{**MESSAGE, "id": "wamid.OLD", "timestamp": str(sent - 1)},
                {**MESSAGE, "id": "wamid.NOW"},
                {**MESSAGE, "id": "wamid.UNDATED", "timestamp": "pronto"}]
    raw = encode(_value(metadata={"phone_number_id": PHONE_ID}, messages=messages,
                        statuses=[status]))
    delivery = prepare_delivery(raw, PHONE_ID, INDEX, CIPHER, oldest=sent)
    # Undated: the parser ignores it (logged, counted), so it is no row at all.
    assert [key for key, _, _ in delivery.rows] == [f"msg:{INDEX.wamid('wamid.NOW')}"]
    assert delivery.replays == ("message", "status")
    assert len(delivery.ignored) == 1
    assert len(prepare_delivery(raw, PHONE_ID, INDEX, CIPHER).rows) == 3  # no window


def test_status_keys_name_the_wamid_by_its_keyed_hash() -> None:
    status = {"id": "wamid.HBgLMzQ2MDAxMTIyMzMVAgASGBQ", "status": "read",
              "timestamp": TS, "recipient_id": "34600112233"}
    raw = encode(_value(metadata={"phone_number_id": PHONE_ID}, statuses=[status]))
    (key, _, _), = prepare_delivery(raw, PHONE_ID, INDEX, CIPHER).rows
    assert key == f"status:{INDEX.wamid(status['id'])}:read"
    long = {**status, "status": "x" * 300}
    raw = encode(_value(metadata={"phone_number_id": PHONE_ID}, statuses=[long]))
    (key, _, _), = prepare_delivery(raw, PHONE_ID, INDEX, CIPHER).rows
    assert key.startswith("status:sha256:") and len(key) <= 255


@pytest.mark.parametrize("raw", [b"[NaN]", b'{"a": Infinity}', b"\xff\xfe",
                                 b"[" * 5000, b"[" * 80 + b"]" * 80])
def test_load_body_refuses_what_cannot_be_stored(raw: bytes) -> None:
    with pytest.raises(BodyError):
        load_body(raw)


def test_load_body_keeps_valid_pairs_and_replaces_lone_halves() -> None:
    got = load_body(b'{"k\\ud800": ["\\ud83d\\ude00", "\\udc00x"]}')
    assert got == {f"k{REPLACEMENT}": ["\U0001f600", f"{REPLACEMENT}x"]}
