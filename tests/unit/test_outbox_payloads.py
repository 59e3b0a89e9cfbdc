"""Outbox payloads: tagged frozen dataclasses, serialised in one place, in the format
rows were always stored in (rows queued before an upgrade still decode)."""

from __future__ import annotations

import dataclasses

import pytest

from bridge.whatsapp.payloads import (
    Buttons,
    Envelope,
    ListMessage,
    Media,
    Template,
    Text,
    decode,
    encode,
)

# As the outbox stored them before the payloads were typed.
OLD_ROWS = [
    {"type": "text", "body": "hola", "system": True},
    {"type": "buttons", "body": "¿Acepta?", "buttons": [["si", "Sí"], ["no", "No"]],
     "system": True},
    {"type": "list", "body": "¿Qué sala?", "button": "Elegir", "section": "Salas",
     "rows": [["wr-pick:1", "Avisos"]], "system": True},
    {"type": "text", "body": "*Ana*: hola", "reply_to": None, "wa_room": "!r:x",
     "wr_event": "$e"},
    {"type": "template", "name": "aviso", "language": "es",
     "components": [{"type": "body", "parameters": []}], "notice_id": 7},
    {"type": "media", "kind": "image", "requested": "image", "url": "mxc://x/y",
     "file": None, "filename": "a.png", "mimetype": "image/png", "reply_to": None,
     "caption": "mira", "event_id": "$s", "part": 1},
    {"type": "reaction", "message_id": "wamid.X", "emoji": "", "event_id": "$r"},
    {"type": "location", "latitude": 40.4, "longitude": -3.7, "reply_to": None,
     "event_id": "$l"},
]


@pytest.mark.parametrize("row", OLD_ROWS, ids=lambda r: str(r["type"]))
def test_old_rows_decode_and_encode_back_unchanged(row: dict[str, object]) -> None:
    envelope = decode(row)
    assert envelope.type == row["type"]
    again = encode(envelope)
    assert {k: v for k, v in again.items() if v is not None} == {
        k: v for k, v in row.items() if v is not None}
    assert decode(again) == envelope


def test_decoded_fields_are_typed_and_frozen() -> None:
    envelope = decode(OLD_ROWS[1])
    assert envelope == Envelope(Buttons("¿Acepta?", (("si", "Sí"), ("no", "No"))), system=True)
    assert decode(OLD_ROWS[4]).notice_id == 7 and isinstance(decode(OLD_ROWS[4]).content,
                                                              Template)
    media = decode(OLD_ROWS[5])
    assert isinstance(media.content, Media) and media.part == 1 and media.event_id == "$s"
    assert isinstance(decode(OLD_ROWS[2]).content, ListMessage)
    with pytest.raises(dataclasses.FrozenInstanceError):
        envelope.content.body = "x"  # type: ignore[misc, union-attr]


def test_new_envelopes_store_only_what_they_set() -> None:
    assert encode(Envelope(Text("hola"), system=True)) == {
        "type": "text", "body": "hola", "reply_to": None, "system": True}


@pytest.mark.parametrize("bad", [{"type": "poll"}, {}, {"type": "text"},
                                 {"type": "buttons", "body": "x"}])
def test_unknown_or_incomplete_payloads_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        decode(bad)
