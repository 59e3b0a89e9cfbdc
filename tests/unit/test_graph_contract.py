"""Meta's request contract (bridge.whatsapp.contract, schemas/messages.json): Meta's
reference bodies pass, each rule has a body that breaks it and is refused with Graph's
code, and every body the bridge builds passes (BUILDERS: add yours there)."""

from __future__ import annotations

import base64
import copy
import fnmatch
import secrets
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from bridge.admin.notices import notice_template
from bridge.config import Config, parse_config
from bridge.whatsapp import consent, notice_consent
from bridge.whatsapp.contract import (
    INVALID_PARAMETER,
    INVALID_VALUE,
    MISSING_PARAMETER,
    TITLES,
    schema,
    validate_message,
    validate_upload,
)
from bridge.whatsapp.graph import GraphClient, Recipient

ROOT = Path(__file__).resolve().parents[2]
NUMBER = "34600111222"
BSUID = "ES.13491208655302741918"
WAMID = "wamid.HBgLMzQ2MDAxMTEyMjIVAgARGBI5QTNDQTVCM0Q0Q0Q2RTY3RTcA"


def msg(kind: str, obj: Any, **extra: Any) -> dict[str, Any]:
    """A send body to NUMBER, shaped as Meta's reference examples."""
    return {"messaging_product": "whatsapp", "recipient_type": "individual", "to": NUMBER,
            "type": kind, kind: obj, **extra}


def interactive(kind: str, action: dict[str, Any], **parts: Any) -> dict[str, Any]:
    return msg("interactive", {"type": kind, "body": {"text": "¿En qué podemos ayudarle?"},
                               **parts, "action": action})


def buttons(n: int, title: str = "Opción", id_: str = "op") -> dict[str, Any]:
    return {"buttons": [{"type": "reply", "reply": {"id": f"{id_}{i}", "title": f"{title}{i}"}}
                        for i in range(n)]}


def rows(n: int, prefix: str = "r", **row: Any) -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{i}", "title": f"Trámite {i}", **row} for i in range(n)]


def list_action(*sections: list[dict[str, Any]], button: str = "Ver trámites"
                ) -> dict[str, Any]:
    return {"button": button,
            "sections": [{"title": f"Sección {i}", "rows": r} for i, r in enumerate(sections)]}


def template(*components: dict[str, Any], name: str = "aviso_cita",
             language: dict[str, Any] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {"name": name,
                           "language": language or {"code": "es", "policy": "deterministic"}}
    if components:
        obj["components"] = list(components)
    return msg("template", obj)


CONTACT = {
    "name": {"formatted_name": "Oficina de Atención", "first_name": "Oficina",
             "last_name": "de Atención"},
    "org": {"company": "Ayuntamiento de Ejemplo", "department": "Registro", "title": "OAC"},
    "phones": [{"phone": "+34 910 000 000", "type": "WORK", "wa_id": "34910000000"}],
    "emails": [{"email": "oac@ejemplo.es", "type": "WORK"}],
    "urls": [{"url": "https://sede.ejemplo.es", "type": "WORK"}],
    "addresses": [{"street": "Plaza Mayor 1", "city": "Ejemplo", "zip": "28001",
                   "country": "España", "country_code": "es", "type": "WORK"}],
    "birthday": "1980-01-31",
}
IMAGE_HEADER = {"type": "image", "image": {"link": "https://sede.ejemplo.es/logo.png"}}

# -- (a) Meta's reference shapes are accepted ---------------------------------------------

VALID: dict[str, dict[str, Any]] = {
    "text": msg("text", {"body": "Hola, le atendemos"}),
    "text, preview_url": msg("text", {"body": "Vea https://sede.ejemplo.es", "preview_url": True}),
    "text, type omitted (defaults to text)": {"messaging_product": "whatsapp", "to": NUMBER,
                                              "text": {"body": "hola"}},
    "text, 4096 characters": msg("text", {"body": "x" * 4096}),
    "text, a reply": msg("text", {"body": "sí"}, context={"message_id": WAMID}),
    "text, callback data of 512": msg("text", {"body": "hola"},
                                      biz_opaque_callback_data="c" * 512),
    "text, to a BSUID": {"messaging_product": "whatsapp", "recipient_type": "individual",
                         "recipient": BSUID, "type": "text", "text": {"body": "hola"}},
    "text, to with +": msg("text", {"body": "hola"}) | {"to": "+" + NUMBER},
    "image by id": msg("image", {"id": "1479537139650973"}),
    "image by link, caption": msg("image", {"link": "https://sede.ejemplo.es/plano.jpg",
                                            "caption": "Plano"}),
    "video by id, caption": msg("video", {"id": "1166846181421424", "caption": "c" * 1024}),
    "audio by id": msg("audio", {"id": "1013859600285441"}),
    "audio by link": msg("audio", {"link": "https://sede.ejemplo.es/aviso.ogg"}),
    "document by id, caption, filename": msg("document", {"id": "1376223850470843",
                                                          "caption": "Resolución",
                                                          "filename": "resolucion.pdf"}),
    "document by link": msg("document", {"link": "http://sede.ejemplo.es/r.pdf"}),
    "sticker by id": msg("sticker", {"id": "798882015472548"}),
    "sticker by link, a reply": msg("sticker", {"link": "https://sede.ejemplo.es/s.webp"},
                                    context={"message_id": WAMID}),
    "location, numbers": msg("location", {"latitude": 40.4168, "longitude": -3.7038,
                                          "name": "Ayuntamiento", "address": "Plaza Mayor 1"}),
    "location, strings": msg("location", {"latitude": "40.4168", "longitude": "-3.7038"}),
    "contacts, one full card": msg("contacts", [CONTACT]),
    "contacts, five cards": msg("contacts", [{"name": {"formatted_name": f"C{i}"}}
                                             for i in range(5)]),
    "reaction": msg("reaction", {"message_id": WAMID, "emoji": "👍"}),
    "reaction removed": msg("reaction", {"message_id": WAMID, "emoji": ""}),
    "interactive button, three": interactive("button", buttons(3)),
    "interactive button, header and footer": interactive(
        "button", buttons(2), header=IMAGE_HEADER, footer={"text": "f" * 60}),
    "interactive button, limits": msg("interactive", {
        "type": "button", "header": {"type": "text", "text": "h" * 60},
        "body": {"text": "b" * 1024},
        "action": {"buttons": [{"type": "reply", "reply": {"id": "i" * 256, "title": "t" * 20}}]}}),
    "interactive list, ten rows in two sections": interactive(
        "list", list_action(rows(4, "a"), rows(6, "b", description="d" * 72)),
        header={"type": "text", "text": "Trámites"}, footer={"text": "Ayuntamiento"}),
    "interactive list, one untitled section": interactive(
        "list", {"button": "b" * 20, "sections": [{"rows": [{"id": "i" * 200,
                                                              "title": "t" * 24}]}]}),
    "interactive cta_url": interactive(
        "cta_url", {"name": "cta_url", "parameters": {"display_text": "Abrir la sede",
                                                      "url": "https://sede.ejemplo.es"}},
        header=IMAGE_HEADER),
    "interactive location request": interactive("location_request_message",
                                                {"name": "send_location"}),
    "interactive flow": interactive("flow", {"name": "flow", "parameters": {
        "flow_message_version": "3", "flow_id": "1234567890", "flow_cta": "Pedir cita",
        "flow_token": "t", "flow_action": "navigate",
        "flow_action_payload": {"screen": "CITA", "data": {"oficina": "centro"}}}}),
    "interactive product": msg("interactive", {"type": "product", "action": {
        "catalog_id": "146265584024623", "product_retailer_id": "sku-1"}}),
    "interactive product_list": interactive("product_list", {
        "catalog_id": "146265584024623",
        "sections": [{"title": "Tasas", "product_items": [{"product_retailer_id": "sku-1"}]}]},
        header={"type": "text", "text": "Tasas"}),
    "interactive catalog_message": interactive("catalog_message", {
        "name": "catalog_message", "parameters": {"thumbnail_product_retailer_id": "sku-1"}}),
    "template, no components": template(name="hello_world",
                                        language={"code": "en_US"}),
    "template, positional parameters": template(
        {"type": "header", "parameters": [{"type": "image", "image": {"id": "123"}}]},
        {"type": "body", "parameters": [
            {"type": "text", "text": "Ayuntamiento de Ejemplo"},
            {"type": "currency", "currency": {"fallback_value": "12,50 €", "code": "EUR",
                                              "amount_1000": 12500}},
            {"type": "date_time", "date_time": {"fallback_value": "3 de diciembre"}}]},
        {"type": "button", "sub_type": "quick_reply", "index": "0",
         "parameters": [{"type": "payload", "payload": "CONFIRMAR"}]},
        {"type": "button", "sub_type": "url", "index": 1,
         "parameters": [{"type": "text", "text": "cita/123"}]}),
    "template, named parameters": template(
        {"type": "body", "parameters": [
            {"type": "text", "parameter_name": "organismo", "text": "Ayuntamiento"},
            {"type": "text", "parameter_name": "fecha", "text": "3 de diciembre"}]}),
    "template, document header and coupon": template(
        {"type": "header", "parameters": [{"type": "document", "document": {
            "link": "https://sede.ejemplo.es/r.pdf", "filename": "r.pdf"}}]},
        {"type": "button", "sub_type": "copy_code", "index": 0,
         "parameters": [{"type": "coupon_code", "coupon_code": "CITA25"}]}),
    "template, location header": template(
        {"type": "header", "parameters": [{"type": "location", "location": {
            "latitude": 40.4, "longitude": -3.7, "name": "OAC", "address": "Plaza Mayor 1"}}]}),
    "mark read": {"messaging_product": "whatsapp", "status": "read", "message_id": WAMID},
    "mark read, typing": {"messaging_product": "whatsapp", "status": "read",
                          "message_id": WAMID, "typing_indicator": {"type": "text"}},
}


def test_schema_is_valid_draft_2020_12() -> None:
    Draft202012Validator.check_schema(schema())
    assert schema()["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_schema_is_installed_with_the_package() -> None:
    """The simulator (and `civic-bridge demo`) load it from the installed package."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["bridge"]
    shipped = [p.relative_to(ROOT / "bridge").as_posix()
               for p in (ROOT / "bridge" / "whatsapp" / "schemas").glob("*.json")]
    assert shipped and all(any(fnmatch.fnmatch(f, g) for g in globs) for f in shipped)
    assert any(d.startswith("jsonschema") for d in pyproject["project"]["dependencies"])


def test_contract_module_does_no_io() -> None:
    """Importing the contract loads no HTTP client, ORM or Matrix library."""
    code = ("import sys, bridge.whatsapp.contract; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'aiohttp', 'sqlalchemy', 'alembic', 'nio', 'asyncpg'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("body", VALID.values(), ids=VALID.keys())
def test_reference_bodies_are_accepted(body: dict[str, Any]) -> None:
    assert validate_message(body) is None


def test_upload_form_accepted() -> None:
    assert validate_upload({"messaging_product": "whatsapp", "type": "image/jpeg"}, True) is None


# -- (b) each rule refused, with Graph's code ------------------------------------------------


def edit(name: str, change: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """VALID[name] with `change` applied to a copy."""
    body = copy.deepcopy(VALID[name])
    change(body)
    return body


def drop(*path: Any) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        node: Any = body
        for part in path[:-1]:
            node = node[part]
        del node[path[-1]]
    return change


def put(value: Any, *path: Any) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        node: Any = body
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
    return change


M, V, P = MISSING_PARAMETER, INVALID_VALUE, INVALID_PARAMETER
# (rule, body, code, text the details must contain)
INVALID: list[tuple[str, Any, int, str]] = [
    ("body is an object", ["text"], P, "JSON object"),
    ("messaging_product required", edit("text", drop("messaging_product")), M,
     "messaging_product is required"),
    ("messaging_product is whatsapp", edit("text", put("sms", "messaging_product")), V,
     "messaging_product"),
    ("recipient_type individual", edit("text", put("group", "recipient_type")), V,
     "recipient_type"),
    ("to or recipient required", edit("text", drop("to")), M, "to or recipient"),
    ("not both to and recipient", edit("text", put(BSUID, "recipient")), P, "only one"),
    ("to is a phone number", edit("text", put("Ana", "to")), V, "to is not in the expected"),
    ("recipient is a BSUID", edit("text, to a BSUID", put("34600111222", "recipient")), V,
     "recipient"),
    ("known type", edit("text", put("hologram", "type")), V, "type must be one of"),
    ("type object present", edit("image by id", drop("image")), M, "image is required"),
    ("no other type's object", edit("text", put({"id": "1"}, "image")), P,
     "image is not a parameter"),
    ("no unknown top-level field", edit("text", put(True, "priority")), P,
     "priority is not a parameter"),
    ("text body ≤ 4096", edit("text", put("x" * 4097, "text", "body")), V,
     "text.body must be at most 4096"),
    ("text body not empty", edit("text", put("", "text", "body")), V, "text.body must not"),
    ("text body required", edit("text", drop("text", "body")), M, "text.body is required"),
    ("text fields", edit("text", put("x", "text", "caption")), P, "caption"),
    ("preview_url boolean", edit("text", put("yes", "text", "preview_url")), V,
     "text.preview_url must be of type boolean"),
    ("media id or link", edit("image by id", drop("image", "id")), M, "image needs id or link"),
    ("media not id and link", edit("image by id", put("https://x.es/a.jpg", "image", "link")), P,
     "only one"),
    ("media link http(s)", edit("image by link, caption",
                                put("ftp://x.es/a.jpg", "image", "link")), V, "image.link"),
    ("caption ≤ 1024", edit("video by id, caption", put("c" * 1025, "video", "caption")), V,
     "video.caption must be at most 1024"),
    ("audio has no caption", edit("audio by id", put("c", "audio", "caption")), P,
     "audio: caption"),
    ("sticker has no caption", edit("sticker by id", put("c", "sticker", "caption")), P,
     "sticker: caption"),
    ("only documents have a filename", edit("image by id", put("a.jpg", "image", "filename")),
     P, "image: filename"),
    ("location latitude required", edit("location, numbers", drop("location", "latitude")), M,
     "location.latitude is required"),
    ("latitude in range", edit("location, numbers", put(91, "location", "latitude")), V,
     "location.latitude"),
    ("location fields", edit("location, numbers", put("x", "location", "url")), P, "url"),
    ("≤ 5 contacts", edit("contacts, five cards",
                          lambda b: b["contacts"].append({"name": {"formatted_name": "6"}})),
     V, "contacts must have at most 5"),
    ("≥ 1 contact", edit("contacts, five cards", put([], "contacts")), V,
     "contacts must have at least 1"),
    ("contact name required", edit("contacts, one full card", drop("contacts", 0, "name")), M,
     "contacts[0].name is required"),
    ("formatted_name required", edit("contacts, one full card",
                                     drop("contacts", 0, "name", "formatted_name")), M,
     "contacts[0].name.formatted_name is required"),
    ("reaction message_id required", edit("reaction", drop("reaction", "message_id")), M,
     "reaction.message_id is required"),
    ("reaction emoji required", edit("reaction", drop("reaction", "emoji")), M,
     "reaction.emoji is required"),
    ("interactive type known", edit("interactive button, three",
                                    put("carousel", "interactive", "type")), V,
     "interactive.type must be one of"),
    ("interactive body required", edit("interactive button, three",
                                       drop("interactive", "body")), M,
     "interactive.body is required"),
    ("interactive body ≤ 1024", edit("interactive button, three",
                                     put({"text": "b" * 1025}, "interactive", "body")), V,
     "interactive.body.text must be at most 1024"),
    ("header text ≤ 60", edit("interactive button, three",
                              put({"type": "text", "text": "h" * 61}, "interactive", "header")),
     V, "interactive.header.text must be at most 60"),
    ("footer text ≤ 60", edit("interactive button, three",
                              put({"text": "f" * 61}, "interactive", "footer")), V,
     "interactive.footer.text must be at most 60"),
    ("≤ 3 reply buttons", edit("interactive button, three",
                               put(buttons(4), "interactive", "action")), V,
     "interactive.action.buttons must have at most 3"),
    ("≥ 1 reply button", edit("interactive button, three",
                              put({"buttons": []}, "interactive", "action")), V,
     "must have at least 1"),
    ("button title ≤ 20", edit("interactive button, three",
                               put("t" * 21, "interactive", "action", "buttons", 0, "reply",
                                   "title")), V,
     "interactive.action.buttons[0].reply.title must be at most 20"),
    ("button id ≤ 256", edit("interactive button, three",
                             put("i" * 257, "interactive", "action", "buttons", 1, "reply",
                                 "id")), V,
     "interactive.action.buttons[1].reply.id must be at most 256"),
    ("button ids unique", edit("interactive button, three",
                               put("op0", "interactive", "action", "buttons", 1, "reply", "id")),
     V, "unique"),
    ("button type reply", edit("interactive button, three",
                               put("url", "interactive", "action", "buttons", 0, "type")), V,
     "must be \"reply\""),
    ("list button ≤ 20", edit("interactive list, ten rows in two sections",
                              put("b" * 21, "interactive", "action", "button")), V,
     "interactive.action.button must be at most 20"),
    ("≤ 10 sections", edit("interactive list, ten rows in two sections",
                           put(list_action(*[rows(1, f"s{i}") for i in range(11)]),
                               "interactive", "action")), V,
     "interactive.action.sections must have at most 10"),
    ("≤ 10 rows in all", edit("interactive list, ten rows in two sections",
                              put(list_action(rows(5, "a"), rows(6, "b")),
                                  "interactive", "action")), V, "at most 10 rows"),
    ("row title ≤ 24", edit("interactive list, ten rows in two sections",
                            put("t" * 25, "interactive", "action", "sections", 0, "rows", 0,
                                "title")), V, "rows[0].title must be at most 24"),
    ("row description ≤ 72", edit("interactive list, ten rows in two sections",
                                  put("d" * 73, "interactive", "action", "sections", 1, "rows",
                                      0, "description")), V,
     "rows[0].description must be at most 72"),
    ("row id ≤ 200", edit("interactive list, ten rows in two sections",
                          put("i" * 201, "interactive", "action", "sections", 0, "rows", 0,
                              "id")), V, "rows[0].id must be at most 200"),
    ("section title ≤ 24", edit("interactive list, ten rows in two sections",
                                put("t" * 25, "interactive", "action", "sections", 0,
                                    "title")), V, "sections[0].title must be at most 24"),
    ("titles when several sections", edit("interactive list, ten rows in two sections",
                                          drop("interactive", "action", "sections", 1,
                                               "title")), M, "sections[1].title is required"),
    ("list header is text", edit("interactive list, ten rows in two sections",
                                 put(IMAGE_HEADER, "interactive", "header")), V,
     "interactive.header.type must be \"text\""),
    ("cta display_text ≤ 20", edit("interactive cta_url",
                                   put("d" * 21, "interactive", "action", "parameters",
                                       "display_text")), V, "display_text must be at most 20"),
    ("cta url required", edit("interactive cta_url",
                              drop("interactive", "action", "parameters", "url")), M,
     "interactive.action.parameters.url is required"),
    ("template name required", edit("template, no components", drop("template", "name")), M,
     "template.name is required"),
    ("template name format", edit("template, no components",
                                  put("Aviso Cita", "template", "name")), V, "template.name"),
    ("language code required", edit("template, no components",
                                    drop("template", "language", "code")), M,
     "template.language.code is required"),
    ("language policy deterministic", edit("template, named parameters",
                                           put("fallback", "template", "language", "policy")),
     V, "template.language.policy must be \"deterministic\""),
    ("components a list", edit("template, named parameters",
                               put({"type": "body"}, "template", "components")), V,
     "template.components must be of type array"),
    ("component type", edit("template, named parameters",
                            put("footer", "template", "components", 0, "type")), V,
     "template.components[0].type must be one of"),
    ("button sub_type required", edit("template, positional parameters",
                                      drop("template", "components", 2, "sub_type")), M,
     "template.components[2].sub_type is required"),
    ("button index 0-9", edit("template, positional parameters",
                              put("10", "template", "components", 2, "index")), V,
     "template.components[2].index"),
    ("text parameter needs text", edit("template, named parameters",
                                       drop("template", "components", 0, "parameters", 0,
                                            "text")), M,
     "template.components[0].parameters[0].text is required"),
    ("parameter_name format", edit("template, named parameters",
                                   put("Organismo", "template", "components", 0, "parameters",
                                       0, "parameter_name")), V, "parameter_name"),
    ("parameter fields", edit("template, named parameters",
                              put("x", "template", "components", 0, "parameters", 0,
                                  "payload")), P, "payload is not a parameter"),
    ("context message_id required", edit("text, a reply", put({}, "context")), M,
     "context.message_id is required"),
    ("context fields", edit("text, a reply", put("x", "context", "from")), P, "from"),
    ("callback data ≤ 512", edit("text", put("c" * 513, "biz_opaque_callback_data")), V,
     "biz_opaque_callback_data must be at most 512"),
    ("callback data a string", edit("text", put({"id": 1}, "biz_opaque_callback_data")), V,
     "biz_opaque_callback_data must be of type string"),
    ("status is read", edit("mark read", put("delivered", "status")), V,
     "status must be \"read\""),
    ("mark read message_id", edit("mark read", drop("message_id")), M,
     "message_id is required"),
    ("typing indicator text", edit("mark read, typing",
                                   put({"type": "audio"}, "typing_indicator")), V,
     "typing_indicator.type must be \"text\""),
    ("mark read fields", edit("mark read", put(NUMBER, "to")), P, "to is not a parameter"),
]


@pytest.mark.parametrize(("body", "code", "details"), [c[1:] for c in INVALID],
                         ids=[c[0] for c in INVALID])
def test_each_rule_is_refused_with_graphs_code(body: Any, code: int, details: str) -> None:
    refusal = validate_message(body)
    assert refusal is not None
    assert (refusal.code, details in refusal.details) == (code, True), refusal.details
    assert refusal.message.startswith(f"(#{code}) ")


@pytest.mark.parametrize(("fields", "has_file", "code"), [
    ({"messaging_product": "whatsapp", "type": "image/jpeg"}, False, MISSING_PARAMETER),
    ({"type": "image/jpeg"}, True, MISSING_PARAMETER),
    ({"messaging_product": "sms", "type": "image/jpeg"}, True, INVALID_VALUE),
    ({"messaging_product": "whatsapp", "type": "jpeg"}, True, INVALID_VALUE),
    ({"messaging_product": "whatsapp", "type": "image/jpeg", "caption": "x"}, True,
     INVALID_PARAMETER),
])
def test_upload_form_refused(fields: dict[str, str], has_file: bool, code: int) -> None:
    refusal = validate_upload(fields, has_file)
    assert refusal is not None and refusal.code == code


def test_refusals_never_echo_what_was_sent() -> None:
    body_text = "Mi DNI es 12345678Z y vivo en Calle Mayor 3 " * 100
    for body in (edit("text", put(body_text, "text", "body")),
                 edit("text", put("+34 600 111 222", "to")),
                 edit("text", put({"nota": body_text}, "text")),
                 edit("text", put(body_text, body_text[:30]))):
        refusal = validate_message(body)
        assert refusal is not None
        shown = refusal.message + refusal.details
        for secret in ("12345678Z", "Calle Mayor", "600 111 222"):
            assert secret not in shown


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=16)


def _graft(body: Any, choices: list[int], value: Any) -> Any:
    """Replace (or add) one node of `body`, found by walking `choices`, with `value`."""
    node: Any = body
    for choice in choices:
        keys: list[Any] = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            break
        key = keys[choice % len(keys)]
        if not isinstance(node[key], dict | list) or choice % 3 == 0:
            node[key] = value
            return body
        node = node[key]
    if isinstance(node, dict):
        node["extra"] = value
    return body


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(VALID)), choices=st.lists(st.integers(0, 50), max_size=6),
       value=JSON)
def test_any_damaged_body_gets_an_answer_not_a_crash(name: str, choices: list[int],
                                                     value: Any) -> None:
    refusal = validate_message(_graft(copy.deepcopy(VALID[name]), choices, value))
    assert refusal is None or (refusal.code in TITLES and refusal.details)


@settings(max_examples=100)
@given(body=JSON)
def test_any_json_gets_an_answer_not_a_crash(body: Any) -> None:
    refusal = validate_message(body)
    assert refusal is not None and refusal.code in TITLES


# -- (c) every body the bridge builds -------------------------------------------------------


@dataclass
class Recorder:
    """A Graph stand-in that accepts anything and keeps what it got, for the contract."""

    bodies: list[Any]
    uploads: list[tuple[dict[str, str], bool]]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v23.0/{phone}/messages", self.messages)
        app.router.add_post("/v23.0/{phone}/media", self.media)
        return app

    async def messages(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        return web.json_response({"messaging_product": "whatsapp", "success": True,
                                  "messages": [{"id": "wamid.recorded"}]})

    async def media(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.uploads.append(({k: v for k, v in form.items() if isinstance(v, str)},
                             isinstance(form.get("file"), web.FileField)))
        return web.json_response({"id": "1234567890"})


@pytest.fixture
async def recorded() -> AsyncIterator[tuple[Recorder, GraphClient]]:
    recorder = Recorder([], [])
    server = TestServer(recorder.app())
    await server.start_server()
    async with aiohttp.ClientSession() as session:
        yield recorder, GraphClient(session, api_base=str(server.make_url("/v23.0")),
                                    phone_number_id="106540352242922",
                                    access_token="EAAG" + secrets.token_hex(16))
    await server.close()


def _config() -> Config:
    def key() -> str:
        return base64.b64encode(secrets.token_bytes(32)).decode()

    return parse_config({
        "homeserver": {"url": "https://matrix.agency.example", "domain": "agency.example"},
        "appservice": {"as_token": secrets.token_urlsafe(32),
                       "hs_token": secrets.token_urlsafe(32)},
        "privacy": {"data_key": key(), "index_key": key()},
        "audit": {"key": key()},
        "admin": {"token": secrets.token_urlsafe(32)},
        "consent": {"agency_name": "Ayuntamiento de Ejemplo de la Comarca del Río"},
        "whatsapp": {"enabled": True, "phone_number_id": "1234567890",
                     "access_token": "EAAG" + secrets.token_hex(20),
                     "app_secret": secrets.token_hex(16), "verify_token": "hub-1"},
        "notices": {"enabled": True, "issuer": "Ayuntamiento de Ejemplo",
                    "sede_url": "https://sede.ejemplo.es/notificaciones"},
    })


CFG = _config()
TO = Recipient(wa_id=NUMBER, user_id=BSUID)
Build = Callable[[GraphClient], Awaitable[Any]]


def _notice(g: GraphClient) -> Awaitable[str]:
    t = notice_template(CFG.notices)  # what the outbox hands to send_template
    return g.send_template(TO, t["name"], t["language"], t["components"], callback_data="cb1.9")


# One entry per body the bridge builds (name, call): add a case with every new builder.
BUILDERS: list[tuple[str, Build]] = [
    ("staff text", lambda g: g.send_text(TO, "Hola, le atendemos", callback_data="cb1.1")),
    ("staff text at 4096", lambda g: g.send_text(TO, "x" * 4096)),
    ("staff text reply, preview", lambda g: g.send_text(TO, "Vea https://sede.ejemplo.es",
                                                        WAMID, preview_url=True)),
    ("text to a BSUID-only citizen", lambda g: g.send_text(Recipient(user_id=BSUID), "hola")),
    ("callback data at 512", lambda g: g.send_text(TO, "hola", callback_data="c" * 512)),
    ("image with caption", lambda g: g.send_media(TO, "image", "111", "Plano", None, WAMID)),
    ("video", lambda g: g.send_media(TO, "video", "112", "Vídeo")),
    ("audio", lambda g: g.send_media(TO, "audio", "113")),
    ("document", lambda g: g.send_media(TO, "document", "114", "Resolución", "res.pdf")),
    ("sticker", lambda g: g.send_media(TO, "sticker", "115")),
    ("reaction", lambda g: g.send_reaction(TO, WAMID, "👍")),
    ("reaction removed", lambda g: g.send_reaction(TO, WAMID, "")),
    ("notice of availability", _notice),
    ("template without components", lambda g: g.send_template(TO, "hello_world", "en_US")),
    ("chat consent prompt", lambda g: g.send_buttons(
        TO, consent.notice_text(CFG.consent),
        [(consent.OPT_IN_BUTTON, "Acepto"), (consent.OPT_OUT_BUTTON, "No, gracias")])),
    ("notices consent prompt", lambda g: g.send_buttons(
        TO, notice_consent.consent_text(CFG),
        [(notice_consent.NOTICES_IN_BUTTON, "Acepto"),
         (notice_consent.NOTICES_OUT_BUTTON, "No, gracias")])),
    ("notices confirmation", lambda g: g.send_buttons(
        TO, notice_consent.confirm_in(CFG, "ABCD-EFGH-JKLM"),
        [(notice_consent.NOTICES_OUT_BUTTON, "Baja de avisos")])),
    ("mark read", lambda g: g.mark_read(WAMID)),
    ("mark read, typing", lambda g: g.mark_read(WAMID, typing=True)),
]


@pytest.mark.parametrize("build", [b for _, b in BUILDERS], ids=[n for n, _ in BUILDERS])
async def test_every_body_the_bridge_builds_is_accepted(
        recorded: tuple[Recorder, GraphClient], build: Build) -> None:
    recorder, graph = recorded
    await build(graph)
    (body,) = recorder.bodies
    assert validate_message(body) is None, validate_message(body)


async def test_the_media_upload_form_is_accepted(recorded: tuple[Recorder, GraphClient]) -> None:
    recorder, graph = recorded
    await graph.upload_media(b"%PDF-1.7", "application/pdf", "resolucion.pdf")
    (upload,) = recorder.uploads
    assert validate_upload(*upload) is None

