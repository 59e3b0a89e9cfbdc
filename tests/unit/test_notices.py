"""Notices of availability without network or database: config, keywords, decisions,
and the request parser that keeps content out."""

from __future__ import annotations

import base64
import secrets
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.admin.notices import parse_request, parse_withdrawal
from bridge.config import parse_config
from bridge.errors import ConfigError, InvalidParam
from bridge.whatsapp.consent import intent_of as chat_intent
from bridge.whatsapp.notice_consent import (
    NOTICES_IN_BUTTON,
    NOTICES_OUT_BUTTON,
    NoticeAction,
    confirm_in,
    consent_hash,
    consent_text,
    decide,
    intent_of,
)
from bridge.whatsapp.subscriptions import SUBSCRIPTION_CODE, new_subscription_code
from tests.fixtures.messages import button, text

STATES = ("unknown", "prompted", "granted", "withdrawn", "refused")
SEDE = "https://sede.ejemplo.es/notificaciones"


def _key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def raw(notices: dict[str, Any] | None = None, whatsapp: bool = True) -> dict[str, Any]:
    config: dict[str, Any] = {
        "homeserver": {"url": "https://matrix.agency.example", "domain": "agency.example"},
        "appservice": {"as_token": secrets.token_urlsafe(32),
                       "hs_token": secrets.token_urlsafe(32)},
        "privacy": {"data_key": _key(), "index_key": _key()},
        "audit": {"key": _key()},
        "admin": {"token": secrets.token_urlsafe(32)},
        "consent": {"agency_name": "Ayuntamiento de Ejemplo"},
    }
    if whatsapp:
        config["whatsapp"] = {"enabled": True, "phone_number_id": "1234567890",
                              "access_token": "EAAG" + secrets.token_hex(20),
                              "app_secret": secrets.token_hex(16), "verify_token": "hub-1"}
    if notices is not None:
        config["notices"] = notices
    return config


def enabled(**overrides: Any) -> dict[str, Any]:
    return {"enabled": True, "issuer": "Ayuntamiento de Ejemplo", "sede_url": SEDE} | overrides


def problems(config: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(config)
    return err.value.problems


CFG = parse_config(raw(enabled()))


# --- config ------------------------------------------------------------------------------


def test_off_by_default_and_valid_when_complete() -> None:
    assert parse_config(raw()).notices.enabled is False
    n = CFG.notices
    assert (n.template_name, n.template_language, n.opt_in_words, n.opt_out_words) == (
        "aviso_puesta_disposicion", "es", ["AVISOS"], ["BAJA AVISOS"])


@pytest.mark.parametrize(("notices", "expected"), [
    (enabled(issuer=""), "notices.issuer: missing; the issuing body's name is required"),
    (enabled(sede_url=""), "notices.sede_url: missing; the sede electrónica's generic https"),
    (enabled(sede_url="http://sede.ejemplo.es/"), "notices.sede_url: must be an https:// URL"),
    (enabled(sede_url="sede.ejemplo.es"), "notices.sede_url: must be an https:// URL"),
    (enabled(sede_url=SEDE + "?token=abc123"), "notices.sede_url: must be a generic link"),
    (enabled(sede_url=SEDE + "#abc123"), "notices.sede_url: must be a generic link"),
    (enabled(sede_url=SEDE + "?"), "notices.sede_url: must be a generic link"),
    (enabled(sede_url="https://user:pw@sede.ejemplo.es/"),
     "notices.sede_url: must not contain credentials"),
    (enabled(template_name="Aviso Notificación"), "notices.template_name: String should match"),
    (enabled(template_language="spanish"), "notices.template_language: String should match"),
    (enabled(consent_text="Avisos de {issuer} para {nombre}"),
     "notices.consent_text: unknown placeholder {nombre}"),
    (enabled(consent_text="x" * 1100), "notices.consent_text: 1100 characters once"),
    (enabled(opt_in_words=["Avisos"], opt_out_words=[" AVÍSOS "]),
     "notices.opt_out_words: overlaps opt_in_words (compared ignoring case and accents): "
     "avisos"),
    (enabled(opt_in_words=["Sí"]), "notices.opt_in_words: a notices keyword is also a consent"),
    (enabled(opt_out_words=["baja"]), "notices.opt_in_words: a notices keyword is also a "),
    (enabled(log_retention_days=0), "notices.log_retention_days: Input should be greater"),
    (enabled(body="texto"), "notices.body: unknown key"),
])
def test_each_problem_is_one_line_naming_the_key(notices: dict[str, Any], expected: str) -> None:
    [line] = problems(raw(notices))
    assert line.startswith(expected), line


def test_notices_need_whatsapp() -> None:
    [line] = problems(raw(enabled(), whatsapp=False))
    assert line.startswith("notices.enabled: requires whatsapp.enabled")


def test_disabled_notices_need_no_issuer_or_sede() -> None:
    assert parse_config(raw({"enabled": False}, whatsapp=False)).notices.issuer == ""


# --- keywords ----------------------------------------------------------------------------




@pytest.mark.parametrize("body", ["AVISOS", "avisos", " Avísos ", "¡AVISOS!", "avisos."])
def test_opt_in_keyword_ignores_case_accents_and_punctuation(body: str) -> None:
    assert intent_of(text(body), CFG.notices) == "opt_in"


@pytest.mark.parametrize("body", ["BAJA AVISOS", "baja   avisos", "Bája Avisos.", "baja\tavisos"])
def test_opt_out_keyword_is_matched_as_words(body: str) -> None:
    assert intent_of(text(body), CFG.notices) == "opt_out"
    # ... and is not the chat's BAJA, which would also end the chat.
    assert chat_intent(text(body), CFG.consent) == "message"


@pytest.mark.parametrize("body", ["BAJA", "STOP", "quiero avisos", "avisos por favor", "", "hola"])
def test_other_text_is_not_a_notices_keyword(body: str) -> None:
    assert intent_of(text(body), CFG.notices) is None


def test_buttons_decide_by_id_not_by_title() -> None:
    assert intent_of(button(NOTICES_IN_BUTTON, "lo que sea"), CFG.notices) == "opt_in"
    assert intent_of(button(NOTICES_OUT_BUTTON, "AVISOS"), CFG.notices) == "opt_out"
    assert intent_of(button("civic-bridge.opt-in", "Acepto"), CFG.notices) is None


# --- decisions ---------------------------------------------------------------------------


def test_keyword_shows_the_text_first_and_a_second_one_accepts() -> None:
    first = decide("unknown", "opt_in")
    assert first.state == "prompted" and first.actions == (NoticeAction.SEND_TEXT,)
    second = decide("prompted", "opt_in")
    assert second.state == "granted" and second.actions == (NoticeAction.CONFIRM_IN,)
    assert decide("granted", "opt_in").actions == (NoticeAction.CONFIRM_IN,)  # the code again
    for state in ("withdrawn", "refused"):
        assert decide(state, "opt_in").actions == (NoticeAction.SEND_TEXT,)  # shown again


def test_opt_out_cancels_pending_and_confirms() -> None:
    d = decide("granted", "opt_out")
    assert d.state == "withdrawn"
    assert d.actions == (NoticeAction.CANCEL_PENDING, NoticeAction.CONFIRM_OUT)
    assert decide("prompted", "opt_out").state == "refused"


@given(st.sampled_from(STATES), st.sampled_from(["opt_in", "opt_out"]))
def test_opt_out_always_confirms_and_never_grants(state: str, intent: str) -> None:
    d = decide(state, intent)  # type: ignore[arg-type]
    if intent == "opt_out":
        assert NoticeAction.CONFIRM_OUT in d.actions and d.state in ("withdrawn", "refused")
    else:
        assert d.state in ("prompted", "granted")
        assert d.state != "granted" or state in ("prompted", "granted")


def test_texts_name_issuer_sede_and_code_and_the_hash_tracks_the_text() -> None:
    shown = consent_text(CFG)
    assert "Ayuntamiento de Ejemplo" in shown and SEDE in shown and "{" not in shown
    code = new_subscription_code()
    assert code in confirm_in(CFG, code) and "BAJA AVISOS" in confirm_in(CFG, code)
    other = parse_config(raw(enabled(consent_text="Avisos de {issuer}.")))
    assert consent_hash(CFG) != consent_hash(other) and len(consent_hash(CFG)) == 64


def test_subscription_codes_are_random_and_well_formed() -> None:
    codes = {new_subscription_code() for _ in range(200)}
    assert len(codes) == 200
    assert all(SUBSCRIPTION_CODE.fullmatch(c) for c in codes)


# --- the request: recipient and reference, nothing else -----------------------------------


@pytest.mark.parametrize("field", ["body", "text", "link", "url", "attachment", "document",
                                   "template", "parameters"])
def test_any_other_field_is_refused_by_name(field: str) -> None:
    with pytest.raises(InvalidParam) as err:
        parse_request({"recipient": "BCDF-GHJK-LMNP", "reference": "N-1", field: "x"})
    assert err.value.message.startswith(f"{field}: unknown field")


@pytest.mark.parametrize("reference", ["", " N-1", "N 1", "N-1\n", "x" * 129, 7, None,
                                       "+34612345678", "12345678Z"])
def test_bad_or_personal_references_are_refused(reference: Any) -> None:
    with pytest.raises(InvalidParam) as err:
        parse_request({"recipient": "BCDF-GHJK-LMNP", "reference": reference})
    assert err.value.message.startswith("reference:")


def test_a_good_request() -> None:
    assert parse_request({"recipient": " BCDF-GHJK-LMNP ", "reference": "NOT-2026/000123"}) == (
        "BCDF-GHJK-LMNP", "NOT-2026/000123")
    with pytest.raises(InvalidParam):
        parse_request({"reference": "N-1"})


# --- an assisted withdrawal: recipient, staff_id and evidence, nothing else ---------------

WITHDRAWAL = {"recipient": "BCDF-GHJK-LMNP", "staff_id": "@ana:agency.example",
              "evidence": "REG-2026/E-417"}


def ours(user_id: str) -> bool:
    return user_id.startswith("@cb_") and user_id.endswith(":agency.example")


def test_a_good_withdrawal() -> None:
    assert parse_withdrawal({**WITHDRAWAL, "recipient": " BCDF-GHJK-LMNP "}, ours) == (
        "BCDF-GHJK-LMNP", "@ana:agency.example", "REG-2026/E-417")
    # Someone else's server may use the same localpart prefix: only ours is refused.
    assert parse_withdrawal({**WITHDRAWAL, "staff_id": "@cb_ana:other.example"}, ours)[1] == \
        "@cb_ana:other.example"


@pytest.mark.parametrize(("change", "field"), [
    ({"reason": "x"}, "reason"),
    ({"state": "granted"}, "state"),
    ({"recipient": None}, "recipient"),
    ({"staff_id": None}, "staff_id"),
    ({"staff_id": 7}, "staff_id"),
    ({"staff_id": "ana"}, "staff_id"),
    ({"staff_id": "@ana:agency.example\n"}, "staff_id"),
    ({"staff_id": "@" + "a" * 250 + ":agency.example"}, "staff_id"),
    ({"staff_id": "@cb_bot:agency.example"}, "staff_id"),
    ({"staff_id": "@cb_hjklmnpq:agency.example"}, "staff_id"),
    ({"evidence": None}, "evidence"),
    ({"evidence": ""}, "evidence"),
    ({"evidence": "REG 417"}, "evidence"),
    ({"evidence": "x" * 129}, "evidence"),
    ({"evidence": "12345678Z"}, "evidence"),
    ({"evidence": "+34612345678"}, "evidence"),
])
def test_bad_withdrawals_are_refused_naming_the_field(change: dict[str, Any],
                                                      field: str) -> None:
    body = {k: v for k, v in {**WITHDRAWAL, **change}.items() if v is not None}
    with pytest.raises(InvalidParam) as err:
        parse_withdrawal(body, ours)
    assert err.value.message.startswith(f"{field}:")
