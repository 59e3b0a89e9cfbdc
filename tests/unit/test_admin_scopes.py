"""Least privilege for the admin API: named tokens and their config, every route's scope,
who the audit log names, the re-identification rate limit and phone normalisation."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest

from bridge.admin.auth import Principal, authenticate, scope_of
from bridge.admin.reidentify import RevealLimiter, check_reason, normalise_phone
from bridge.app import make_admin_app, make_app
from bridge.config import ADMIN_SCOPES, parse_config
from bridge.errors import ConfigError, InvalidParam, Unauthorized
from tests.unit.test_config import problems, valid


def _token() -> str:
    return secrets.token_urlsafe(32)


def with_tokens(*tokens: dict[str, Any]) -> dict[str, Any]:
    raw = valid()
    raw["admin"]["tokens"] = list(tokens)
    return raw


# --- config ---------------------------------------------------------------------------


def test_named_tokens_load_with_their_scopes() -> None:
    notifier, auditor = _token(), _token()
    config = parse_config(with_tokens(
        {"name": "notifier", "token": notifier, "scopes": ["notices"]},
        {"name": "ens-auditor", "token": auditor, "scopes": ["audit.read"]}))
    assert [(t.name, t.token, t.scopes) for t in config.admin.tokens] == [
        ("notifier", notifier, ["notices"]), ("ens-auditor", auditor, ["audit.read"])]
    assert config.admin.reveal_per_hour == 10
    assert parse_config(valid()).admin.tokens == []  # optional: the legacy token alone


def test_token_file_is_read_like_other_secret_files(tmp_path: Path) -> None:
    token = _token()
    (tmp_path / "notifier.token").write_text(token + "\n", encoding="utf-8")
    config = parse_config(with_tokens(
        {"name": "notifier", "token_file": "notifier.token", "scopes": ["notices"]}), tmp_path)
    assert config.admin.tokens[0].token == token
    lines = problems(with_tokens({"name": "notifier", "token_file": "missing.token",
                                  "scopes": ["notices"]}), tmp_path)
    assert lines == [f"admin.tokens[0].token_file: cannot read {tmp_path / 'missing.token'}: "
                     "No such file or directory"]


@pytest.mark.parametrize(("tokens", "expected"), [
    ([{"name": "a", "token": "short" * 6, "scopes": ["rooms"]}],
     "admin.tokens[0].token: String should have at least 32 characters"),
    ([{"name": "a", "token": "x" * 40, "scopes": ["rooms"]},
      {"name": "a", "token": "y" * 40, "scopes": ["notices"]}],
     "admin.tokens: token names must be unique"),
    ([{"name": "a", "token": "x" * 40, "scopes": ["rooms"]},
      {"name": "b", "token": "x" * 40, "scopes": ["notices"]}],
     "admin.tokens: two tokens are the same"),
    ([{"name": "admin", "token": "x" * 40, "scopes": ["rooms"]}],
     "admin.tokens: the name 'admin' is the legacy admin.token's"),
    ([{"name": "a", "token": "x" * 40, "scopes": ["everything"]}],
     "admin.tokens[0].scopes[0]: Input should be 'rooms', 'moderation'"),
    ([{"name": "a", "token": "x" * 40, "scopes": []}],
     "admin.tokens[0].scopes: List should have at least 1 item"),
    ([{"name": "Bad Name", "token": "x" * 40, "scopes": ["rooms"]}],
     "admin.tokens[0].name: String should match pattern"),
])
def test_bad_tokens_are_reported(tokens: list[dict[str, Any]], expected: str) -> None:
    lines = problems(with_tokens(*tokens))
    assert len(lines) == 1 and lines[0].startswith(expected), lines
    assert "x" * 40 not in lines[0]  # a token is never echoed


def test_a_named_token_cannot_be_the_legacy_token() -> None:
    raw = valid()
    raw["admin"]["tokens"] = [{"name": "a", "token": raw["admin"]["token"] + "x" * 32,
                               "scopes": ["rooms"]}]
    parse_config(raw)
    raw["admin"]["token"] = raw["admin"]["tokens"][0]["token"]
    assert problems(raw) == ["admin.tokens: a named token equals admin.token; give it its own"]


# --- authentication -------------------------------------------------------------------


def test_authenticate_names_the_token_and_its_scopes() -> None:
    notifier = _token()
    config = parse_config(with_tokens(
        {"name": "notifier", "token": notifier, "scopes": ["notices"]})).admin
    assert authenticate(config, notifier) == Principal("notifier", frozenset({"notices"}))
    legacy = authenticate(config, config.token)
    assert (legacy.name, legacy.scopes) == ("admin", frozenset(ADMIN_SCOPES))
    for wrong in (None, "", notifier[:-1], notifier + "x", config.token.upper()):
        with pytest.raises(Unauthorized):
            authenticate(config, wrong)


def test_actor_is_the_token_name_and_who_says_they_act() -> None:
    assert Principal("notifier", frozenset()).actor == "api:notifier"
    assert (Principal("cli", frozenset(), "@ana:agency.example").actor
            == "api:cli as @ana:agency.example")


def test_every_admin_route_declares_a_known_scope() -> None:
    """A route another branch adds without `@requires(...)` fails here (and is refused
    to every token at run time)."""
    app = make_admin_app(make_app(parse_config(valid())))
    admin = [r for r in app.router.routes()
             if r.resource is not None and r.resource.canonical.startswith("/admin/")]
    assert len(admin) >= 25  # the walk really saw the admin routes
    missing = [f"{r.method} {r.resource.canonical}" for r in admin  # type: ignore[union-attr]
               if scope_of(r.handler) not in ADMIN_SCOPES]
    assert missing == []
    assert {scope_of(r.handler) for r in admin} == set(ADMIN_SCOPES)  # each scope is used


# --- re-identification ----------------------------------------------------------------


def test_reveal_limit_is_per_token_and_slides() -> None:
    now = [1000.0]
    limiter = RevealLimiter(3, clock=lambda: now[0])
    assert [limiter.take("dpo") for _ in range(4)] == [True, True, True, False]
    assert limiter.take("other")  # another token has its own budget
    now[0] += 3599
    assert not limiter.take("dpo")
    now[0] += 2  # an hour after the first three
    assert [limiter.take("dpo") for _ in range(4)] == [True, True, True, False]


@pytest.mark.parametrize("written", [
    "+34 600 11 22 33", "600 11 22 33", "600112233", "0034 600-11-22-33", "+34600112233",
    "(+34) 600.11.22.33",
])
def test_phone_numbers_normalise_to_wa_id(written: str) -> None:
    assert normalise_phone(written) == "34600112233"


def test_foreign_numbers_keep_their_country() -> None:
    assert normalise_phone("+44 7911 123456") == "447911123456"


@pytest.mark.parametrize("bad", [None, "", "   ", "no tengo", "12", 600112233])
def test_bad_phone_is_refused_without_echoing_it(bad: object) -> None:
    with pytest.raises(InvalidParam) as err:
        normalise_phone(bad)
    assert str(bad) not in err.value.message or str(bad) in ("", "None")


def test_reason_is_required_and_meaningful() -> None:
    for bad in (None, "", "porque", " " * 20, 12345678901):
        with pytest.raises(InvalidParam):
            check_reason(bad)
    assert check_reason("  oficio juzgado 12/2026 ") == "oficio juzgado 12/2026"
    with pytest.raises(InvalidParam):
        check_reason("x" * 501)


def test_config_error_type_is_reexported() -> None:
    # problems() relies on it: a malformed tokens list is a ConfigError, not a crash.
    with pytest.raises(ConfigError):
        parse_config(with_tokens("not a mapping"))  # type: ignore[arg-type]


@pytest.mark.parametrize(("argv", "expected"), [
    (["citizen", "export", "--phone", "600 11 22 33", "--reason", "acceso 2026/1"],
     ("POST", "/admin/v1/citizens/export", {"phone": "600 11 22 33",
                                             "reason": "acceso 2026/1"})),
    (["citizen", "erase", "--phone", "+34600112233", "--reason", "supresión 2026/2"],
     ("POST", "/admin/v1/citizens/erase", {"phone": "+34600112233",
                                            "reason": "supresión 2026/2"})),
    (["citizen", "export", "ABCD-EFGH", "--reason", "acceso"],
     ("GET", "/admin/v1/citizens/ABCD-EFGH/export?reason=acceso", None)),
    (["citizen", "erase", "@v_abc:agency.example", "--reason", "supresión"],
     ("DELETE", "/admin/v1/citizens/%40v_abc%3Aagency.example", {"reason": "supresión"})),
])
def test_cli_citizen_export_and_erase_by_phone_keep_the_number_out_of_urls(
        argv: list[str], expected: tuple[str, str, object]) -> None:
    from bridge.admin.cli import request_for
    from bridge.cli import build_parser

    args = build_parser().parse_args(["admin", "-c", "config.yaml", *argv])
    assert request_for(args) == expected


@pytest.mark.parametrize("argv", [
    ["citizen", "export", "--reason", "acceso"],
    ["citizen", "erase", "@v_abc:agency.example", "--phone", "600112233", "--reason", "x"],
])
def test_cli_citizen_needs_one_way_to_name_the_person(argv: list[str]) -> None:
    from bridge.admin.cli import UsageError, request_for
    from bridge.cli import build_parser

    args = build_parser().parse_args(["admin", "-c", "config.yaml", *argv])
    with pytest.raises(UsageError, match="either a pseudonym or Matrix user id, or --phone"):
        request_for(args)
