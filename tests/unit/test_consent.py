"""The consent state machine, without network or database."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.config import ConsentConfig
from bridge.whatsapp.consent import (
    OPT_IN_BUTTON,
    OPT_OUT_BUTTON,
    Action,
    decide,
    intent_of,
    notice_hash,
    notice_text,
)
from tests.fixtures.messages import button, text

CFG = ConsentConfig(agency_name="Ayuntamiento de Ejemplo")
STATES = ("unknown", "prompted", "granted", "withdrawn", "refused")




@pytest.mark.parametrize("body", ["ACEPTO", "acepto", "Sí", "si", " SÍ ", "yes!", "¡Acepto!"])
def test_opt_in_words_are_case_and_accent_insensitive(body: str) -> None:
    assert intent_of(text(body), CFG) == "opt_in"


@pytest.mark.parametrize("body", ["BAJA", "baja", "Stop", "cancelar", "CANCELAR."])
def test_opt_out_words(body: str) -> None:
    assert intent_of(text(body), CFG) == "opt_out"


@pytest.mark.parametrize("body", ["si puedo pasar mañana", "acepto las condiciones?x", "bajar",
                                  "", "Hola"])
def test_other_text_is_a_message(body: str) -> None:
    assert intent_of(text(body), CFG) == "message"


def test_buttons_decide_by_id_not_by_title() -> None:
    assert intent_of(button(OPT_IN_BUTTON, "cualquier cosa"), CFG) == "opt_in"
    assert intent_of(button(OPT_OUT_BUTTON, "Acepto"), CFG) == "opt_out"
    assert intent_of(button("other", "Hola"), CFG) == "message"


def test_first_contact_prompts_and_holds() -> None:
    d = decide("unknown", "message")
    assert d.state == "prompted" and d.actions == (Action.SEND_NOTICE, Action.HOLD)


def test_bare_opt_in_before_the_notice_is_not_consent() -> None:
    d = decide("unknown", "opt_in")
    assert d.state == "prompted" and d.actions == (Action.SEND_NOTICE,)


def test_opt_in_after_prompt_opens_the_portal() -> None:
    d = decide("prompted", "opt_in")
    assert d.state == "granted" and Action.OPEN_PORTAL in d.actions
    assert Action.MIRROR not in d.actions  # the keyword itself is not relayed


def test_only_granted_is_mirrored() -> None:
    for state in STATES:
        mirrored = Action.MIRROR in decide(state, "message").actions
        assert mirrored == (state == "granted"), state


def test_withdrawal_closes_and_confirms() -> None:
    d = decide("granted", "opt_out")
    assert d.state == "withdrawn"
    assert d.actions == (Action.CLOSE_PORTAL, Action.CONFIRM_OPT_OUT)


def test_writing_again_after_withdrawal_asks_again() -> None:
    for state in ("withdrawn", "refused"):
        d = decide(state, "message")
        assert d.state == "prompted" and d.actions[0] is Action.SEND_NOTICE


def test_opt_in_words_while_granted_are_ordinary_words() -> None:
    assert decide("granted", "opt_in").actions == (Action.MIRROR,)


@given(st.sampled_from(STATES), st.sampled_from(["opt_in", "opt_out", "message"]))
def test_opt_out_always_confirms_and_never_mirrors(state: str, intent: str) -> None:
    d = decide(state, intent)  # type: ignore[arg-type]
    if intent == "opt_out":
        assert Action.CONFIRM_OPT_OUT in d.actions and d.state in ("withdrawn", "refused")
    assert not (Action.MIRROR in d.actions and d.state != "granted")


def test_notice_names_the_agency_and_hash_tracks_the_text() -> None:
    assert "Ayuntamiento de Ejemplo" in notice_text(CFG)
    other = ConsentConfig(agency_name="Ayuntamiento de Ejemplo", notice_text="Otro {agency}")
    assert notice_hash(CFG) != notice_hash(other)
    assert len(notice_hash(CFG)) == 64


def test_default_notice_gives_first_layer_information_and_the_minimum_age() -> None:
    """GDPR art. 13 (controller, purpose, rights) and LOPDGDD art. 7 (14 years), within
    WhatsApp's 1024-character limit for an interactive message body."""
    shown = notice_text(CFG)
    assert "{agency}" not in shown
    assert "Ayuntamiento de Ejemplo, responsable del tratamiento" in shown
    assert "14 años" in shown and "supresión" in shown and "seudónimo" in shown
    assert "ACEPTO" in shown and "BAJA" in shown
    assert len(shown) <= 1024
