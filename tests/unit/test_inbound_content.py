"""Summaries and vCards for structured inbound types: readable, and never more than
the citizen chose to share."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.texts.matrix import default as summaries
from bridge.whatsapp.identity import Identity, identity_after
from bridge.whatsapp.message_content import SystemChange
from bridge.whatsapp.rich_content import (
    CardAddress,
    CardValue,
    ContactCard,
    FlowReply,
    parse_contacts,
    parse_flow,
    parse_order,
    parse_referral,
)
from bridge.whatsapp.vcard import escape, fold, to_vcf
from tests.fixtures.whatsapp_payloads import CONTACT_CARD


def test_contacts_summary_names_organisation_and_choice_but_no_number() -> None:
    cards = parse_contacts([CONTACT_CARD])
    text = summaries.contacts_summary(cards)
    assert text.startswith("La persona ha decidido compartir una tarjeta de contacto")
    assert "Lucía Gómez Ruiz (Gestoría Gómez, Gestora)" in text and ".vcf" in text
    for detail in ("910 000 123", "34910000123", "gestoria@ejemplo.es", "Calle Mayor"):
        assert detail not in text
    two = summaries.contacts_summary((*cards, ContactCard(company="Solo Empresa")))
    assert "2 tarjetas de contacto" in two and "Solo Empresa" in two


def test_vcf_carries_the_whole_card() -> None:
    vcf = to_vcf(parse_contacts([CONTACT_CARD])).decode()
    assert vcf.startswith("BEGIN:VCARD\r\nVERSION:3.0\r\n") and vcf.endswith("END:VCARD\r\n")
    for line in ("FN:Lucía Gómez Ruiz", "N:Gómez Ruiz;Lucía;;;", "ORG:Gestoría Gómez;Trámites",
                 "TITLE:Gestora", "TEL;TYPE=WORK:+34 910 000 123",
                 "EMAIL;TYPE=WORK:gestoria@ejemplo.es", "BDAY:1980-02-29",
                 "ADR;TYPE=WORK:;;Calle Mayor\\, 5;Madrid;Madrid;28013;España"):
        assert line + "\r\n" in vcf, line


def _unfold(vcf: str) -> list[str]:
    return vcf.replace("\r\n ", "").split("\r\n")


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


@given(st.text(min_size=1, max_size=300).filter(lambda t: t.strip()),
       st.text(max_size=40))
def test_vcf_lines_are_folded_escaped_and_round_trip(name: str, label: str) -> None:
    card = ContactCard(formatted_name=name.strip(),
                       phones=(CardValue("+34 600 000 000", label),),
                       addresses=(CardAddress(street=name),))
    raw = to_vcf([card])
    for physical in raw.split(b"\r\n"):
        assert len(physical) <= 75 and b"\n" not in physical and b"\r" not in physical
    lines = _unfold(raw.decode())
    fn = next(line for line in lines if line.startswith("FN:"))
    # Line breaks of any style come back as one "\n" (vCard has only that escape).
    assert _unescape(fn[3:]) == re.sub(r"\r\n|\r", "\n", name.strip())
    tel = next(line for line in lines if line.startswith("TEL"))
    assert re.fullmatch(r"TEL(;TYPE=[A-Z0-9-]+)?:\+34 600 000 000", tel)


def test_escape_and_fold() -> None:
    assert escape("a,b;c\\d\ne") == "a\\,b\\;c\\\\d\\ne"
    folded = fold("X" * 80)
    assert folded.split("\r\n") == ["X" * 75, " " + "X" * 5]
    # A multi-byte character is never split across a fold.
    assert all(len(p.encode()) <= 75 for p in fold("ñ" * 100).split("\r\n"))


def test_order_summary() -> None:
    order = parse_order({"catalog_id": "1", "text": "Lo recojo el lunes", "product_items": [
        {"product_retailer_id": "tasa", "quantity": 1, "item_price": 45.5, "currency": "EUR"},
        {"product_retailer_id": "abono", "quantity": "2"}]})
    assert order is not None
    assert summaries.order_summary(order) == (
        "Pedido del catálogo:\n• 1 x tasa — 45.5 EUR\n• 2 x abono\nNota: Lo recojo el lunes")


def test_flow_summary() -> None:
    text = summaries.flow_summary(FlowReply("flow", (("nombre_tramite", "Licencia"),
                                                     ("acepta", "sí"))))
    assert text == "Respuestas del formulario:\n• Nombre tramite: Licencia\n• Acepta: sí"
    assert "sin respuestas" in summaries.flow_summary(FlowReply("flow", ()))


def test_referral_notice_shows_the_ad_not_the_click_id() -> None:
    referral = parse_referral({"source_type": "ad", "source_url": "https://fb.me/x",
                               "headline": "Cita previa", "ctwa_clid": "CLID-123"})
    assert referral is not None
    text = summaries.referral_notice(referral)
    assert text == "Este mensaje llega desde un anuncio: «Cita previa» https://fb.me/x."
    assert "CLID" not in text


def test_notices_explain_and_say_what_to_do() -> None:
    big = summaries.too_large_notice("video", 17 * 1024 * 1024, 16 * 1024 * 1024)
    assert "un vídeo de 17.0 MB" in big and "16 MB" in big and "Pídale" in big
    assert "131051" in summaries.error_notice(131051) and "Pídale" in summaries.error_notice(None)
    assert "no compatible: poll" in summaries.unsupported_notice("poll")
    assert "cambiado de número" in summaries.identity_notice("user_changed_number")
    assert summaries.choice_text("Padrón", "Certificado") == "Padrón — Certificado"


def test_inbound_parsing_and_texts_import_no_io_library() -> None:
    """The sans-I/O halves stay pure: importing them loads no network or database code."""
    code = ("import sys; import bridge.whatsapp.message_content, bridge.whatsapp.rich_content, "
            "bridge.texts.matrix.es, bridge.whatsapp.vcard; "
            "print(sorted(m for m in ('aiohttp', 'nio', 'sqlalchemy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(("change", "old", "new"), [
    # Keyed by BSUID: a new number keeps the key, replaces the number.
    (SystemChange("user_changed_number", new_wa_id="34611"), Identity("ES.A", "34600"),
     Identity("ES.A", "34611")),
    # ...unless a new BSUID comes with it.
    (SystemChange("user_changed_number", new_wa_id="34611", new_user_id="ES.B"),
     Identity("ES.A", "34600"), Identity("ES.B", "34611")),
    # Keyed by number (no BSUID known): the new number is the new key.
    (SystemChange("user_changed_number", new_wa_id="34611"), Identity("34600", "34600"),
     Identity("34611", "34611")),
    # A username-only citizen's BSUID changes; no number appears.
    (SystemChange("user_changed_user_id", new_user_id="ES.B"), Identity("ES.A", None),
     Identity("ES.B", None)),
    (SystemChange("user_changed_user_id", new_user_id="ES.B"), Identity("ES.A", "34600"),
     Identity("ES.B", "34600")),
    # Nothing to move to.
    (SystemChange("user_changed_number"), Identity("ES.A", "34600"), None),
    (SystemChange("customer_identity_changed", new_wa_id="34611"), Identity("ES.A", None),
     None),
])
def test_identity_after_a_change(change: SystemChange, old: Identity,
                                 new: Identity | None) -> None:
    assert identity_after(change, old) == new


card_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["name", "formatted_name", "first_name", "org", "company", "title",
                         "phones", "phone", "type", "emails", "email", "addresses", "street",
                         "product_items", "product_retailer_id", "quantity", "item_price",
                         "text", "response_json", "flow_token", "source_url", "headline"])
        | st.text(max_size=4), inner, max_size=6), max_leaves=25)


@given(card_like)
def test_structured_parsers_and_texts_never_raise(value: Any) -> None:
    cards = parse_contacts(value if isinstance(value, list) else [value])
    if cards:
        assert summaries.contacts_summary(cards) and to_vcf(cards).endswith(b"END:VCARD\r\n")
    obj = value if isinstance(value, dict) else {"product_items": value, "response_json": value}
    if (order := parse_order(obj)) is not None:
        assert summaries.order_summary(order).startswith("Pedido")
    assert summaries.flow_summary(parse_flow(obj))
    if (referral := parse_referral(value)) is not None:
        assert summaries.referral_notice(referral).startswith("Este mensaje")
