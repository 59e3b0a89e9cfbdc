"""Moderation rules and texts (sans-I/O): display names, flag terms, report keywords,
actions, what reporters and moderators are told, and the moderation config."""

from __future__ import annotations

import pytest

from bridge.config import DEFAULT_FLAG_TERMS, DEFAULT_RESERVED_NAMES, ModerationConfig
from bridge.errors import ConfigError
from bridge.matrix.management import Command, CommandError, parse
from bridge.moderation import texts
from bridge.moderation.rules import (
    ACTIONS,
    action_of,
    flagged_term,
    name_problems,
    report_request,
    showable_name,
)
from tests.unit.test_config import valid

RESERVED = [*DEFAULT_RESERVED_NAMES, "Lucía Martín"]


@pytest.mark.parametrize(("name", "problems"), [
    ("Ciudadano/a KXQT", []),
    ("Vecina del 3º", []),
    ("Marta", []),
    ("Administrativa jubilada", []),  # "Admin" only as a whole word
    ("Juan 612 345 678", ["phone"]),
    ("+34612345678", ["phone"]),
    ("\uff16\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18", ["phone"]),  # fullwidth digits
    ("juan@correo.es", ["email"]),
    ("juan\uff20correo", ["email"]),  # fullwidth at sign, no dot
    ("AYUNTAMIENTO de Ejemplo", ["reserved"]),
    ("policia local", ["reserved"]),  # accents and case ignored
    ("lucia  martin", ["reserved"]),  # a staff member's display name
    ("Soporte 612345678", ["phone", "reserved"]),
])
def test_display_name_rules(name: str, problems: list[str]) -> None:
    assert name_problems(name, RESERVED) == problems


def test_names_with_digits_or_at_signs_are_never_shown() -> None:
    assert showable_name("Ayuntamiento oficial")
    assert not showable_name("Ana 612")
    assert not showable_name("ana@x")
    assert not showable_name("Ana \uff16")  # a fullwidth digit


@pytest.mark.parametrize(("text", "term"), [
    ("Eres un IMBÉCIL", "imbécil"),
    ("¡Te voy a   matar!", "te voy a matar"),
    ("menudo capullo.", "capullo"),
    ("Hay una disputa por el patio", None),  # "puta" only as a whole word
    ("Gracias por la información", None),
])
def test_flag_terms_match_whole_words_ignoring_case_and_accents(text: str,
                                                               term: str | None) -> None:
    assert flagged_term(text, DEFAULT_FLAG_TERMS) == term


def test_flag_terms_empty_or_blank_never_match() -> None:
    assert flagged_term("lo que sea", []) is None
    assert flagged_term("lo que sea", ["", "  "]) is None


@pytest.mark.parametrize(("text", "expected"), [
    ("DENUNCIAR", ("es", None)),
    ("denunciar  me está insultando ", ("es", "me está insultando")),
    ("Denuncia.", ("es", None)),
    ("REPORT spam", ("en", "spam")),
    ("Denunciaré", None),
    ("quiero denunciar", None),
    ("hola", None),
])
def test_whatsapp_report_keyword(text: str, expected: tuple[str, str | None] | None) -> None:
    assert report_request(text) == expected


def test_actions_in_english_and_spanish() -> None:
    assert [action_of(w) for w in ("borrar", "Silenciar", "EXPULSAR", "vetar",
                                   "descartar")] == list(ACTIONS)
    assert [action_of(a) for a in ACTIONS] == list(ACTIONS)
    assert action_of("unban") is None
    assert action_of("") is None


@pytest.mark.parametrize("language", ["es", "en", None, "fr"])
def test_reporters_are_told_in_their_language(language: str | None) -> None:
    received = texts.received(language, 42)
    assert "42" in received
    expected = "received" if language == "en" else "recibido"
    assert expected in received
    for action in ACTIONS:
        handled = texts.handled(language, 42, action)
        assert "42" in handled
        assert ("handled" if language == "en" else "atendida") in handled
    assert len({texts.handled(language, 1, a) for a in ACTIONS}) == len(ACTIONS)
    assert "DENUNCIAR" in texts.how_to_report("es") and "REPORT" in texts.how_to_report("en")


def test_report_notice_names_pseudonyms_and_links_the_event_only() -> None:
    notice = texts.report_notice(
        report_id=7, source="matrix", room_name="Plaza", room_id="!r:hs", event_id="$e:hs",
        author="Vecino (@v_a:hs)", reporter="Vecina (@v_b:hs)", reason="me insulta",
        reporter_told=False)
    assert "Report 7" in notice and "'Plaza'" in notice
    assert "https://matrix.to/#/!r:hs/$e:hs" in notice
    assert "Author: Vecino (@v_a:hs)" in notice and "Reported by: Vecina (@v_b:hs)" in notice
    assert "Reason: me insulta" in notice
    assert "could not be told" in notice
    assert "report 7 redact|mute|kick|ban|dismiss" in notice and "denuncia 7 borrar" in notice
    flag = texts.report_notice(
        report_id=8, source="flag", room_name="Plaza", room_id="!r:hs", event_id="$e:hs",
        author="Vecino", reporter="@cb_bot:hs", reason=None, reporter_told=False)
    assert "Reported by" not in flag and "could not be told" not in flag
    assert "nothing was deleted" in flag


def test_name_notice_shows_the_name_only_when_allowed() -> None:
    hidden = texts.name_notice(room_name="Plaza", room_id="!r:hs", user_id="@v_a:hs",
                               pseudonym="Vecino", problems=["phone"], shown=None,
                               reverted=True, why_not=None)
    assert "a phone number" in hidden and "set back to their pseudonym 'Vecino'" in hidden
    assert "('" not in hidden.split("took")[1].split("with")[0]
    refused = texts.name_notice(room_name="Plaza", room_id="!r:hs", user_id="@v_a:hs",
                                pseudonym="Vecino", problems=["reserved"],
                                shown="Ayuntamiento", reverted=False, why_not="no token")
    assert "('Ayuntamiento')" in refused and "could NOT" in refused and "no token" in refused


def test_flag_terms_config_default_and_per_room() -> None:
    off = ModerationConfig()
    assert off.terms_for("!a:hs") == [] and off.synapse_admin_token == ""
    on = ModerationConfig(flag_terms="default", room_flag_terms={"!quiet:hs": [],
                                                                "!own:hs": ["spam"]})
    assert on.terms_for("!a:hs") == DEFAULT_FLAG_TERMS
    assert on.terms_for("!quiet:hs") == [] and on.terms_for("!own:hs") == ["spam"]


def test_moderation_config_problems_name_their_key() -> None:
    from bridge.config import parse_config

    raw = valid()
    raw["moderation"] = {"room_flag_terms": {"sala": ["x"]}, "reports_poll_seconds": 0}
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    lines = err.value.problems
    assert any(line.startswith("moderation.room_flag_terms:") and "room IDs" in line
               for line in lines), lines
    assert any(line.startswith("moderation.reports_poll_seconds:") for line in lines), lines


def test_synapse_admin_token_from_a_file(tmp_path: object) -> None:
    from pathlib import Path

    from bridge.config import parse_config

    base = Path(str(tmp_path))
    (base / "hs-admin").write_text("syt_admin_token_value\n", encoding="utf-8")
    raw = valid()
    raw["moderation"] = {"synapse_admin_token_file": "hs-admin"}
    assert parse_config(raw, base).moderation.synapse_admin_token == "syt_admin_token_value"


@pytest.mark.parametrize(("text", "expected"), [
    ("denuncia 12 borrar", Command("report", number=12, text="borrar")),
    ("report #3 ban insulta a todos", Command("report", number=3, text="ban insulta a todos")),
    ("reports", Command("reports")),
    ("denuncias", Command("reports")),
])
def test_report_commands_parse(text: str, expected: Command) -> None:
    assert parse(text) == expected


@pytest.mark.parametrize(("text", "error"), [
    ("denuncia", "missing report number"),
    ("denuncia doce borrar", "whole number"),
    ("report 12", "missing action"),
    ("reports 3", "unexpected"),
])
def test_report_commands_refused(text: str, error: str) -> None:
    with pytest.raises(CommandError, match=error):
        parse(text)


def test_help_lists_the_report_commands() -> None:
    from bridge.matrix.management import help_text

    text = help_text()
    assert "\n  reports " in text and "\n  report N redact|mute|kick|ban|dismiss" in text
    assert "denuncia N borrar|silenciar|expulsar|vetar|descartar" in text


@pytest.mark.parametrize(("argv", "expected"), [
    (["reports", "list"], ("GET", "/admin/v1/reports?limit=100", None)),
    (["reports", "list", "--status", "open", "--limit", "5"],
     ("GET", "/admin/v1/reports?limit=5&status=open", None)),
    (["reports", "act", "12", "ban", "--reason", "reincide"],
     ("POST", "/admin/v1/reports/12/ban", {"reason": "reincide"})),
])
def test_cli_reports_calls_the_admin_api(argv: list[str],
                                         expected: tuple[str, str, object]) -> None:
    from bridge.admin.cli import request_for
    from bridge.cli import build_parser

    args = build_parser().parse_args(["admin", "-c", "config.yaml", *argv])
    assert request_for(args) == expected
