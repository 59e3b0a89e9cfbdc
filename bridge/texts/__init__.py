"""Every text a person reads, one package per surface, one module per language.

- `whatsapp`: what a citizen receives on WhatsApp.
- `matrix`: the notices and replies staff and admins read in Matrix rooms (portals,
  the management room, the bot's answers).
- `web`: the invite pages and their forms.

A surface's `es` module is the reference: a translation is one more module next to it
with the same names and the same `{placeholders}` (tests/unit/test_texts.py checks
that). Texts the agency configures (`consent.notice_text`, templates) stay in config.
This package imports nothing but the standard library, so the pure core can use it.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

SURFACES = ("whatsapp", "matrix", "web")
REFERENCE_LANGUAGE = "es"


def languages(surface: str) -> tuple[str, ...]:
    """The languages a surface has a module for, the reference one first."""
    package = importlib.import_module(f"{__name__}.{surface}")
    found = sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.ispkg)
    return (REFERENCE_LANGUAGE, *(lang for lang in found if lang != REFERENCE_LANGUAGE))


def load(surface: str, language: str) -> ModuleType:
    """A surface's texts in `language`; LookupError if there is no such translation."""
    if surface not in SURFACES or language not in languages(surface):
        raise LookupError(f"no {surface} texts in {language!r}")
    return importlib.import_module(f"{__name__}.{surface}.{language}")
