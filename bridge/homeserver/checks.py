"""Does a homeserver.yaml give citizens the protection the bridge counts on? (pure)

One `Check` per setting, each with the fix to apply. `civic-bridge check-homeserver`
prints them; `bridge.homeserver.probe` adds what only the running server can tell.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bridge.config import Config
from bridge.homeserver.settings import (
    DEFAULT_MAX_LIFETIME,
    EXPERIMENTAL_FEATURES,
    MODULE_CLASS,
    module_entry,
)

HsConfig = Mapping[str, Any]


@dataclass(frozen=True)
class Check:
    """One setting: `ok`, what was found, and (when not ok) how to fix it."""

    name: str
    ok: bool
    found: str
    fix: str = ""

    def line(self) -> str:
        if self.ok:
            return f"OK    {self.name}: {self.found}"
        return f"FAIL  {self.name}: {self.found}; fix: {self.fix}"


def _flag(hs: HsConfig, key: str, want: bool, default: bool, why: str) -> Check:
    value = hs.get(key, default)
    shown = f"{str(value).lower()}{' (default)' if key not in hs else ''}"
    return Check(key, value is want, shown,
                 f"set `{key}: {str(want).lower()}` ({why})")


def check_registration(hs: HsConfig, config: Config) -> Check:
    return _flag(hs, "enable_registration", False, False,
                 "accounts come from invite links and staff provisioning only")


def check_profile_sharing(hs: HsConfig, config: Config) -> Check:
    return _flag(hs, "limit_profile_requests_to_users_who_share_rooms", True, False,
                 "a citizen's profile is only for people in their rooms")


def check_profile_auth(hs: HsConfig, config: Config) -> Check:
    return _flag(hs, "require_auth_for_profile_requests", True, False,
                 "no anonymous profile lookups")


def check_user_directory(hs: HsConfig, config: Config) -> Check:
    directory = hs.get("user_directory") or {}
    value = directory.get("search_all_users", False) if isinstance(directory, dict) else True
    return Check("user_directory.search_all_users", value is False,
                 str(value).lower(),
                 "set `user_directory: {search_all_users: false}` (search only finds "
                 "people who share a room)")


def _serves_federation(hs: HsConfig) -> bool:
    for listener in hs.get("listeners") or []:
        if listener.get("type") == "http":
            names = [n for r in listener.get("resources") or [] for n in r.get("names") or []]
            if "federation" in names:
                return True
    return False


def check_federation(hs: HsConfig, config: Config) -> Check:
    allow = hs.get("federation_domain_whitelist")
    name = "federation_domain_whitelist"
    if config.rooms.federate:
        ok = isinstance(allow, list) and len(allow) > 0
        return Check(name, ok, f"{allow!r} (rooms.federate: true)",
                     "list the partner servers the agency federates with "
                     "(an allow-list, not open federation)")
    if isinstance(allow, list) and not allow:
        return Check(name, True, "[] (federation off)")
    if not _serves_federation(hs) and allow is not None:
        return Check(name, True, f"{allow!r}, no federation listener")
    return Check(name, False, f"{'unset' if allow is None else repr(allow)} "
                 "(rooms.federate is false)",
                 "set `federation_domain_whitelist: []` (and drop the `federation` "
                 "listener resource)")


def check_retention(hs: HsConfig, config: Config) -> Check:
    retention = hs.get("retention") or {}
    enabled = isinstance(retention, dict) and retention.get("enabled") is True
    policy = retention.get("default_policy") if isinstance(retention, dict) else None
    lifetime = policy.get("max_lifetime") if isinstance(policy, dict) else None
    found = f"enabled, default max_lifetime {lifetime}" if enabled and lifetime else \
        ("enabled, no default max_lifetime" if enabled else "off")
    return Check("retention", bool(enabled and lifetime), found,
                 "set `retention: {enabled: true, default_policy: {max_lifetime: "
                 f"{DEFAULT_MAX_LIFETIME}}}}}` (the agency's records schedule)")


def check_module(hs: HsConfig, config: Config) -> Check:
    name = "modules (civic_bridge_synapse)"
    fix = "add the `modules:` entry that `civic-bridge homeserver-config` prints"
    entries = [m for m in hs.get("modules") or []
               if isinstance(m, dict) and m.get("module") == MODULE_CLASS]
    if not entries:
        return Check(name, False, "not configured", fix)
    got = entries[0].get("config") or {}
    want = module_entry(config)["config"]
    wrong = [key for key in ("citizen_prefixes", "ghost_prefixes")
             if not set(want[key]) <= set(got.get(key) or [])]
    if wrong:
        return Check(name, False, f"{wrong[0]} {got.get(wrong[0])!r} does not cover the "
                     f"bridge's {want[wrong[0]]!r}", fix)
    return Check(name, True, "configured with the bridge's prefixes")


def check_experimental(hs: HsConfig, config: Config) -> Check:
    features = hs.get("experimental_features") or {}
    missing = [k for k in EXPERIMENTAL_FEATURES
               if not (isinstance(features, dict) and features.get(k) is True)]
    return Check("experimental_features", not missing,
                 f"missing {', '.join(missing)}" if missing else
                 ", ".join(EXPERIMENTAL_FEATURES),
                 "set " + ", ".join(f"`{k}: true`" for k in missing) +
                 " under experimental_features (without them every E2EE device of the "
                 "bridge polls with /sync; docs/e2ee.md)")


# What the bridge's registration must carry for E2EE fed by transactions (docs/e2ee.md);
# `civic-bridge registration` writes all of them.
REGISTRATION_E2EE = {"receive_ephemeral": "MSC2409: to-device events in transactions",
                     "org.matrix.msc3202": "MSC3202: device lists and key counts"}


def check_appservice_registration(hs: HsConfig, config: Config) -> Check | None:
    """The bridge's registration among `app_service_config_files` (read from disk, as
    Synapse does) carries the E2EE switches. None when the file lists no registration
    (a fragment to merge, such as what `homeserver-config` prints)."""
    files = hs.get("app_service_config_files")
    if not isinstance(files, list):
        return None
    name = f"appservice registration ({config.appservice.id})"
    for path in files:
        try:
            registration = yaml.safe_load(Path(str(path)).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(registration, dict) and registration.get("id") == config.appservice.id:
            break
    else:
        return Check(name, False, "not found in app_service_config_files",
                     "write it with `civic-bridge registration` and list it there")
    ephemeral = registration.get("receive_ephemeral") is True or \
        registration.get("de.sorunome.msc2409.push_ephemeral") is True
    missing = [key for key in REGISTRATION_E2EE
               if not (ephemeral if key == "receive_ephemeral" else
                       registration.get(key) is True)]
    return Check(name, not missing,
                 f"{path}: missing {', '.join(missing)}" if missing else
                 f"{path}: {', '.join(REGISTRATION_E2EE)}",
                 "add " + ", ".join(f"`{k}: true` ({REGISTRATION_E2EE[k]})" for k in missing)
                 + " (or regenerate it with `civic-bridge registration`) and restart "
                 "Synapse; without them every E2EE device of the bridge polls with /sync")


CHECKS: tuple[Callable[[HsConfig, Config], Check], ...] = (
    check_registration, check_profile_sharing, check_profile_auth, check_user_directory,
    check_federation, check_retention, check_module, check_experimental,
)


def check_homeserver_config(hs: HsConfig, config: Config) -> list[Check]:
    """Every check on a parsed homeserver.yaml, in a stable order."""
    checks = [check(hs, config) for check in CHECKS]
    if (registration := check_appservice_registration(hs, config)) is not None:
        checks.append(registration)
    return checks
