"""Every translation of a surface has the texts the reference (Spanish) module has, with
the same names and the same `{placeholders}`, so adding a language is one file and
cannot silently drop a text or a value the caller fills in."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import string
import types
from pathlib import Path
from typing import Any

import pytest

from bridge import texts

ROOT = Path(__file__).resolve().parents[2]


def _placeholders(text: str) -> frozenset[str]:
    return frozenset(name for _, name, _, _ in string.Formatter().parse(text) if name)


def _shape(value: Any) -> Any:
    """What a translation must keep: placeholders, keys, lengths, parameters."""
    if isinstance(value, str):
        return ("text", _placeholders(value))
    if isinstance(value, tuple | list):
        return ("seq", tuple(_shape(v) for v in value))
    if isinstance(value, dict):
        return ("map", {k: _shape(v) for k, v in value.items()})
    if inspect.isfunction(value):
        return ("fn", tuple((p.name, p.kind) for p in
                            inspect.signature(value).parameters.values()))
    return ("value", type(value).__name__)


def _texts(module: types.ModuleType) -> dict[str, Any]:
    """The public texts of a language module: UPPER_CASE constants and its own functions."""
    return {name: _shape(value) for name, value in vars(module).items()
            if (name.isupper() and not name.startswith("_"))
            or (inspect.isfunction(value) and value.__module__ == module.__name__
                and not name.startswith("_"))}


def _differences(reference: types.ModuleType, other: types.ModuleType) -> list[str]:
    ref, got = _texts(reference), _texts(other)
    out = [f"{name}: missing" for name in sorted(ref.keys() - got.keys())]
    out += [f"{name}: not in the reference" for name in sorted(got.keys() - ref.keys())]
    out += [f"{name}: {ref[name]} != {got[name]}" for name in sorted(ref.keys() & got.keys())
            if ref[name] != got[name]]
    return out


TRANSLATIONS = [(surface, lang) for surface in texts.SURFACES
                for lang in texts.languages(surface)[1:]]


@pytest.mark.parametrize(("surface", "language"), TRANSLATIONS)
def test_a_translation_has_every_text_with_the_same_placeholders(surface: str,
                                                                 language: str) -> None:
    reference = texts.load(surface, texts.reference(surface))
    assert _differences(reference, texts.load(surface, language)) == []


@pytest.mark.parametrize("surface", texts.SURFACES)
def test_each_surface_has_its_reference_and_a_default(surface: str) -> None:
    reference = texts.reference(surface)
    assert texts.languages(surface)[0] == reference
    assert _texts(texts.load(surface, reference))
    package = importlib.import_module(f"bridge.texts.{surface}")
    assert package.default is texts.load(surface, reference)


def test_the_check_catches_a_missing_text_and_a_changed_placeholder() -> None:
    reference = types.ModuleType("ref")
    reference.GREETING = "Hola, {name}."  # type: ignore[attr-defined]
    reference.BYE = "Adiós."  # type: ignore[attr-defined]
    translation = types.ModuleType("tr")
    translation.GREETING = "Hello, {nombre}."  # type: ignore[attr-defined]
    assert _differences(reference, translation) == [
        "BYE: missing",
        "GREETING: ('text', frozenset({'name'})) != ('text', frozenset({'nombre'}))"]


def test_an_unknown_language_or_surface_is_a_lookup_error() -> None:
    with pytest.raises(LookupError):
        texts.load("web", "xx")
    with pytest.raises(LookupError):
        texts.load("fax", "es")
    for not_a_language in ("fill", "__init__", "es.sys", "../web", "ES"):
        with pytest.raises(LookupError):
            texts.load("web", not_a_language)


# Modules whose user-facing texts moved to bridge.texts: none may say anything itself.
MIGRATED = [
    "bridge/admin/citizens.py",
    "bridge/admin/commands.py",
    "bridge/admin/moderation.py",
    "bridge/deadletters.py",
    "bridge/invites/forms.py",
    "bridge/invites/texts.py",
    "bridge/matrix/management.py",
    "bridge/matrix/relay.py",
    "bridge/moderation/intake.py",
    "bridge/moderation/texts.py",
    "bridge/rooms_wa/commands.py",
    "bridge/rooms_wa/fanout.py",
    "bridge/rooms_wa/join.py",
    "bridge/rooms_wa/members.py",
    "bridge/rooms_wa/policy.py",
    "bridge/rooms_wa/replies.py",
    "bridge/rooms_wa/wiring.py",
    "bridge/web/rooms_wa.py",
    "bridge/whatsapp/identity.py",
    "bridge/whatsapp/inbound.py",
    "bridge/whatsapp/mirror.py",
    "bridge/whatsapp/notice_consent.py",
    "bridge/whatsapp/outbox.py",
    "bridge/whatsapp/outbox_queue.py",
    "bridge/whatsapp/outbox_sender.py",
    "bridge/whatsapp/payloads.py",
    "bridge/whatsapp/portal.py",
    "bridge/whatsapp/staff_events.py",
    "bridge/whatsapp/staff_templates.py",
    "bridge/whatsapp/subscriptions.py",
    "bridge/whatsapp/templates.py",
]
# Spanish is what the bridge's own users read: logs, metrics, audit details and API
# errors are English, so a Spanish word left in a migrated module is a text left behind.
_SPANISH = re.compile(r"[áéíóúñ¿¡«»]|\b(de|la|el|que|los|las|por|con|su|una|del|se|ha)\b",
                      re.IGNORECASE)


def _said(path: Path) -> list[str]:
    """Literals in `path` (not docstrings) with a Spanish word in them."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [f"{path}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings and re.search(r"[^\W\d_]{2}", node.value)
            and _SPANISH.search(node.value)]


@pytest.mark.parametrize("module", MIGRATED)
def test_a_migrated_module_says_nothing_itself(module: str) -> None:
    assert _said(ROOT / module) == []


def test_the_leftover_check_sees_spanish_outside_docstrings(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text('"""Un docstring de la casa."""\nA = f"Hecho: {x} de la sala"\n'
                      'B = "vídeo"\nC = "m.room.message"\nD = " .!¡¿?"\n'
                      'log.info("sent to the room")\n', encoding="utf-8")
    # A lone Spanish word without an accent ("Hecho") is beyond it; a sentence is not.
    assert sorted(line.split(": ", 1)[1] for line in _said(sample)) == [
        "' de la sala'", "'vídeo'"]
