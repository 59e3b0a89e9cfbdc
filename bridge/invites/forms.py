"""The sign-up form, checked without any I/O: what came in, and what is wrong with it.

Untrusted input: every field may be missing, huge or odd Unicode. Errors are message
keys from `bridge.invites.texts`, so the page can show them in the visitor's language.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass

from bridge.invites.texts import DEFAULT_LANGUAGE, LANGUAGES
from bridge.privacy import contains_phone_or_email

PSEUDONYM_MIN = 2
PSEUDONYM_MAX = 40
PASSWORD_MAX = 200  # Synapse refuses more than 512 bytes; bcrypt reads 72


@dataclass(frozen=True)
class SignupForm:
    """The submitted fields, normalised (NFC, surrounding whitespace removed)."""

    pseudonym: str
    password: str
    password2: str
    consent: bool
    lang: str


@dataclass(frozen=True)
class FieldError:
    field: str  # the input's name, so the page can link the message to it
    key: str  # message key in bridge.invites.texts
    values: tuple[tuple[str, int], ...] = ()


def pick_language(requested: str | None, accept_language: str | None) -> str:
    """`?lang=` if it is one we have, else the best Accept-Language match, else Spanish."""
    if requested in LANGUAGES:
        return str(requested)
    best, best_q = DEFAULT_LANGUAGE, -1.0
    for part in (accept_language or "").split(",")[:20]:
        tag, _, params = part.strip().partition(";")
        primary = tag.strip().lower().split("-")[0]
        q = 1.0
        params = params.strip()
        if params.startswith("q="):
            try:
                q = float(params[2:])
            except ValueError:
                q = 0.0
        if primary in LANGUAGES and q > best_q:
            best, best_q = primary, q
    return best


def parse_form(fields: Mapping[str, str], lang: str) -> SignupForm:
    def get(name: str, limit: int = 1000) -> str:
        return unicodedata.normalize("NFC", str(fields.get(name, ""))[:limit]).strip()

    return SignupForm(
        pseudonym=" ".join(get("pseudonym").split()),
        # Passwords are taken as typed (no strip): spaces may be part of them.
        password=str(fields.get("password", ""))[:1000],
        password2=str(fields.get("password2", ""))[:1000],
        consent=fields.get("consent") == "yes",
        lang=lang,
    )


def _contact_like(name: str) -> bool:
    # NFKC folds look-alikes (fullwidth at signs and digits) into what the detectors know;
    # any @ is refused outright: an address without a dot is still an address.
    folded = unicodedata.normalize("NFKC", name)
    return "@" in folded or contains_phone_or_email(folded)


def _pseudonym_ok(name: str) -> bool:
    for ch in name:
        cat = unicodedata.category(ch)
        # Letters, marks, digits, spaces and ordinary punctuation; no control,
        # format (bidi overrides, zero-width), symbols or private-use characters.
        if not (cat[0] in "LMN" or cat in ("Zs", "Pd", "Po", "Ps", "Pe", "Pc")):
            return False
    return True


def validate(form: SignupForm, min_password: int) -> list[FieldError]:
    """Everything wrong with `form`; an empty pseudonym is fine (one is generated)."""
    errors: list[FieldError] = []
    name = form.pseudonym
    if name:
        if not PSEUDONYM_MIN <= len(name) <= PSEUDONYM_MAX:
            errors.append(FieldError("pseudonym", "err_pseudonym_length",
                                     (("min", PSEUDONYM_MIN), ("max", PSEUDONYM_MAX))))
        elif _contact_like(name):
            errors.append(FieldError("pseudonym", "err_pseudonym_contact"))
        elif not _pseudonym_ok(name):
            errors.append(FieldError("pseudonym", "err_pseudonym_chars"))
    if len(form.password) < min_password:
        errors.append(FieldError("password", "err_password_short", (("min", min_password),)))
    elif len(form.password) > PASSWORD_MAX:
        errors.append(FieldError("password", "err_password_long", (("max", PASSWORD_MAX),)))
    elif form.password != form.password2:
        errors.append(FieldError("password2", "err_password_mismatch"))
    if not form.consent:
        errors.append(FieldError("consent", "err_consent"))
    return errors
