"""Moderation decisions without I/O: display-name rules, flag terms, report keywords and
the one-step actions on a report. Every comparison ignores case and accents."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from typing import Literal

from bridge.privacy import contains_phone_or_email
from bridge.text import fold_words

NameProblem = Literal["phone", "email", "reserved"]
Action = Literal["redact", "mute", "kick", "ban", "dismiss"]
ACTIONS: tuple[Action, ...] = ("redact", "mute", "kick", "ban", "dismiss")
# Spanish words for the actions (the management room and the CLI take either).
ACTION_WORDS: dict[str, Action] = {
    **{a: a for a in ACTIONS},
    "borrar": "redact", "silenciar": "mute", "expulsar": "kick", "vetar": "ban",
    "descartar": "dismiss",
}
# A WhatsApp citizen reports a message by replying to it with one of these words,
# optionally followed by the reason; the word sets the language of the answers.
REPORT_WORDS = {"denunciar": "es", "denuncia": "es", "report": "en"}


def _words_pattern(term: str) -> re.Pattern[str] | None:
    folded = fold_words(term)
    if not folded:
        return None
    # Whole words only: "puta" must not flag "disputa", "admin" not "administrativo".
    return re.compile(rf"(?<!\w){re.escape(folded)}(?!\w)")


def name_problems(name: str, reserved: Iterable[str]) -> list[NameProblem]:
    """What is wrong with a citizen's display name; empty if it may stay."""
    problems: list[NameProblem] = []
    # NFKC folds look-alikes (fullwidth digits and at signs) into what the detectors know.
    normal = unicodedata.normalize("NFKC", name)
    if "@" in normal:
        problems.append("email")
    elif contains_phone_or_email(normal):
        problems.append("phone")
    folded = fold_words(normal)
    for word in reserved:
        pattern = _words_pattern(word)
        if pattern is not None and pattern.search(folded):
            problems.append("reserved")
            break
    return problems


def showable_name(name: str) -> bool:
    """Whether a refused name may be quoted to moderators: never one with a digit or an
    at sign (it may be someone's number or address)."""
    normal = unicodedata.normalize("NFKC", name)
    return not any(ch.isdigit() for ch in normal) and "@" not in normal


def flagged_term(text: str, terms: Iterable[str]) -> str | None:
    """The first of `terms` that `text` contains as whole words, as configured."""
    folded = fold_words(text)
    for term in terms:
        pattern = _words_pattern(term)
        if pattern is not None and pattern.search(folded):
            return term
    return None


def report_request(text: str) -> tuple[str, str | None] | None:
    """(language, reason or None) if `text` asks to report the quoted message."""
    first, _, rest = text.strip().partition(" ")
    language = REPORT_WORDS.get(fold_words(first).rstrip(".!:,"))
    if language is None:
        return None
    reason = " ".join(rest.split())
    return language, reason or None


def action_of(word: str) -> Action | None:
    """The action named by `word` (English or Spanish), else None."""
    return ACTION_WORDS.get(fold_words(word))
