"""vCard 3.0 (RFC 2426) text for the contact cards a citizen shares, as a `.vcf` file.

Built by hand because the format is small and the escaping rules are the only subtle
part: values escape backslash, newline, comma and semicolon; lines end in CRLF and
are folded at 75 octets without splitting a UTF-8 sequence.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from bridge.whatsapp.rich_content import CardValue, ContactCard

MIME_TYPE = "text/vcard"
_TYPE_LABEL = re.compile(r"[^A-Za-z0-9-]")
_FOLD_AT = 75


def escape(value: str) -> str:
    """A vCard text value: `\\`, `,`, `;` and line breaks escaped."""
    value = value.replace("\\", "\\\\").replace(",", "\\,").replace(";", "\\;")
    return re.sub(r"\r\n|\r|\n", "\\\\n", value)


def fold(line: str) -> str:
    """Fold a content line at 75 octets (continuations start with one space)."""
    out: list[str] = []
    current, size = "", 0
    for char in line:
        width = len(char.encode())
        if size + width > _FOLD_AT:
            out.append(current)
            current, size = " ", 1
        current += char
        size += width
    out.append(current)
    return "\r\n".join(out)


def _typed(name: str, values: Iterable[CardValue]) -> list[str]:
    lines = []
    for item in values:
        label = _TYPE_LABEL.sub("", item.type or "")[:20]
        param = f";TYPE={label.upper()}" if label else ""
        lines.append(f"{name}{param}:{escape(item.value)}")
    return lines


def card_lines(card: ContactCard) -> list[str]:
    """The content lines of one card, unfolded."""
    lines = ["BEGIN:VCARD", "VERSION:3.0",
             f"FN:{escape(card.display_name or 'Contacto')}",
             "N:" + ";".join(escape(p or "") for p in (card.last_name, card.first_name,
                                                        None, None, None))]
    if card.company or card.department:
        lines.append("ORG:" + ";".join(escape(p) for p in (card.company or "",
                                                            card.department) if p is not None))
    if card.job_title:
        lines.append(f"TITLE:{escape(card.job_title)}")
    if card.birthday:
        lines.append(f"BDAY:{escape(card.birthday)}")
    lines += _typed("TEL", card.phones) + _typed("EMAIL", card.emails)
    lines += _typed("URL", card.urls)
    for a in card.addresses:
        label = _TYPE_LABEL.sub("", a.type or "")[:20]
        param = f";TYPE={label.upper()}" if label else ""
        parts = ("", "", a.street, a.city, a.state, a.zip, a.country)
        lines.append(f"ADR{param}:" + ";".join(escape(p or "") for p in parts))
    lines.append("END:VCARD")
    return lines


def to_vcf(cards: Iterable[ContactCard]) -> bytes:
    """One `.vcf` file holding every card, UTF-8, CRLF line endings."""
    text = "".join(fold(line) + "\r\n" for card in cards for line in card_lines(card))
    return text.encode()
