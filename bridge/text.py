"""Text normalisation shared by keyword matching (opt-in/opt-out words)."""

import unicodedata


def fold(text: str) -> str:
    """Case- and accent-insensitive form: 'Sí ' -> 'si'."""
    decomposed = unicodedata.normalize("NFKD", text.strip().casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def fold_words(text: str) -> str:
    """`fold`, with runs of whitespace made one space: 'Baja   Avisos' -> 'baja avisos'."""
    return " ".join(fold(text).split())
