"""Language-independent helpers the text modules share to fill their texts in."""

from __future__ import annotations

import re


def join_present(parts: list[str | None], sep: str = ", ") -> str:
    """The parts that are there, joined: `["a", None, "b"]` → `"a, b"`."""
    return sep.join(p for p in parts if p)


def field_label(key: str) -> str:
    """`nombre_tramite` → `Nombre tramite`: field ids read better as words."""
    words = re.sub(r"[_\-]+", " ", key).strip()
    return words[:1].upper() + words[1:] if words else key
