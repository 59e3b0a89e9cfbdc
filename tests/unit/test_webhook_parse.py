"""parse_webhook: examples for every message type and status, plus property tests."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.privacy import KeyedIndex
from bridge.whatsapp.webhook_parse import (
    InboundMessage,
    WebhookBatch,
    WebhookFormatError,
    citizen_lane,
    lane_of,
    parse_webhook,
)

PHONE_ID = "106540352242922"
WA_ID = "34600111222"
BSUID = "ES.13491208655302741918"
TS = "1760000000"


def envelope(value: dict[str, Any], field: str = "messages") -> dict[str, Any]:
    return {"object": "whatsapp_business_account",
            "entry": [{"id": "102290129340398", "changes": [{"field": field, "value": value}]}]}


def value(messages: list[dict[str, Any]] | None = None, *, phone_id: str = PHONE_ID,
          contacts: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    v: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "34910000000", "phone_number_id": phone_id},
    }
    if messages is not None:
        v["contacts"] = contacts if contacts is not None else [
            {"profile": {"name": "Ana"}, "wa_id": WA_ID, "user_id": BSUID}]
        v["messages"] = messages
    return v | extra


def msg(kind: str, payload: Any = None, **extra: Any) -> dict[str, Any]:
    m: dict[str, Any] = {"from": WA_ID, "from_user_id": BSUID, "id": "wamid.IN1",
                         "timestamp": TS, "type": kind}
    if payload is not None:
        m[kind] = payload
    return m | extra


def one(kind: str, payload: Any = None, **extra: Any) -> InboundMessage:
    batch = parse_webhook(envelope(value([msg(kind, payload, **extra)])), PHONE_ID)
    assert batch.ignored == ()
    assert len(batch.messages) == 1
    return batch.messages[0]


# -- message types ---------------------------------------------------------------------


def test_text_with_sender_and_timestamp() -> None:
    m = one("text", {"body": "Hola"})
    assert (m.kind, m.raw_type, m.text, m.wamid) == ("text", "text", "Hola", "wamid.IN1")
    assert m.timestamp == datetime.fromtimestamp(1760000000, UTC)
    assert m.sender.wa_id == WA_ID and m.sender.user_id == BSUID
    assert m.sender.profile_name == "Ana"
    assert m.sender.key == BSUID  # the BSUID is preferred
    assert (m.context_id, m.forwarded, m.media, m.edit) == (None, False, None, None)


def test_reply_and_forward_context() -> None:
    m = one("text", {"body": "sí"}, context={"from": "34910000000", "id": "wamid.OUT"})
    assert m.context_id == "wamid.OUT" and not m.forwarded
    m = one("text", {"body": "fwd"}, context={"frequently_forwarded": True})
    assert m.context_id is None and m.forwarded


@pytest.mark.parametrize("kind", ["image", "video", "sticker", "document", "audio"])
def test_media(kind: str) -> None:
    payload = {"id": "1234567890", "mime_type": "image/jpeg", "sha256": "abc",
               "caption": "mira", "filename": "dni.pdf", "voice": True}
    m = one(kind, payload)
    assert m.kind == kind and m.media is not None
    assert (m.media.id, m.media.mime_type, m.media.sha256) == ("1234567890", "image/jpeg", "abc")
    assert m.caption == "mira"
    assert m.media.filename == ("dni.pdf" if kind == "document" else None)
    assert m.media.voice is True


@pytest.mark.parametrize(("animated", "parsed"), [(True, True), (False, False), ("yes", None),
                                                  (None, None)])
def test_sticker_says_whether_it_is_animated(animated: Any, parsed: bool | None) -> None:
    m = one("sticker", {"id": "1", "mime_type": "image/webp", "sha256": "a",
                        "animated": animated})
    assert m.media is not None and m.media.animated is parsed


def test_media_without_id_is_unsupported() -> None:
    m = one("image", {"mime_type": "image/jpeg"})
    assert m.kind == "unsupported" and m.raw_type == "image" and m.media is None


def test_location() -> None:
    m = one("location", {"latitude": 40.4168, "longitude": -3.7038, "name": "Sol",
                         "address": "Puerta del Sol", "url": "https://example.org"})
    assert m.kind == "location" and m.location is not None
    assert (m.location.latitude, m.location.longitude) == (40.4168, -3.7038)
    assert (m.location.name, m.location.address) == ("Sol", "Puerta del Sol")


@pytest.mark.parametrize("bad", [{"latitude": 91, "longitude": 0},
                                 {"latitude": "40", "longitude": 0},
                                 {"latitude": True, "longitude": 0},
                                 {"latitude": float("nan"), "longitude": 0}])
def test_bad_location_is_unsupported(bad: dict[str, Any]) -> None:
    assert one("location", bad).kind == "unsupported"


def test_reaction_and_removal() -> None:
    m = one("reaction", {"message_id": "wamid.OUT", "emoji": "👍"})
    assert m.kind == "reaction" and m.reaction is not None
    assert (m.reaction.message_id, m.reaction.emoji, m.reaction.removed) == (
        "wamid.OUT", "👍", False)
    for removal in ({"message_id": "wamid.OUT", "emoji": ""}, {"message_id": "wamid.OUT"}):
        r = one("reaction", removal).reaction
        assert r is not None and r.removed and r.emoji == ""


def test_interactive_button_and_list_reply() -> None:
    m = one("interactive", {"type": "button_reply",
                            "button_reply": {"id": "consent_yes", "title": "ACEPTO"}},
            context={"from": "34910000000", "id": "wamid.NOTICE"})
    assert (m.kind, m.raw_type, m.button_id, m.button_title) == (
        "button", "interactive", "consent_yes", "ACEPTO")
    assert m.context_id == "wamid.NOTICE"
    m = one("interactive", {"type": "list_reply",
                            "list_reply": {"id": "row1", "title": "Cita", "description": "x"}})
    assert (m.kind, m.button_id, m.button_title) == ("button", "row1", "Cita")


def test_interactive_unknown_subtype_is_unsupported() -> None:
    m = one("interactive", {"type": "hologram_reply", "hologram_reply": {"id": "x"}})
    assert m.kind == "unsupported" and m.raw_type == "interactive"


def test_list_reply_keeps_its_description() -> None:
    m = one("interactive", {"type": "list_reply", "list_reply": {
        "id": "row2", "title": "Padrón", "description": "Certificado de empadronamiento"}})
    assert (m.kind, m.button_title, m.button_description) == (
        "button", "Padrón", "Certificado de empadronamiento")


def test_flow_reply_answers_without_the_flow_token() -> None:
    response = json.dumps({"flow_token": "T-1", "nombre_tramite": "Licencia de obra",
                           "fecha": "2026-12-03", "acepta": True, "servicios": ["a", "b"]})
    m = one("interactive", {"type": "nfm_reply", "nfm_reply": {
        "name": "flow", "body": "Sent", "response_json": response}})
    assert (m.kind, m.raw_type) == ("flow", "interactive") and m.flow is not None
    assert m.flow.answers == (("nombre_tramite", "Licencia de obra"), ("fecha", "2026-12-03"),
                              ("acepta", "sí"), ("servicios", "a, b"))
    assert m.flow.name == "flow"


@pytest.mark.parametrize("response_json", ["not json", "[1, 2]", 7, None, '{"flow_token": "t"}'])
def test_flow_reply_with_unusable_answers_still_arrives(response_json: Any) -> None:
    m = one("interactive", {"type": "nfm_reply", "nfm_reply": {
        "name": "flow", "body": "Sent", "response_json": response_json}})
    assert m.kind == "flow" and m.flow is not None and m.flow.answers == ()


def test_contacts_card() -> None:
    card = {"name": {"formatted_name": "Lucía Gómez", "first_name": "Lucía",
                     "last_name": "Gómez"},
            "org": {"company": "Gestoría Gómez", "title": "Gestora"},
            "phones": [{"phone": "+34 910 000 123", "wa_id": "34910000123", "type": "WORK"},
                       "junk"],
            "emails": [{"email": "g@ejemplo.es", "type": "WORK"}],
            "addresses": [{"street": "Calle Mayor, 5", "city": "Madrid", "type": "WORK"}],
            "urls": [{"url": "https://g.ejemplo.es"}], "birthday": "1980-02-29"}
    m = one("contacts", [card, {"name": {"first_name": "Sin", "last_name": "Formato"}}])
    assert (m.kind, m.raw_type) == ("contacts", "contacts")
    first, second = m.contacts
    assert (first.formatted_name, first.company, first.job_title) == (
        "Lucía Gómez", "Gestoría Gómez", "Gestora")
    assert [(p.value, p.type) for p in first.phones] == [("+34 910 000 123", "WORK")]
    assert [e.value for e in first.emails] == ["g@ejemplo.es"]
    assert first.addresses[0].street == "Calle Mayor, 5" and first.birthday == "1980-02-29"
    assert second.display_name == "Sin Formato"


@pytest.mark.parametrize("payload", [[], "x", [1, "a"], {"name": "x"}])
def test_contacts_without_usable_cards_are_unsupported(payload: Any) -> None:
    assert one("contacts", payload).kind == "unsupported"


def test_order() -> None:
    m = one("order", {"catalog_id": "194836987003835", "text": "Lo recojo el lunes",
                      "product_items": [
                          {"product_retailer_id": "tasa", "quantity": 1, "item_price": 45.5,
                           "currency": "EUR"},
                          {"product_retailer_id": "abono", "quantity": "2",
                           "item_price": "12", "currency": "EUR"}, "junk"]})
    assert m.kind == "order" and m.order is not None
    assert (m.order.catalog_id, m.order.text) == ("194836987003835", "Lo recojo el lunes")
    assert [(i.product_retailer_id, i.quantity, i.item_price, i.currency)
            for i in m.order.items] == [("tasa", "1", "45.5", "EUR"), ("abono", "2", "12", "EUR")]


def test_referral_from_an_ad() -> None:
    m = one("text", {"body": "Quiero cita"}, referral={
        "source_url": "https://fb.me/x", "source_type": "ad", "source_id": "1",
        "headline": "Cita previa", "body": "Pida cita", "ctwa_clid": "CLID"})
    assert m.kind == "text" and m.referral is not None
    assert (m.referral.source_type, m.referral.headline, m.referral.source_url) == (
        "ad", "Cita previa", "https://fb.me/x")
    assert one("text", {"body": "x"}, referral="junk").referral is None


def test_product_inquiry() -> None:
    m = one("text", {"body": "¿Cuánto es?"}, context={
        "from": "34910000000", "id": "wamid.CAT",
        "referred_product": {"catalog_id": "1", "product_retailer_id": "tasa-2026"}})
    assert (m.kind, m.text, m.referred_product) == ("text", "¿Cuánto es?", "tasa-2026")
    assert one("text", {"body": "x"}, context={"referred_product": "junk"}).referred_product \
        is None


def test_system_user_id_change() -> None:
    m = one("system", {"type": "user_changed_user_id", "body": "x", "user_id": "ES.NEW2"})
    assert m.system is not None and m.system.type == "user_changed_user_id"
    assert m.system.new_user_id == "ES.NEW2" and m.system.new_wa_id is None


def test_system_message_without_contacts_array() -> None:
    """Meta's system webhooks carry no `contacts[]`: the sender is `from` alone."""
    v = value([msg("system", {"type": "user_changed_number", "body": "x",
                              "wa_id": "34600999888"})], contacts=[])
    del v["messages"][0]["from_user_id"]
    (m,) = parse_webhook(envelope(v), PHONE_ID).messages
    assert m.sender.wa_id == WA_ID and m.sender.user_id is None


def test_template_quick_reply_button() -> None:
    m = one("button", {"payload": "STOP_PROMO", "text": "Baja"})
    assert (m.kind, m.raw_type, m.button_id, m.button_title) == (
        "button", "button", "STOP_PROMO", "Baja")


def test_edit() -> None:
    m = one("edit", {"original_message_id": "wamid.ORIG",
                     "message": {"type": "text", "text": {"body": "corregido"}}})
    assert m.kind == "edit" and m.edit is not None
    assert (m.edit.original_message_id, m.edit.kind, m.edit.text) == (
        "wamid.ORIG", "text", "corregido")
    m = one("edit", {"original_message_id": "wamid.ORIG",
                     "message": {"type": "image", "image": {"id": "77", "caption": "nuevo"}}})
    assert m.edit is not None and m.edit.kind == "image" and m.edit.caption == "nuevo"
    assert m.edit.media is not None and m.edit.media.id == "77"


def test_revoke() -> None:
    m = one("revoke", {"original_message_id": "wamid.ORIG"})
    assert (m.kind, m.revoke_of) == ("revoke", "wamid.ORIG")


def test_system_number_change() -> None:
    m = one("system", {"type": "user_changed_number", "body": "Ana changed number",
                       "new_wa_id": "34600999888"})
    assert m.kind == "system" and m.system is not None
    assert (m.system.type, m.system.new_wa_id) == ("user_changed_number", "34600999888")
    m = one("system", {"type": "customer_identity_changed", "body": "x", "user_id": "ES.NEW1"})
    assert m.system is not None and m.system.new_user_id == "ES.NEW1"


def test_unsupported_with_errors() -> None:
    m = one("unsupported", None, errors=[{"code": 131051, "title": "Message type unknown"}])
    assert (m.kind, m.raw_type) == ("unsupported", "unsupported")
    assert [(e.code, e.title) for e in m.errors] == [(131051, "Message type unknown")]
    assert m.unsupported_type is None
    m = one("unsupported", {"type": "poll"}, errors=[{"code": 131051}])
    assert (m.kind, m.unsupported_type) == ("unsupported", "poll")


def test_unknown_future_type_and_missing_type() -> None:
    m = one("hologram", {"whatever": [1, 2, {"deep": None}]}, brand_new_field={"a": 1})
    assert (m.kind, m.raw_type) == ("unsupported", "hologram")
    bare = msg("text", {"body": "x"})
    del bare["type"]
    batch = parse_webhook(envelope(value([bare])), PHONE_ID)
    assert batch.messages[0].kind == "unsupported" and batch.messages[0].raw_type == ""


# -- senders ---------------------------------------------------------------------------


def test_username_only_user_without_from() -> None:
    """A user with a username and no visible number: no `from`, no `wa_id`."""
    m = msg("text", {"body": "hola"})
    del m["from"]
    contacts = [{"profile": {"name": "Ana", "username": "ana.g"}, "user_id": BSUID}]
    batch = parse_webhook(envelope(value([m], contacts=contacts)), PHONE_ID)
    (parsed,) = batch.messages
    assert parsed.sender.wa_id is None and parsed.sender.user_id == BSUID
    assert parsed.sender.key == BSUID and parsed.sender.username == "ana.g"


def test_sender_only_in_contacts() -> None:
    m = msg("text", {"body": "hola"})
    del m["from"], m["from_user_id"]
    contacts = [{"profile": {"name": "Ana"}, "user_id": BSUID}]
    (parsed,) = parse_webhook(envelope(value([m], contacts=contacts)), PHONE_ID).messages
    assert parsed.sender.key == BSUID


def test_legacy_sender_without_bsuid_uses_wa_id() -> None:
    m = msg("text", {"body": "hola"})
    del m["from_user_id"]
    contacts = [{"profile": {"name": "Ana"}, "wa_id": WA_ID}]
    (parsed,) = parse_webhook(envelope(value([m], contacts=contacts)), PHONE_ID).messages
    assert parsed.sender.key == WA_ID and parsed.sender.user_id is None


def test_message_without_any_sender_is_ignored() -> None:
    m = msg("text", {"body": "hola"})
    del m["from"], m["from_user_id"]
    batch = parse_webhook(envelope(value([m], contacts=[])), PHONE_ID)
    assert batch.messages == ()
    assert batch.ignored == ("entry[0].changes[0].messages[0]: no sender "
                             "(neither from/wa_id nor from_user_id/user_id)",)


@pytest.mark.parametrize(("field", "bad"), [("id", None), ("id", 5), ("timestamp", "soon"),
                                            ("timestamp", "9" * 5000), ("timestamp", -1)])
def test_unusable_message_is_ignored_not_raised(field: str, bad: Any) -> None:
    m = msg("text", {"body": "hola"}) | {field: bad}
    batch = parse_webhook(envelope(value([m, msg("text", {"body": "ok"}, id="wamid.2")])),
                          PHONE_ID)
    assert [x.wamid for x in batch.messages] == ["wamid.2"]
    assert len(batch.ignored) == 1 and "hola" not in batch.ignored[0]


# -- statuses --------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["sent", "delivered", "read", "played"])
def test_status(status: str) -> None:
    item = {"id": "wamid.OUT", "status": status, "timestamp": TS, "recipient_id": WA_ID,
            "recipient_user_id": BSUID,
            "conversation": {"id": "c1", "origin": {"type": "service"}},
            "pricing": {"billable": False, "pricing_model": "PMP", "category": "service"}}
    batch = parse_webhook(envelope(value(statuses=[item])), PHONE_ID)
    (s,) = batch.statuses
    assert (s.wamid, s.status, s.conversation_id, s.pricing_category) == (
        "wamid.OUT", status, "c1", "service")
    assert s.recipient_key == BSUID and s.recipient_wa_id == WA_ID and s.errors == ()


def test_failed_status_with_errors_and_bsuid_only_recipient() -> None:
    item = {"id": "wamid.OUT", "status": "failed", "timestamp": TS,
            "recipient_user_id": BSUID,
            "errors": [{"code": 131047, "title": "Re-engagement message",
                        "message": "Re-engagement message",
                        "error_data": {"details": "more than 24 hours"}}]}
    (s,) = parse_webhook(envelope(value(statuses=[item])), PHONE_ID).statuses
    assert s.status == "failed" and s.recipient_wa_id is None and s.recipient_key == BSUID
    assert [(e.code, e.title) for e in s.errors] == [(131047, "Re-engagement message")]


def test_status_callback_data() -> None:
    item = {"id": "wamid.OUT", "status": "sent", "timestamp": TS, "recipient_id": WA_ID,
            "biz_opaque_callback_data": "cb1.42"}
    (s,) = parse_webhook(envelope(value(statuses=[item])), PHONE_ID).statuses
    assert s.callback_data == "cb1.42"
    del item["biz_opaque_callback_data"]
    (s,) = parse_webhook(envelope(value(statuses=[item])), PHONE_ID).statuses
    assert s.callback_data is None


@pytest.mark.parametrize("junk", [42, None, "", {"id": "cb1.1"}, ["cb1.1"], True, "x" * 513])
def test_status_junk_callback_data_is_dropped_not_the_status(junk: Any) -> None:
    item = {"id": "wamid.OUT", "status": "read", "timestamp": TS, "recipient_id": WA_ID,
            "biz_opaque_callback_data": junk}
    batch = parse_webhook(envelope(value(statuses=[item])), PHONE_ID)
    (s,) = batch.statuses
    assert (s.wamid, s.status, s.callback_data) == ("wamid.OUT", "read", None)
    assert batch.ignored == ()


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=600),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6))
def test_status_callback_data_is_a_short_string_or_none(junk: Any) -> None:
    item = {"id": "wamid.OUT", "status": "delivered", "timestamp": TS,
            "biz_opaque_callback_data": junk}
    (s,) = parse_webhook(envelope(value(statuses=[item])), PHONE_ID).statuses
    assert s.callback_data is None or (isinstance(s.callback_data, str)
                                       and 0 < len(s.callback_data) <= 512
                                       and s.callback_data == junk)


def test_status_missing_fields_ignored() -> None:
    batch = parse_webhook(envelope(value(statuses=[{"id": "wamid.X"}, "junk"])), PHONE_ID)
    assert batch.statuses == () and len(batch.ignored) == 2


def test_value_level_errors() -> None:
    batch = parse_webhook(envelope(value(errors=[{"code": 131000, "title": "Something"}])),
                          PHONE_ID)
    assert [(e.code, e.title) for e in batch.errors] == [(131000, "Something")]


# -- envelope --------------------------------------------------------------------------


def test_other_phone_number_id_is_ignored() -> None:
    body = envelope(value([msg("text", {"body": "hola"})], phone_id="999"))
    batch = parse_webhook(body, PHONE_ID)
    assert batch.messages == ()
    assert batch.ignored == ("entry[0].changes[0]: metadata.phone_number_id is not ours",)


def test_other_field_is_ignored() -> None:
    batch = parse_webhook(envelope({"event": "APPROVED"}, field="message_template_status_update"),
                          PHONE_ID)
    assert batch == WebhookBatch(ignored=("entry[0].changes[0]: field is not 'messages'",))


def test_several_entries_and_changes() -> None:
    body = envelope(value([msg("text", {"body": "a"})]))
    body["entry"].append({"id": "x", "changes": [
        {"field": "messages", "value": value([msg("text", {"body": "b"}, id="wamid.2")])},
        {"field": "messages", "value": value(statuses=[
            {"id": "wamid.O", "status": "read", "timestamp": TS, "recipient_id": WA_ID}])}]})
    batch = parse_webhook(body, PHONE_ID)
    assert [m.text for m in batch.messages] == ["a", "b"] and len(batch.statuses) == 1


@pytest.mark.parametrize("body", [
    None, [], "x", {}, {"object": "page", "entry": []}, {"object": "whatsapp_business_account"},
    {"object": "whatsapp_business_account", "entry": {}},
    {"object": "whatsapp_business_account", "entry": ["x"]},
    {"object": "whatsapp_business_account", "entry": [{"changes": None}]},
    {"object": "whatsapp_business_account", "entry": [{"changes": [5]}]},
    {"object": "whatsapp_business_account",
     "entry": [{"changes": [{"field": "messages", "value": []}]}]},
])
def test_invalid_envelopes_raise(body: Any) -> None:
    with pytest.raises(WebhookFormatError) as info:
        parse_webhook(body, PHONE_ID)
    assert info.value.status == 400 and info.value.reason


def test_reprs_hide_personal_data() -> None:
    m = one("text", {"body": "mi DNI es 12345678Z"})
    shown = repr(m)
    for secret in (WA_ID, BSUID, "Ana", "12345678Z"):
        assert secret not in shown
    card = one("contacts", [{"name": {"formatted_name": "Lucía Gómez"},
                             "phones": [{"phone": "+34910000123", "wa_id": "34910000123"}],
                             "emails": [{"email": "g@ejemplo.es"}]}])
    flow = one("interactive", {"type": "nfm_reply", "nfm_reply": {
        "name": "flow", "response_json": '{"dni": "12345678Z"}'}})
    shown = repr(card) + repr(flow)
    for secret in ("Lucía", "34910000123", "g@ejemplo.es", "12345678Z"):
        assert secret not in shown


# -- properties ------------------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12))
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
TYPES = ["text", "image", "video", "sticker", "document", "audio", "location", "reaction",
         "interactive", "button", "edit", "revoke", "system", "unsupported", "contacts",
         "order"]
KEYS = ["from", "from_user_id", "id", "timestamp", "type", "context", "errors", *TYPES,
        "body", "message_id", "emoji", "latitude", "longitude", "original_message_id",
        "message", "button_reply", "list_reply", "payload", "title", "caption", "status",
        "recipient_id", "recipient_user_id", "wa_id", "user_id", "profile", "name",
        "nfm_reply", "response_json", "referral", "headline", "source_url", "formatted_name",
        "org", "company", "phones", "phone", "catalog_id", "product_items", "quantity",
        "item_price", "currency", "product_retailer_id", "description"]
plausible = st.recursive(
    json_scalars | st.sampled_from([*TYPES, TS, WA_ID, BSUID, "button_reply", "list_reply",
                                    "nfm_reply", '{"a": [1, {"b": null}]}']),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), children, max_size=6),
    max_leaves=30,
)
shaped_values = st.fixed_dictionaries(
    {"messaging_product": st.sampled_from(["whatsapp", "other"]) | json_values,
     "metadata": st.just({"phone_number_id": PHONE_ID}) | json_values},
    optional={"contacts": st.lists(plausible, max_size=2) | json_values,
              "messages": st.lists(plausible, max_size=3) | json_values,
              "statuses": st.lists(plausible, max_size=3) | json_values,
              "errors": st.lists(plausible, max_size=2) | json_values},
)


def _check(body: Any) -> None:
    try:
        batch = parse_webhook(body, PHONE_ID)
    except WebhookFormatError:
        return
    assert isinstance(batch, WebhookBatch)
    for m in batch.messages:
        assert m.wamid and m.sender.key


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_never_raises_on_arbitrary_json(body: Any) -> None:
    _check(body)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(shaped_values, min_size=1, max_size=3),
       st.sampled_from(["messages", "statuses"]) | json_values)
def test_never_raises_on_shaped_envelopes(values: list[Any], field: Any) -> None:
    changes = [{"field": "messages", "value": v} for v in values]
    changes.append({"field": field, "value": values[0]})
    _check({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": changes}]})


@settings(max_examples=200)
@given(st.sampled_from([*TYPES, "hologram"]), plausible, plausible)
def test_every_message_with_id_time_and_sender_is_kept(kind: str, payload: Any,
                                                       context: Any) -> None:
    """However odd the content, a message with id, timestamp and sender is never dropped."""
    body = envelope(value([msg(kind, payload, context=context)]))
    # Round-trip through JSON as the webhook route would.
    (parsed,) = parse_webhook(json.loads(json.dumps(body)), PHONE_ID).messages
    assert parsed.raw_type == kind and parsed.sender.key == BSUID


# -- worker lanes ----------------------------------------------------------------------

INDEX = KeyedIndex(b"k" * 32)


@pytest.mark.parametrize("message, contacts", [
    ({"from": WA_ID, "from_user_id": BSUID}, None),
    ({"from": WA_ID}, None),  # BSUID only in contacts[]
    ({"from": WA_ID}, [{"wa_id": "34699000000", "user_id": "ES.someone_else"},
                       {"wa_id": WA_ID, "user_id": BSUID}]),  # not contacts[0]
    ({"from": "34611000000"}, [{"wa_id": "34611000000"}]),  # no BSUID at all
])
def test_lane_is_the_citizens_keyed_hash(message: dict[str, Any],
                                         contacts: list[dict[str, Any]] | None) -> None:
    """The lane must equal citizen_lane(index_hash) of the citizen the message is keyed
    to: erasure deletes a citizen's stored webhooks by it."""
    v = value([{"id": "wamid.L", "timestamp": TS, "type": "text",
                "text": {"body": "hola"}} | message], contacts=contacts)
    (parsed,) = parse_webhook(envelope(v), PHONE_ID).messages
    assert lane_of(v, INDEX) == citizen_lane(INDEX.digest(parsed.sender.key))


def test_statuses_have_a_lane_per_recipient() -> None:
    """Statuses of sends to one person stay in order; different people's run in
    parallel; the lane names the recipient by keyed hash only."""
    def status(**recipient: str) -> dict[str, Any]:
        return value(statuses=[{"id": "wamid.OUT", "status": "read", "timestamp": TS}
                               | recipient])
    by_number = lane_of(status(recipient_id=WA_ID), INDEX)
    assert by_number == "statuses:" + INDEX.digest(WA_ID)
    assert WA_ID not in by_number
    assert lane_of(status(recipient_id=WA_ID, recipient_user_id="ES.abcdefghij"), INDEX) == (
        "statuses:" + INDEX.digest("ES.abcdefghij"))
    assert lane_of(status(recipient_id="34699999999"), INDEX) != by_number
    assert lane_of(status(), INDEX) == "statuses"
