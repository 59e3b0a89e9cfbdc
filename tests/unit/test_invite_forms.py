"""The invite page's sans-I/O parts: language choice, form checks, HTML escaping."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge import texts
from bridge.invites.accounts import registration_mac
from bridge.invites.forms import SignupForm, parse_form, pick_language, validate
from bridge.invites.page import done_page, form_page, problem_page
from bridge.invites.texts import LANGUAGES, notice, notice_hash, text

GOOD = {"pseudonym": "Vecina", "password": "una clave larga", "password2": "una clave larga",
        "consent": "yes"}


@pytest.mark.parametrize(("query", "header", "expected"), [
    (None, None, "es"),
    ("en", "es-ES", "en"),
    ("fr", "en-GB,en;q=0.9", "en"),
    (None, "de-DE,de;q=0.9,en;q=0.5,es;q=0.7", "es"),
    (None, "ca-ES,ca;q=0.9", "es"),
    (None, "en;q=abc", "en"),
    (None, "EN-us", "en"),
])
def test_language(query: str | None, header: str | None, expected: str) -> None:
    assert pick_language(query, header) == expected


def _errors(**changes: str) -> list[str]:
    form = parse_form({**GOOD, **changes}, "es")
    return [e.key for e in validate(form, 10)]


def test_a_good_form_passes_and_is_normalised() -> None:
    assert _errors() == []
    form = parse_form({**GOOD, "pseudonym": "  Vecina \t del   barrio "}, "es")
    assert form.pseudonym == "Vecina del barrio"
    assert _errors(pseudonym="") == []  # a pseudonym is generated


@pytest.mark.parametrize("name", [
    "ana@example.org", "ana@correo", "Ana \uff20 gmail", "612345678", "+34 612 34 56 78",
    "Pepe 6 1 2 3 4 5 6 7 8", "llámame al 0034612345678",
    "Ana \uff16\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18",
])
def test_pseudonyms_with_contact_data_are_refused(name: str) -> None:
    assert _errors(pseudonym=name) == ["err_pseudonym_contact"]


@pytest.mark.parametrize(("changes", "keys"), [
    ({"pseudonym": "A"}, ["err_pseudonym_length"]),
    ({"pseudonym": "x" * 41}, ["err_pseudonym_length"]),
    ({"pseudonym": "ana\u202eevil"}, ["err_pseudonym_chars"]),
    ({"pseudonym": "zero\u200bwidth"}, ["err_pseudonym_chars"]),
    ({"pseudonym": "<b>hola</b>"}, ["err_pseudonym_chars"]),
    ({"password": "corta", "password2": "corta"}, ["err_password_short"]),
    ({"password": "x" * 201, "password2": "x" * 201}, ["err_password_long"]),
    ({"password2": "otra cosa larga"}, ["err_password_mismatch"]),
    ({"consent": ""}, ["err_consent"]),
    ({"consent": "on"}, ["err_consent"]),
    ({"password": "", "password2": "", "consent": ""}, ["err_password_short", "err_consent"]),
])
def test_what_is_wrong_is_named(changes: dict[str, str], keys: list[str]) -> None:
    assert _errors(**changes) == keys


def test_accented_and_hyphenated_names_are_fine() -> None:
    assert _errors(pseudonym="María-José (Ruzafa)") == []
    assert _errors(pseudonym="Jordi_L. Vila") == []


@given(st.dictionaries(st.sampled_from(["pseudonym", "password", "password2", "consent",
                                        "lang", "other"]), st.text(max_size=2000)))
def test_any_input_is_checked_without_crashing(fields: dict[str, str]) -> None:
    form = parse_form(fields, "en")
    errors = validate(form, 10)
    for err in errors:
        assert hasattr(texts.load("web", "en"), err.key.upper())
        assert hasattr(texts.load("web", "es"), err.key.upper())
    if not errors and form.pseudonym:
        assert 2 <= len(form.pseudonym) <= 40 and "@" not in form.pseudonym


def test_the_page_offers_every_web_translation() -> None:
    assert LANGUAGES == ("es", "en")  # tests/unit/test_texts.py checks they match


def test_notice_is_filled_in_and_hashed_per_language() -> None:
    es = notice("es", "el Ayuntamiento", "Vecinos")
    assert es[0].startswith("El Ayuntamiento creará")
    assert "«Vecinos»" in es[2]
    assert notice_hash(es) != notice_hash(notice("en", "el Ayuntamiento", "Vecinos"))
    assert notice_hash(es) == notice_hash(notice("es", "el Ayuntamiento", "Vecinos"))
    assert text("es", "intro", agency="la entidad", room="X").startswith("La entidad")


def test_everything_shown_is_escaped() -> None:
    evil = '<script>alert(1)</script>"\''
    page = form_page(lang="es", agency=evil, room=evil, action="/invite/tok", pseudonym=evil,
                     consent=False, min_password=10)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert 'value="&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#x27;"' in page
    assert "checked" not in page  # the consent box starts unticked
    done = done_page(lang="en", agency=evil, room=evil, user_id="@v_x:localhost",
                     display_name=evil, homeserver_url="https://hs.example",
                     web_client_url='https://app.example/?a=1&b="2"')
    assert "<script>" not in done
    assert 'href="https://app.example/?a=1&amp;b=&quot;2&quot;"' in done
    assert "<script>" not in problem_page(lang="es", agency=evil, problem="used")


def test_page_structure_is_accessible() -> None:
    form = SignupForm("", "corta", "corta", False, "en")
    page = form_page(lang="en", agency="A", room="R", action="/invite/t", pseudonym="",
                     consent=False, min_password=10, errors=validate(form, 10))
    assert page.startswith("<!doctype html>\n<html lang=\"en\">")
    assert 'role="alert"' in page and 'href="#password"' in page and 'href="#consent"' in page
    assert 'id="password" name="password" type="password"' in page
    assert 'aria-describedby="password-hint password-error" aria-invalid="true"' in page
    for field in ("pseudonym", "password", "password2", "consent"):
        assert f'<label for="{field}">' in page
    assert 'hreflang="es"' in page  # the language switch


def test_registration_mac_is_synapse_s() -> None:
    secret, nonce, user, password = "s3cret-s3cret-s3cret", "n0nce", "v_abc", "pässword"
    expected = hmac.new(secret.encode(), b"n0nce\x00v_abc\x00p\xc3\xa4ssword\x00notadmin",
                        hashlib.sha1).hexdigest()
    assert registration_mac(secret, nonce, user, password) == expected
