"""homeserver-config's YAML, check-homeserver's checks (pure) and the deploy fragment."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.config import Config, parse_config
from bridge.homeserver.checks import check_homeserver_config
from bridge.homeserver.probe import NO_MODULE, module_warning
from bridge.homeserver.settings import MODULE_CLASS, homeserver_settings, homeserver_yaml

FRAGMENT = Path(__file__).resolve().parents[2] / "deploy" / "synapse" / \
    "homeserver-hardening.yaml"
KEY = base64.b64encode(bytes(range(32))).decode()


def config(**sections: dict[str, Any]) -> Config:
    raw: dict[str, Any] = {
        "homeserver": {"url": "http://127.0.0.1:8008", "domain": "agency.example"},
        "appservice": {"as_token": "a" * 32, "hs_token": "h" * 32},
        "privacy": {"data_key": KEY, "index_key": base64.b64encode(bytes(32)).decode()},
        "audit": {"key": base64.b64encode(bytes([1]) * 32).decode()},
        "admin": {"token": "t" * 32},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return parse_config(raw)


def test_homeserver_yaml_parses_and_carries_the_module_entry() -> None:
    cfg = config(invites={"localpart_prefix": "vecino_"}, appservice={"ghost_prefix": "wa_"},
                 consent={"agency_name": "Ayuntamiento de Villa"})
    text = homeserver_yaml(cfg)
    assert text.startswith("#")
    data = yaml.safe_load(text)
    (entry,) = data["modules"]
    assert entry["module"] == MODULE_CLASS
    assert entry["config"]["citizen_prefixes"] == ["vecino_"]
    assert entry["config"]["ghost_prefixes"] == ["wa_"]
    assert entry["config"]["bridge_localparts"] == ["civicbridge", "wa_bot"]
    assert entry["config"]["extra_reserved_words"] == ["Ayuntamiento de Villa"]
    assert data["enable_registration"] is False
    assert data["federation_domain_whitelist"] == []
    # The module's own parser accepts what we generate.
    from civic_bridge_synapse.rules import parse_policy

    policy = parse_policy({**entry["config"], "server_name": "agency.example"})
    assert policy.kind("@vecino_abc:agency.example") == "citizen"


def test_federating_deployment_gets_an_allow_list() -> None:
    data = homeserver_settings(config(rooms={"federate": True}))
    assert data["federation_domain_whitelist"] == ["agency.example"]


def test_generated_settings_pass_every_check() -> None:
    cfg = config()
    checks = check_homeserver_config(homeserver_settings(cfg), cfg)
    assert [c.line() for c in checks if not c.ok] == []
    assert len(checks) == 8


def test_the_deploy_fragment_passes_and_matches_the_generator() -> None:
    cfg = config()
    fragment = yaml.safe_load(FRAGMENT.read_text(encoding="utf-8"))
    assert [c.line() for c in check_homeserver_config(fragment, cfg) if not c.ok] == []
    assert fragment == homeserver_settings(cfg)


WEAK: dict[str, Any] = {
    "enable_registration": True,
    "limit_profile_requests_to_users_who_share_rooms": False,
    "user_directory": {"search_all_users": True},
    "listeners": [{"port": 8008, "type": "http",
                   "resources": [{"names": ["client", "federation"]}]}],
    "retention": {"enabled": False},
    "modules": [{"module": MODULE_CLASS, "config": {"citizen_prefixes": ["x_"],
                                                    "ghost_prefixes": ["cb_"]}}],
    "experimental_features": {"msc3202_transaction_extensions": True},
}


def test_a_weak_config_fails_line_by_line_with_the_fix() -> None:
    lines = [c.line() for c in check_homeserver_config(WEAK, config())]
    assert all(line.startswith("FAIL  ") and "; fix: " in line for line in lines), lines
    expected = ["enable_registration", "limit_profile_requests_to_users_who_share_rooms",
                "require_auth_for_profile_requests", "user_directory.search_all_users",
                "federation_domain_whitelist", "retention", "modules (civic_bridge_synapse)",
                "experimental_features"]
    assert [line.split()[1].rstrip(":") for line in lines] == \
        [name.split()[0] for name in expected]
    assert "citizen_prefixes ['x_'] does not cover the bridge's ['v_']" in lines[6]
    assert "msc2409_to_device_messages_enabled" in lines[7]


@pytest.mark.parametrize(("change", "ok"), [
    ({"federation_domain_whitelist": []}, True),
    ({"federation_domain_whitelist": ["partner.example"]}, False),  # federation listener on
    ({"federation_domain_whitelist": ["x"], "listeners": []}, True),
    ({}, False),
])
def test_federation_check(change: dict[str, Any], ok: bool) -> None:
    hs = {**homeserver_settings(config()), "listeners": WEAK["listeners"]}
    hs.pop("federation_domain_whitelist")
    hs.update(change)
    (check,) = [c for c in check_homeserver_config(hs, config())
                if c.name == "federation_domain_whitelist"]
    assert check.ok is ok, check.line()


def test_module_warning_from_the_policy_answer() -> None:
    cfg = config()
    assert module_warning(404, {"errcode": "M_UNRECOGNIZED"}, cfg) == NO_MODULE
    good = {"citizen_prefixes": ["v_"], "ghost_prefixes": ["cb_"]}
    assert module_warning(200, good, cfg) is None
    assert "invites.localpart_prefix" in str(module_warning(
        200, {**good, "citizen_prefixes": ["x_"]}, cfg))
    assert "HTTP 502" in str(module_warning(502, None, cfg))


def test_registration_check_names_the_missing_e2ee_switches(tmp_path: Path) -> None:
    from bridge.homeserver.checks import check_appservice_registration
    from bridge.registration import make_registration

    cfg = config()
    assert check_appservice_registration({}, cfg) is None  # a fragment: nothing listed
    good, old, other = tmp_path / "good.yaml", tmp_path / "old.yaml", tmp_path / "other.yaml"
    registration = make_registration(cfg)
    good.write_text(yaml.safe_dump(registration), encoding="utf-8")
    stale = {k: v for k, v in registration.items()
             if k not in ("org.matrix.msc3202", "receive_ephemeral",
                          "de.sorunome.msc2409.push_ephemeral")}
    old.write_text(yaml.safe_dump(stale), encoding="utf-8")
    other.write_text(yaml.safe_dump({**registration, "id": "another-bridge"}), encoding="utf-8")

    ok = check_appservice_registration(
        {"app_service_config_files": [str(other), str(good)]}, cfg)
    assert ok is not None and ok.ok, ok
    bad = check_appservice_registration(
        {"app_service_config_files": [str(other), str(old)]}, cfg)
    assert bad is not None and not bad.ok
    assert "missing receive_ephemeral, org.matrix.msc3202" in bad.line()
    assert "/sync" in bad.line()
    # Only the unstable MSC2409 name: still ephemeral events.
    old.write_text(yaml.safe_dump({**stale, "org.matrix.msc3202": True,
                                   "de.sorunome.msc2409.push_ephemeral": True}),
                   encoding="utf-8")
    assert check_appservice_registration({"app_service_config_files": [str(old)]}, cfg).ok
    gone = check_appservice_registration(
        {"app_service_config_files": [str(other), str(tmp_path / "nope.yaml")]}, cfg)
    assert gone is not None and not gone.ok and "not found" in gone.line()
    # Listed in a full homeserver.yaml, it is one of check-homeserver's lines.
    names = [c.name for c in check_homeserver_config(
        {**homeserver_settings(cfg), "app_service_config_files": [str(good)]}, cfg)]
    assert names[-1] == f"appservice registration ({cfg.appservice.id})"
