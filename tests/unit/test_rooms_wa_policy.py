"""Rooms over WhatsApp: the pure rules (routing, labels, the window), no I/O."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from bridge.rooms_wa import policy
from bridge.rooms_wa.policy import Ask, Conversation, Post

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def conv(key: str, minutes: int | None = None) -> Conversation:
    return Conversation(key, None if minutes is None else T0 + timedelta(minutes=minutes))


def test_not_a_room_member_takes_the_ordinary_flow() -> None:
    assert policy.route([], None) is None
    assert policy.route([conv("portal", 5)], None) is None


def test_a_quote_decides_and_becomes_the_choice() -> None:
    convs = [conv("1", 10), conv("2"), conv("portal", 20)]
    assert policy.route(convs, "2") == Post("2", choose=True)
    assert policy.route(convs, "portal") == Post("portal", choose=True)


def test_a_quote_of_a_room_left_does_not_count() -> None:
    assert policy.route([conv("1"), conv("2")], "9") == Ask(("1", "2"))


def test_one_conversation_needs_no_choice() -> None:
    assert policy.route([conv("7")], None) == Post("7")


def test_the_last_choice_wins_deterministically() -> None:
    assert policy.route([conv("1", 5), conv("2", 9), conv("portal", 1)], None) == Post("2")
    # Equal times: the same answer every time (the greater key).
    assert policy.route([conv("1", 5), conv("2", 5)], None) == Post("2")


def test_several_and_no_choice_ask_with_a_list() -> None:
    assert policy.route([conv("1"), conv("portal")], None) == Ask(("1", "portal"))


@pytest.mark.parametrize("said,word", [("SALIR", "leave"), ("salir.", "leave"),
                                       (" Salir ", "leave"), ("CAMBIAR", "switch"),
                                       ("salas", "switch"), ("salir de aquí", None),
                                       (None, None)])
def test_keywords(said: str | None, word: str | None) -> None:
    assert policy.keyword(said) == word


def test_labels_never_show_a_matrix_id() -> None:
    label = "Ayuntamiento · {name}"
    assert policy.sender_label("Ana", True, label) == "Ayuntamiento · Ana"
    assert policy.sender_label("Ana", False, label) == "Ana"
    assert policy.sender_label("@ana:agency.example", False, label) == "Participante"
    assert policy.sender_label(None, True, label) == "Ayuntamiento · Participante"
    assert policy.sender_label("  ", False, label) == "Participante"


def test_prefix_names_the_room_only_for_members_of_several() -> None:
    assert policy.prefix("Ana", "Vecinos del barrio", False) == "*Ana*: "
    assert policy.prefix("Ana", "Vecinos del barrio", True) == "[Vecinos del barrio] *Ana*: "
    long = policy.prefix("Ana", "x" * 40, True)
    assert long.startswith("[" + "x" * 23 + "…]")


@pytest.mark.parametrize("kind,switch,default,expected", [
    ("citizen", None, True, True), ("announcement", None, True, True),
    ("team", None, True, False), ("team", True, True, True),
    ("citizen", False, True, False), ("citizen", None, False, False),
    ("portal", True, True, False), ("management", None, True, False)])
def test_who_may_have_whatsapp_members(kind: str, switch: bool | None, default: bool,
                                       expected: bool) -> None:
    assert policy.allowed(kind, switch, default) is expected


def test_window_and_one_digest_per_closure() -> None:
    now = T0 + timedelta(hours=30)
    assert policy.window_open(T0 + timedelta(hours=7), now)
    assert not policy.window_open(T0, now)
    assert not policy.window_open(None, now)
    assert policy.digest_due(None, T0)
    assert not policy.digest_due(policy.closure_mark(T0), T0)
    # The citizen wrote again and the window closed again: a new closure, a new digest.
    assert policy.digest_due(policy.closure_mark(T0), T0 + timedelta(hours=2))


def test_backlog_plan_keeps_the_newest() -> None:
    assert policy.backlog_plan(3, 20) == (0, 3)
    assert policy.backlog_plan(25, 20) == (5, 20)


@pytest.mark.parametrize("kind,power,default,verdict", [
    ("citizen", 0, 0, "ok"), ("citizen", -1, 0, "muted"),
    ("announcement", 0, 50, "announcement"), ("announcement", -1, 50, "muted"),
    ("citizen", 0, 50, "muted")])
def test_who_may_post(kind: str, power: int, default: int, verdict: str) -> None:
    assert policy.may_post(kind, power, default) == verdict


def test_the_policy_imports_no_io() -> None:
    code = ("import sys, bridge.rooms_wa.policy; "
            "bad = [m for m in ('aiohttp', 'sqlalchemy', 'nio') if m in sys.modules]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("said,code", [
    ("UNIRME BCDF-GH23", "BCDF-GH23"), ("unirme bcdfgh23", "BCDF-GH23"),
    ("  Unirme  BCDF-GH23. ", "BCDF-GH23"), ("UNIRME", None), ("quiero unirme BCDF-GH23", None),
    ("UNIRME BCDF-GH2", None), (None, None)])
def test_join_codes_are_read_leniently(said: str | None, code: str | None) -> None:
    from bridge.rooms_wa.join import code_in
    assert code_in(said) == code


def test_join_codes_are_random_and_wordless() -> None:
    from bridge.rooms_wa.join import CODE_ALPHABET, code_in, new_code
    codes = {new_code() for _ in range(200)}
    assert len(codes) == 200
    for code in codes:
        assert code_in(f"UNIRME {code}") == code
        assert set(code.replace("-", "")) <= set(CODE_ALPHABET)
        assert not set("AEIOU01") & set(code)
