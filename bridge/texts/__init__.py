"""Every text a person reads, one package per surface, one module per language.

- `whatsapp`: what a citizen receives on WhatsApp.
- `matrix`: what staff read in Matrix rooms (notices in portals, `!plantilla` answers).
- `management`: what admins read in the management room (English, like the admin API).
- `reporters`: what a citizen who reported a message hears back, in their language.
- `web`: the invite pages and their forms.

A surface's reference module (`es`; `en` for `management`) holds every text; a
translation is one more module next to it with the same names and the same
`{placeholders}` (tests/unit/test_texts.py checks that), and a surface package's
`default` names the language the bridge speaks there. Texts the agency configures
(`consent.notice_text`, templates) stay in config.
This package imports nothing but the standard library, so the pure core can use it.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from types import ModuleType

SURFACES = ("whatsapp", "matrix", "management", "reporters", "web")
REFERENCE_LANGUAGE = "es"
# The management room has always spoken English.
_REFERENCES = {"management": "en"}
_LANGUAGE_CODE = re.compile(r"[a-z]{2,3}(_[a-z0-9]+)?")  # a module name, never a path


def reference(surface: str) -> str:
    """The language whose module holds every text of `surface`."""
    return _REFERENCES.get(surface, REFERENCE_LANGUAGE)


def languages(surface: str) -> tuple[str, ...]:
    """The languages a surface has a module for, the reference one first."""
    package = importlib.import_module(f"{__name__}.{surface}")
    found = sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.ispkg)
    first = reference(surface)
    return (first, *(lang for lang in found if lang != first))


def load(surface: str, language: str) -> ModuleType:
    """A surface's texts in `language`; LookupError if there is no such translation.
    Cheap after the first call (the import system keeps the module)."""
    if surface not in SURFACES or not _LANGUAGE_CODE.fullmatch(language):
        raise LookupError(f"no {surface} texts in {language!r}")
    try:
        return importlib.import_module(f"{__name__}.{surface}.{language}")
    except ModuleNotFoundError:
        raise LookupError(f"no {surface} texts in {language!r}") from None
