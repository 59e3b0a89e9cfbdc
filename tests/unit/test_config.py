"""Config loading: the example documents every key; every problem is one line with its key path."""

from __future__ import annotations

import base64
import copy
import os
import secrets
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from bridge.config import (
    DEFAULT_NOTICE,
    ENV_PREFIX,
    SECRET_KEYS,
    Config,
    load_config,
    parse_config,
)
from bridge.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.yaml"

# DESIGN.md's Contracts list, verbatim; `*` means "the section exists and has keys".
DESIGN_KEYS = [
    "homeserver.url", "homeserver.domain",
    "appservice.listen_host", "appservice.listen_port", "appservice.url",
    "appservice.as_token", "appservice.hs_token", "appservice.bot_localpart",
    "appservice.ghost_prefix",
    "database.url",
    "privacy.data_key", "privacy.index_key", "privacy.pseudonym_template",
    "whatsapp.enabled", "whatsapp.api_base", "whatsapp.phone_number_id",
    "whatsapp.access_token", "whatsapp.app_secret", "whatsapp.verify_token",
    "consent.notice_text", "consent.notice_version", "consent.opt_in_words",
    "consent.opt_out_words", "consent.hold_hours",
    "portals.staff",
    "admin.token", "admin.users",
    "rooms.federate",
    "logging.*", "metrics.*",
]
# Optional keys the example shows commented out (their default is computed).
COMMENTED = {"appservice.url"}

WA_MISSING = [
    "whatsapp.access_token: missing; set it or whatsapp.access_token_file "
    "or $CIVIC_BRIDGE_WHATSAPP_ACCESS_TOKEN",
    "whatsapp.app_secret: missing; set it or whatsapp.app_secret_file "
    "or $CIVIC_BRIDGE_WHATSAPP_APP_SECRET",
    "whatsapp.verify_token: missing; set it or whatsapp.verify_token_file "
    "or $CIVIC_BRIDGE_WHATSAPP_VERIFY_TOKEN",
    "whatsapp.phone_number_id: missing; required when whatsapp.enabled is true",
]


@pytest.fixture(autouse=True)
def _no_secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's own CIVIC_BRIDGE_* variables must not change what these tests see.
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def _key(size: int = 32) -> str:
    return base64.b64encode(secrets.token_bytes(size)).decode()


def valid() -> dict[str, Any]:
    """A minimal valid config with fresh secrets."""
    return {
        "homeserver": {"url": "https://matrix.agency.example", "domain": "agency.example"},
        "appservice": {"as_token": secrets.token_urlsafe(32),
                       "hs_token": secrets.token_urlsafe(32)},
        "privacy": {"data_key": _key(), "index_key": _key()},
        "audit": {"key": _key()},
        "admin": {"token": secrets.token_urlsafe(32)},
    }


def problems(raw: Any, base: Path = Path(".")) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(raw, base)
    lines = err.value.problems
    assert lines, "a ConfigError must carry at least one problem"
    for line in lines:
        assert "\n" not in line, f"one line per problem, got {line!r}"
    assert str(err.value) == "\n".join(lines)
    return lines


def _example_raw() -> dict[str, Any]:
    raw = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    assert isinstance(raw, dict)
    return raw


def _get(raw: dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"{dotted} missing from the example"
        node = node[part]
    return node


def _section_text(section: str) -> str:
    """The example's lines for one top-level section, comments included."""
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    start = lines.index(f"{section}:")
    body = []
    for line in lines[start + 1:]:
        if line and not line.startswith((" ", "#")):
            break
        body.append(line)
    return "\n".join(body)


def _leaf_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted path, FieldInfo) of every non-model field, recursively."""
    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(_leaf_fields(ann, f"{path}."))
        else:
            out.append((path, field))
    return out


# --- the example ------------------------------------------------------------------------


def test_example_documents_every_design_key() -> None:
    raw = _example_raw()
    for key in DESIGN_KEYS:
        section, name = key.split(".")
        if name == "*":
            assert isinstance(raw.get(section), dict) and raw[section], f"{section} empty"
        elif key in COMMENTED:
            assert name not in raw[section]
            assert f"# {name}: " in _section_text(section), f"{key} not documented"
        else:
            _get(raw, key)


def test_example_has_every_model_field() -> None:
    raw = _example_raw()
    fields = _leaf_fields(Config)
    assert len(fields) > 30  # the walk really descended into the sections
    for path, _ in fields:
        if path in COMMENTED:
            section, name = path.split(".")
            assert f"# {name}: " in _section_text(section), f"{path} not documented"
        else:
            _get(raw, path)


def test_example_values_are_the_model_defaults() -> None:
    # "every key, with its default": the example must not drift from the code.
    raw = _example_raw()
    checked = 0
    for path, field in _leaf_fields(Config):
        if path in COMMENTED or field.is_required():
            continue
        value = _get(raw, path)
        if path.split(".")[1] in {key for _, key in SECRET_KEYS}:
            assert value == "", f"{path}: an optional secret must be empty in the example"
            continue
        assert value == field.get_default(call_default_factory=True), path
        checked += 1
    assert checked > 20
    assert _get(raw, "consent.notice_text") == DEFAULT_NOTICE


def test_example_as_is_is_rejected_naming_every_placeholder() -> None:
    raw = _example_raw()
    placeholders = sorted(
        f"{section}.{key}" for section, keys in raw.items() if isinstance(keys, dict)
        for key, value in keys.items() if isinstance(value, str) and "CHANGE_ME" in value
    )
    assert placeholders == ["admin.token", "appservice.as_token", "appservice.hs_token",
                            "audit.key", "privacy.data_key", "privacy.index_key"]
    with pytest.raises(ConfigError) as err:
        load_config(EXAMPLE)
    lines = err.value.problems
    # Only the placeholders are wrong in the example, each reported exactly once.
    assert sorted(line.split(":", 1)[0] for line in lines) == placeholders
    for line in lines:
        assert "placeholder" in line and "civic-bridge init" in line
        assert "CHANGE_ME" not in line


def test_example_with_real_secrets_is_valid(tmp_path: Path) -> None:
    raw = _example_raw()
    raw["appservice"].update(as_token=secrets.token_urlsafe(32),
                             hs_token=secrets.token_urlsafe(32))
    raw["privacy"].update(data_key=_key(), index_key=_key())
    raw["audit"]["key"] = _key()
    raw["admin"]["token"] = secrets.token_urlsafe(32)
    config = parse_config(raw, tmp_path)
    assert config.consent.opt_in_words == ["ACEPTO", "SI", "SÍ", "YES"]
    assert config.whatsapp.enabled is False
    assert config.appservice.public_url == "http://127.0.0.1:29340"


# --- one line per problem, with the key path ---------------------------------------------


@pytest.mark.parametrize(("path", "value", "expected"), [
    ("appservice.listen_port", "abc", "appservice.listen_port: Input should be a valid integer"),
    ("appservice.listen_port", 70000, "appservice.listen_port: Input should be less than"),
    ("appservice.listen_port", 0, "appservice.listen_port: Input should be greater than"),
    ("homeserver.url", "ftp://matrix.agency.example", "homeserver.url: must be an http(s) URL"),
    ("appservice.url", "matrix.agency.example", "appservice.url: must be an http(s) URL"),
    ("whatsapp.api_base", "graph.facebook.com", "whatsapp.api_base: must be an http(s) URL"),
    ("privacy.data_key", "not base64 at all!", "privacy.data_key: must be base64 of 32"),
    ("privacy.index_key", _key(16), "privacy.index_key: must decode to 32 bytes, got 16"),
    ("database.url", "mysql://db/bridge", "database.url: must start with sqlite+aiosqlite://"),
    ("database.url", "postgresql+asyncpg://u:p@h:port/db",
     "database.url: is not a valid SQLAlchemy URL"),
    ("homeserver.urll", "https://typo.example", "homeserver.urll: unknown key"),
    ("logging.level", "LOUD", "logging.level: Input should be 'DEBUG'"),
    ("consent.hold_hours", 0, "consent.hold_hours: Input should be greater than"),
    ("privacy.pseudonym_template", "Citizen", "privacy.pseudonym_template: must contain {code}"),
    ("portals.staff", ["alice"], "portals.staff[0]: String should match pattern"),
    ("rooms.federate", "perhaps", "rooms.federate: Input should be a valid boolean"),
    ("appservice.as_token", 12345678901234567890, "appservice.as_token: Input should be"),
    ("consent.notice_language", "Spanish", "consent.notice_language: String should match"),
    ("retention.outbox_days", 0, "retention.outbox_days: Input should be greater than"),
    ("retention.message_map_days", 3651, "retention.message_map_days: Input should be less"),
    ("retention.never_consented_days", "soon",
     "retention.never_consented_days: Input should be a valid integer"),
    ("retention.invite_links_days", -1, "retention.invite_links_days: Input should be greater"),
    ("retention.unused_invite_accounts_days", 0,
     "retention.unused_invite_accounts_days: Input should be greater"),
    ("retention.dead_letters_days", 1.5, "retention.dead_letters_days: Input should be a valid"),
    ("retention.forever_days", 5, "retention.forever_days: unknown key"),
    ("appservice.listen_host", "http://0.0.0.0", "appservice.listen_host: must be an IP"),
    ("admin.listen_host", "127.0.0.1:29341", "admin.listen_host: must be an IP address"),
    ("admin.listen_host", "", "admin.listen_host: must be an IP address"),
    ("metrics.listen_host", "a host", "metrics.listen_host: must be an IP address"),
    ("admin.listen_port", 70000, "admin.listen_port: Input should be less than"),
    ("metrics.listen_port", 0, "metrics.listen_port: Input should be greater than"),
])
def test_one_bad_value_gives_one_line_with_its_path(path: str, value: Any,
                                                    expected: str) -> None:
    raw = valid()
    section, key = path.split(".")
    raw.setdefault(section, {})[key] = value
    [line] = problems(raw)
    assert line.startswith(expected), line


# --- listeners -----------------------------------------------------------------------------


def test_admin_and_metrics_listen_on_loopback_by_default() -> None:
    config = parse_config(valid())
    assert config.listeners() == [("public", "127.0.0.1", 29340),
                                  ("admin", "127.0.0.1", 29341),
                                  ("metrics", "127.0.0.1", 29342)]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "::1", "localhost", "bridge",
                                  "civic-bridge.civic-bridge.svc.cluster.local"])
def test_listen_hosts_may_be_addresses_or_names(host: str) -> None:
    raw = valid()
    raw["admin"]["listen_host"] = host
    raw["metrics"] = {"listen_host": host}
    raw["appservice"]["listen_host"] = host
    assert parse_config(raw).admin.listen_host == host


@pytest.mark.parametrize(("ports", "expected"), [
    ({"admin": 29340}, "admin.listen_port: 29340 is appservice.listen_port already"),
    ({"metrics": 29340}, "metrics.listen_port: 29340 is appservice.listen_port already"),
    ({"admin": 9000, "metrics": 9000}, "metrics.listen_port: 9000 is admin.listen_port"),
])
def test_each_listener_needs_its_own_port(ports: dict[str, int], expected: str) -> None:
    raw = valid()
    for section, port in ports.items():
        raw.setdefault(section, {})["listen_port"] = port
    [line] = problems(raw)
    assert line.startswith(expected), line


def test_disabled_metrics_bind_nothing_and_clash_with_nothing() -> None:
    raw = valid()
    raw["metrics"] = {"enabled": False, "listen_port": 29340}
    config = parse_config(raw)
    assert [name for name, _, _ in config.listeners()] == ["public", "admin"]


def test_the_admin_cli_calls_the_admin_listener(monkeypatch: pytest.MonkeyPatch) -> None:
    from bridge.admin.cli import URL_ENV, base_url

    raw = valid()
    raw["admin"]["listen_port"] = 9441
    assert base_url(parse_config(raw), None) == "http://127.0.0.1:9441"
    raw["admin"]["listen_host"] = "0.0.0.0"  # bound everywhere: reached on loopback
    assert base_url(parse_config(raw), None) == "http://127.0.0.1:9441"
    raw["admin"]["listen_host"] = "::1"
    assert base_url(parse_config(raw), None) == "http://[::1]:9441"
    monkeypatch.setenv(URL_ENV, "http://admin.internal:80/")
    assert base_url(parse_config(raw), None) == "http://admin.internal:80"
    assert base_url(parse_config(raw), "http://x:1") == "http://x:1"


def test_every_problem_is_reported_at_once() -> None:
    raw = valid()
    raw["appservice"]["listen_port"] = "abc"
    raw["homeserver"]["url"] = "ftp://x"
    raw["privacy"]["data_key"] = _key(16)
    raw["rooms"] = {"federat": True}
    del raw["admin"]
    lines = problems(raw)
    assert [line.split(":", 1)[0] for line in lines] == [
        "admin.token", "homeserver.url", "appservice.listen_port", "privacy.data_key",
        "rooms.federat",
    ]


def test_a_misspelt_key_names_both_the_typo_and_the_missing_key() -> None:
    raw = valid()
    raw["homeserver"]["urll"] = raw["homeserver"].pop("url")
    assert sorted(problems(raw)) == [
        "homeserver.url: missing; add it (see config.example.yaml)",
        "homeserver.urll: unknown key; remove it or check its spelling",
    ]


def test_unknown_section_is_reported() -> None:
    raw = valid()
    raw["matrix"] = {"url": "x"}
    assert problems(raw) == ["matrix: unknown key; remove it or check its spelling"]


@pytest.mark.parametrize("section", ["homeserver", "appservice", "privacy", "admin"])
def test_missing_required_section(section: str) -> None:
    raw = valid()
    del raw[section]
    lines = problems(raw)
    if section == "homeserver":
        assert lines == ["homeserver: missing; add it (see config.example.yaml)"]
    else:  # the section's secrets are what is missing; each names where it may come from
        secret_keys = [key for sect, key in SECRET_KEYS if sect == section]
        assert lines == [
            f"{section}.{key}: missing; set it or {section}.{key}_file or "
            f"${ENV_PREFIX}{section.upper()}_{key.upper()}" for key in secret_keys
        ]


def test_empty_section_counts_as_empty_mapping() -> None:
    raw = valid()
    raw["logging"] = None  # `logging:` with every key commented out
    raw["homeserver"] = None
    assert sorted(problems(raw)) == [
        "homeserver.domain: missing; add it (see config.example.yaml)",
        "homeserver.url: missing; add it (see config.example.yaml)",
    ]


@pytest.mark.parametrize("raw", [None, [], "homeserver: x", 42])
def test_top_level_must_be_a_mapping(raw: Any) -> None:
    assert problems(raw) == ["(top level): must be a mapping of sections"]


def test_keys_must_differ() -> None:
    raw = valid()
    raw["privacy"]["index_key"] = raw["privacy"]["data_key"]
    [line] = problems(raw)
    assert line.startswith("privacy.index_key: must be a different key from data_key")


def test_retired_index_keys_are_checked_and_kept_apart_from_data_keys() -> None:
    raw = valid()
    raw["privacy"]["previous_index_keys"] = ["c2hvcnQ="]
    [line] = problems(raw)
    assert line.startswith("privacy.previous_index_keys: ") and "32 bytes" in line
    raw["privacy"]["previous_index_keys"] = [raw["privacy"]["data_key"]]
    [line] = problems(raw)
    assert line.startswith("privacy.previous_index_keys: a data key is listed as an index key")
    raw["privacy"]["previous_index_keys"] = []
    raw["privacy"]["previous_data_keys"] = [raw["privacy"]["index_key"]]
    [line] = problems(raw)
    assert line.startswith("privacy.previous_index_keys: a data key is listed")


# --- WhatsApp ----------------------------------------------------------------------------


def test_whatsapp_enabled_without_secrets_names_each_and_where_it_may_come_from() -> None:
    raw = valid()
    raw["whatsapp"] = {"enabled": True}
    assert problems(raw) == WA_MISSING


def test_whatsapp_enabled_with_the_examples_empty_strings_is_still_missing() -> None:
    # The example ships `app_secret: ""`; flipping `enabled` alone must not pass, or
    # webhooks would be "verified" with an empty HMAC key.
    raw = valid()
    raw["whatsapp"] = dict(_example_raw()["whatsapp"], enabled=True)
    assert problems(raw) == WA_MISSING


@pytest.mark.parametrize("enabled", [False, "false", "no", "off", 0])
def test_whatsapp_disabled_needs_no_secrets(enabled: Any) -> None:
    raw = valid()
    raw["whatsapp"] = {"enabled": enabled}
    assert parse_config(raw).whatsapp.enabled is False


def test_whatsapp_enabled_as_string_still_requires_secrets() -> None:
    raw = valid()
    raw["whatsapp"] = {"enabled": "yes"}
    assert problems(raw) == WA_MISSING


def test_whatsapp_complete() -> None:
    raw = valid()
    raw["whatsapp"] = {"enabled": True, "phone_number_id": "1234567890",
                       "access_token": "EAAG" + secrets.token_hex(20),
                       "app_secret": secrets.token_hex(16), "verify_token": "hub-verify-1"}
    config = parse_config(raw)
    assert config.whatsapp.enabled is True
    assert config.whatsapp.app_secret == raw["whatsapp"]["app_secret"]


def test_outbox_confirm_window_defaults_to_ten_minutes() -> None:
    assert parse_config(valid()).whatsapp.outbox_confirm_window_seconds == 600


@pytest.mark.parametrize("seconds", [60, "120", 86400])
def test_outbox_confirm_window_within_bounds(seconds: Any) -> None:
    raw = valid()
    raw["whatsapp"] = {"outbox_confirm_window_seconds": seconds}
    assert parse_config(raw).whatsapp.outbox_confirm_window_seconds == int(seconds)


@pytest.mark.parametrize(("seconds", "expected"), [
    (59, "must be at least 60: a window shorter than delivery statuses take to arrive "
         "would resend messages WhatsApp already accepted; raise it (default 600)"),
    (0, "must be at least 60"),
    (-600, "must be at least 60"),
    (86401, "must be at most 86400 (a day): a message cut short would wait that long "
            "before it is sent again; lower it (default 600)"),
    ("ten minutes", "Input should be a valid integer"),
    (600.5, "Input should be a valid integer"),
])
def test_outbox_confirm_window_out_of_bounds_names_the_key_and_the_fix(
        seconds: Any, expected: str) -> None:
    raw = valid()
    raw["whatsapp"] = {"outbox_confirm_window_seconds": seconds}
    [line] = problems(raw)
    assert line.startswith(f"whatsapp.outbox_confirm_window_seconds: {expected}"), line


async def test_outbox_confirm_window_reaches_the_outbox(tmp_path: Path,
                                                        sqlite_template: Path) -> None:
    from bridge.services import build_bridge
    from tests.fixtures.synapse import build_test_config

    shutil.copyfile(sqlite_template, tmp_path / "bridge.db")
    config = build_test_config("http://127.0.0.1:9", 9, tmp_path)
    config = config.model_copy(update={"whatsapp": config.whatsapp.model_copy(
        update={"outbox_confirm_window_seconds": 75})})
    bridge = await build_bridge(config)
    try:
        assert bridge.outbox.confirm_window == timedelta(seconds=75)
    finally:
        await bridge.close()


# --- secrets from files and the environment ----------------------------------------------


def test_file_secrets_are_read_relative_to_the_config_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf_dir = tmp_path / "etc"
    (conf_dir / "secrets").mkdir(parents=True)
    token, data_key = secrets.token_urlsafe(32), _key()
    (conf_dir / "secrets" / "admin_token").write_text(f"{token}\n", encoding="utf-8")
    (tmp_path / "data_key").write_text(data_key, encoding="utf-8")
    raw = valid()
    raw["admin"] = {"token_file": "secrets/admin_token"}
    raw["privacy"]["data_key_file"] = str(tmp_path / "data_key")  # absolute also works
    del raw["privacy"]["data_key"]
    (conf_dir / "config.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the CWD must not matter
    config = load_config(conf_dir / "config.yaml")
    assert config.admin.token == token  # the trailing newline is stripped
    assert config.privacy.data_key == data_key


def test_unreadable_secret_file_is_one_line_naming_the_key(tmp_path: Path) -> None:
    raw = valid()
    raw["admin"] = {"token_file": "no-such-file"}
    assert problems(raw, tmp_path) == [
        f"admin.token_file: cannot read {tmp_path / 'no-such-file'}: No such file or directory"
    ]


def test_binary_secret_file_is_reported_not_raised(tmp_path: Path) -> None:
    (tmp_path / "key.bin").write_bytes(b"\xff\xfe" + secrets.token_bytes(30))
    raw = valid()
    raw["privacy"] = {"data_key_file": "key.bin", "index_key": _key()}
    [line] = problems(raw, tmp_path)
    assert line.startswith("privacy.data_key_file: ") and "not UTF-8" in line


def test_secret_file_name_with_nul_is_reported_not_raised(tmp_path: Path) -> None:
    raw = valid()
    raw["admin"] = {"token_file": "a\x00b"}
    assert problems(raw, tmp_path) == ["admin.token_file: not a valid file name"]


def test_environment_supplies_and_overrides_secrets(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = secrets.token_urlsafe(32)
    monkeypatch.setenv("CIVIC_BRIDGE_ADMIN_TOKEN", token)
    raw = valid()
    del raw["admin"]
    assert parse_config(raw).admin.token == token  # supplies a missing secret
    raw["admin"] = {"token": secrets.token_urlsafe(32)}
    assert parse_config(raw).admin.token == token  # wins over the inline value
    (tmp_path / "tok").write_text(secrets.token_urlsafe(32), encoding="utf-8")
    raw["admin"] = {"token_file": "tok"}
    assert parse_config(raw, tmp_path).admin.token == token  # and over the file
    monkeypatch.setenv("CIVIC_BRIDGE_WHATSAPP_APP_SECRET", "s" * 32)
    raw["whatsapp"] = {"enabled": True}
    assert "whatsapp.app_secret" not in {p.split(":")[0] for p in problems(raw)}


def test_environment_placeholder_is_rejected_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIVIC_BRIDGE_ADMIN_TOKEN", "CHANGE_ME_admin_token")
    [line] = problems(valid())
    assert line.startswith("admin.token: still the placeholder")


@pytest.mark.parametrize("value", ["CHANGE_ME", "change-me-please", "<your token here>",
                                   "EXAMPLE_SECRET_0123456789"])
def test_placeholders_are_rejected(value: str) -> None:
    raw = valid()
    raw["appservice"]["hs_token"] = value
    [line] = problems(raw)
    assert line.startswith("appservice.hs_token: still the placeholder")


def test_angle_brackets_inside_text_are_not_a_placeholder() -> None:
    raw = valid()
    raw["consent"] = {"notice_text": "Hola. Más información: <https://sede.agency.example>"}
    assert parse_config(raw).consent.notice_text.endswith("example>")


# --- secrets are never echoed ------------------------------------------------------------


@pytest.mark.parametrize(("path", "secret"), [
    ("admin.token", "s3cr3tVal9"),  # too short: reported, not shown
    ("appservice.as_token", "k9XzQ2wLp0"),
    ("privacy.data_key", "Zm9vYmFyYmF6cXV4cXV1eA=="),  # base64, 16 bytes
    ("privacy.index_key", "sEcReT-not-base64-Q7"),
    ("database.url", "postgresql+asyncpg://bridge:hunter2pw@db:notaport/bridge"),
])
def test_errors_never_contain_the_secret(path: str, secret: str) -> None:
    raw = valid()
    section, key = path.split(".")
    raw.setdefault(section, {})[key] = secret
    lines = problems(raw)
    assert [line.split(":", 1)[0] for line in lines] == [path]
    text = "\n".join(lines)
    assert secret not in text
    assert "hunter2pw" not in text


def test_whatsapp_secret_with_placeholder_is_not_echoed() -> None:
    raw = valid()
    raw["whatsapp"] = {"enabled": True, "phone_number_id": "1", "access_token": "x" * 20,
                       "app_secret": "CHANGE_ME_zq81vty", "verify_token": "abc"}
    [line] = problems(raw)
    assert line.startswith("whatsapp.app_secret: still the placeholder")
    assert "zq81vty" not in line


# --- consent words -----------------------------------------------------------------------


@pytest.mark.parametrize(("opt_in", "opt_out", "overlap"), [
    (["sí"], ["SI"], "si"),
    (["ACEPTO", "Stop "], ["stop", "BAJA"], "stop"),
    (["Cancélar"], ["CANCELAR"], "cancelar"),
])
def test_overlapping_consent_words_are_rejected(opt_in: list[str], opt_out: list[str],
                                                overlap: str) -> None:
    raw = valid()
    raw["consent"] = {"opt_in_words": opt_in, "opt_out_words": opt_out}
    [line] = problems(raw)
    assert line.startswith("consent.opt_out_words: overlaps opt_in_words")
    assert line.endswith(f": {overlap}")


def test_unquoted_yaml_boolean_in_a_word_list_gets_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    raw = valid()
    path.write_text(yaml.safe_dump(raw) + "consent:\n  opt_out_words: [BAJA, NO]\n",
                    encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    [line] = err.value.problems
    assert line.startswith("consent.opt_out_words[1]: Input should be a valid string")
    assert "quote it" in line


# --- files and relative paths ------------------------------------------------------------


def test_relative_paths_are_relative_to_the_config_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = valid()
    raw["database"] = {"url": "sqlite+aiosqlite:///state/bridge.db"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    monkeypatch.chdir("/")
    config = load_config(tmp_path / "config.yaml")
    assert config.database.url == f"sqlite+aiosqlite:///{tmp_path}/state/bridge.db"
    assert config.appservice.store_dir == str(tmp_path / "store")


@pytest.mark.parametrize("url", [
    "sqlite+aiosqlite:////var/lib/civic-bridge/bridge.db",
    "sqlite+aiosqlite:///:memory:",
    "sqlite+aiosqlite://",
    "postgresql+asyncpg://bridge:pw@db.internal:5432/bridge",
])
def test_absolute_and_non_file_urls_are_kept(tmp_path: Path, url: str) -> None:
    raw = valid()
    raw["database"] = {"url": url}
    raw["appservice"]["store_dir"] = "/var/lib/civic-bridge/store"
    config = parse_config(raw, tmp_path)
    assert config.database.url == url
    assert config.appservice.store_dir == "/var/lib/civic-bridge/store"


def test_unreadable_or_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "missing.yaml")
    assert err.value.problems == [f"{tmp_path / 'missing.yaml'}: cannot read: "
                                  "No such file or directory"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("homeserver:\n  url: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    [line] = err.value.problems
    assert line.startswith(f"{bad}: not valid YAML (line ")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("consent:\n  agency_name: Ayuntamiento de Cádiz\n".encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load_config(latin1)
    assert err.value.problems == [f"{latin1}: not UTF-8 text"]


def test_config_is_frozen() -> None:
    config = parse_config(valid())
    with pytest.raises(ValueError, match="frozen"):
        config.homeserver.domain = "evil.example"  # type: ignore[misc]


# --- untrusted input never crashes the parser --------------------------------------------

SECTIONS = [name for name in Config.model_fields]
KEYS = sorted({path.split(".")[1] for path, _ in _leaf_fields(Config)}
              | {f"{key}_file" for _, key in SECRET_KEYS})
scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
           | st.text(max_size=40) | st.sampled_from(["CHANGE_ME", _key(), "http://x", "sí"]))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
documents = values | st.dictionaries(
    st.sampled_from(SECTIONS) | st.text(max_size=8) | st.integers(),
    st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), values, max_size=6) | values,
    max_size=8,
)


@st.composite
def damaged_configs(draw: st.DrawFn) -> dict[str, Any]:
    """A valid config with a few values replaced: reaches the deep validators."""
    raw = copy.deepcopy(valid())
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from(SECTIONS))
        sect = raw.setdefault(section, {})
        if isinstance(sect, dict) and draw(st.booleans()):
            sect[draw(st.sampled_from(KEYS))] = draw(values)
        else:
            raw[section] = draw(values)
    return raw


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=documents | damaged_configs())
def test_parse_config_raises_only_config_error(tmp_path: Path, raw: Any) -> None:
    try:
        config = parse_config(raw, tmp_path)
    except ConfigError as exc:
        assert exc.problems
        assert all(isinstance(p, str) and p and "\n" not in p for p in exc.problems)
    else:
        assert isinstance(config, Config)


def test_retention_periods_have_defaults_and_are_read() -> None:
    raw = valid()
    assert parse_config(raw).retention.model_dump() == {
        "outbox_days": 30, "message_map_days": 90, "never_consented_days": 30,
        "invite_links_days": 30, "unused_invite_accounts_days": 30, "dead_letters_days": 90}
    raw["retention"] = {"outbox_days": 7, "dead_letters_days": 365}
    retention = parse_config(raw).retention
    assert (retention.outbox_days, retention.dead_letters_days) == (7, 365)
    assert parse_config(raw).consent.notice_language == "es"
