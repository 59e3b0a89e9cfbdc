"""What the invite page says: the texts live in `bridge.texts.web` (one module per
language); this module fills them in.

`notice(lang, ...)` is the exact privacy notice shown; its SHA-256 goes into the consent
record with `invites.notice_version`.
"""

from __future__ import annotations

import hashlib

from bridge import texts

LANGUAGES = texts.languages("web")
DEFAULT_LANGUAGE = texts.REFERENCE_LANGUAGE


def text(lang: str, key: str, **values: object) -> str:
    """A UI string; `values` fill `{placeholders}` (no format spec or attribute access)."""
    template: str = getattr(texts.load("web", lang), key.upper())
    out = template
    for name, value in values.items():
        out = out.replace("{" + name + "}", str(value))
    # "{agency} le invita": a name like "la entidad" still starts the sentence upper-case.
    return _sentence(out) if template.startswith("{") else out


def _sentence(value: str) -> str:
    return value[:1].upper() + value[1:]


def notice(lang: str, agency: str, room: str) -> tuple[str, ...]:
    """The privacy notice paragraphs as shown."""
    paragraphs: tuple[str, ...] = texts.load("web", lang).NOTICE
    return tuple(_sentence(p.replace("{agency}", agency).replace("{room}", room))
                 for p in paragraphs)


def notice_hash(paragraphs: tuple[str, ...]) -> str:
    return hashlib.sha256("\n\n".join(paragraphs).encode("utf-8")).hexdigest()
