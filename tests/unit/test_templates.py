"""Staff templates: config, `!plantilla` parsing, parameter checks, rendering, Meta's body."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from bridge.config import TemplateConfig
from bridge.whatsapp import templates as tpl

CITA = TemplateConfig(name="cita_confirmada", description="Confirma una cita",
                      body="Su cita es el {{fecha}} a las {{hora}} en {{lugar}}.",
                      parameters=["fecha", "hora", "lugar"])
SEGUIMIENTO = TemplateConfig(name="seguimiento", description="Retoma la conversación",
                             body="Hola, seguimos con su consulta {{1}}. Responda para "
                                  "continuar.", parameter_format="positional",
                             parameters=["asunto"])
SIN = TemplateConfig(name="recordatorio", description="Sin parámetros",
                     body="Tiene una consulta abierta. Responda para continuar.")
ALL = [CITA, SEGUIMIENTO, SIN]


def test_config_placeholders_must_match_parameters() -> None:
    with pytest.raises(ValidationError, match="do not match parameters"):
        TemplateConfig(name="x", description="d", body="Hola {{nombre}}", parameters=["otro"])
    with pytest.raises(ValidationError, match="do not match parameters"):
        TemplateConfig(name="x", description="d", body="Hola {{2}}",
                       parameter_format="positional", parameters=["a"])
    with pytest.raises(ValidationError):
        TemplateConfig(name="Con Mayúsculas", description="d", body="Hola")
    with pytest.raises(ValidationError, match="unique"):
        TemplateConfig(name="x", description="d", body="{{a}}", parameters=["a", "a"])


def test_config_template_names_are_unique() -> None:
    from bridge.config import WhatsAppConfig
    with pytest.raises(ValidationError, match="unique"):
        WhatsAppConfig(templates=[SIN, SIN])
    assert WhatsAppConfig().send_read_receipts is True
    assert WhatsAppConfig().templates == []


def test_parse_command() -> None:
    assert tpl.parse_command("!plantilla") == tpl.TemplateCommand(None, "")
    assert tpl.parse_command("  !Plantilla  ") == tpl.TemplateCommand(None, "")
    assert tpl.parse_command("!plantilla Cita_Confirmada fecha=3 de mayo") == \
        tpl.TemplateCommand("cita_confirmada", "fecha=3 de mayo")
    assert tpl.parse_command("!plantillas") is None
    assert tpl.parse_command("hola !plantilla") is None


def test_named_positional_and_quoted_arguments() -> None:
    args = "fecha=3 de mayo hora=10:30 lugar=Oficina de la calle Mayor"
    assert tpl.parse_args(CITA, args) == {"fecha": "3 de mayo", "hora": "10:30",
                                          "lugar": "Oficina de la calle Mayor"}
    assert tpl.parse_args(CITA, '"3 de mayo" 10:30 "Oficina central"') == {
        "fecha": "3 de mayo", "hora": "10:30", "lugar": "Oficina central"}
    # With one parameter the whole text is its value.
    assert tpl.parse_args(SEGUIMIENTO, "sobre el padrón") == {"asunto": "sobre el padrón"}
    assert tpl.parse_args(SIN, "") == {}
    with pytest.raises(tpl.TemplateProblem, match="necesita 3 valores"):
        tpl.parse_args(CITA, "mañana 10:00")
    with pytest.raises(tpl.TemplateProblem, match="no lleva parámetros"):
        tpl.parse_args(SIN, "algo")
    with pytest.raises(tpl.TemplateProblem, match="comillas"):
        tpl.parse_args(CITA, '"3 de mayo 10:30 x')
    with pytest.raises(tpl.TemplateProblem, match="dos veces"):
        tpl.parse_args(CITA, "fecha=1 fecha=2 hora=3")


@pytest.mark.parametrize(("value", "problem"), [
    ("", "Falta el valor"),
    ("x" * 1025, "demasiado largo"),
    ("dos\nlíneas", "saltos de línea"),
    ("con\ttab", "saltos de línea"),
    ("muchos      espacios", "cuatro espacios"),
    ("llame al 612 345 678", "phone"),
    ("DNI 12345678Z", "dni"),
    ("ES91 2100 0418 4502 0005 1332", "iban"),
])
def test_parameter_checks_refuse_before_anything_is_queued(value: str, problem: str) -> None:
    values = {"fecha": "3 de mayo", "hora": "10:30", "lugar": value}
    with pytest.raises(tpl.TemplateProblem, match=problem) as err:
        tpl.check(CITA, values)
    if value.strip():
        assert value.strip() not in err.value.message  # never repeated back
    assert err.value.status == 400


def test_parameter_checks_accept_ordinary_values() -> None:
    values = {"fecha": "3 de mayo de 2026", "hora": "10:30", "lugar": "x" * 1024}
    assert tpl.check(CITA, values) == values
    with pytest.raises(tpl.TemplateProblem, match="desconocido"):
        tpl.check(CITA, {**values, "otro": "y"})
    with pytest.raises(tpl.TemplateProblem, match="Falta el valor de hora"):
        tpl.check(CITA, {"fecha": "hoy", "lugar": "aquí"})


def test_unknown_template_is_a_404() -> None:
    with pytest.raises(tpl.UnknownTemplate) as err:
        tpl.find(ALL, "no_existe")
    assert err.value.status == 404


def test_render_and_meta_body_named() -> None:
    values = {"fecha": "3 de mayo", "hora": "10:30", "lugar": "la oficina"}
    assert tpl.render(CITA, values) == "Su cita es el 3 de mayo a las 10:30 en la oficina."
    assert tpl.payload(CITA, values) == {
        "type": "template", "name": "cita_confirmada", "language": "es",
        "components": [{"type": "body", "parameters": [
            {"type": "text", "parameter_name": "fecha", "text": "3 de mayo"},
            {"type": "text", "parameter_name": "hora", "text": "10:30"},
            {"type": "text", "parameter_name": "lugar", "text": "la oficina"}]}]}


def test_render_and_meta_body_positional_and_none() -> None:
    assert tpl.render(SEGUIMIENTO, {"asunto": "del padrón"}).startswith(
        "Hola, seguimos con su consulta del padrón.")
    assert tpl.payload(SEGUIMIENTO, {"asunto": "del padrón"})["components"] == [
        {"type": "body", "parameters": [{"type": "text", "text": "del padrón"}]}]
    assert tpl.payload(SIN, {})["components"] == []


def test_api_parameters_by_name_or_in_order() -> None:
    assert tpl.from_api(SEGUIMIENTO, ["x"]) == {"asunto": "x"}
    assert tpl.from_api(CITA, {"fecha": "a"}) == {"fecha": "a"}
    assert tpl.from_api(SIN, None) == {}
    for bad in (["a", "b"], "texto", {"asunto": 3}):
        with pytest.raises(tpl.TemplateProblem):
            tpl.from_api(SEGUIMIENTO, bad)


def test_listing_names_every_template_and_how_to_use_it() -> None:
    text = tpl.listing(ALL)
    for t in ALL:
        assert f"• {t.name} " in text
        assert t.description in text and t.body in text
    assert "!plantilla cita_confirmada fecha=… hora=… lugar=…" in text
    assert "whatsapp.templates" in tpl.listing([])


def test_config_problems_name_the_template_key_path() -> None:
    from bridge.config import parse_config
    from bridge.errors import ConfigError
    from tests.unit.test_config import valid

    raw = valid()
    raw["whatsapp"] = {"templates": [
        {"name": "ok", "description": "d", "body": "Hola"},
        {"name": "mal", "description": "d", "body": "Hola {{nombre}}"}]}
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert err.value.problems == [
        "whatsapp.templates[1].body: placeholders ['nombre'] do not match parameters "
        "(expected none)"]
    raw["whatsapp"] = {"templates": [{"name": "ok", "description": "d", "body": "Hola"}] * 2}
    with pytest.raises(ConfigError, match=r"whatsapp\.templates: template names must be unique"):
        parse_config(raw)
