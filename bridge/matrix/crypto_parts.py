"""The E2EE parts of an appservice transaction, read without I/O (core: no aiohttp,
nio or SQLAlchemy; tests/unit/test_core_imports.py).

MSC2409 puts the to-device events addressed to the appservice's users into the
transaction (with `to_user_id`/`to_device_id`); MSC3202 adds device-list changes and,
per device, one-time-key counts and unused fallback-key types. Synapse 1.163 sends only
the unstable names; the stable ones are read first, as mautrix does. How the bridge
uses them: bridge.matrix.crypto_feed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

# Sent by the bot to its own device at start (bridge.matrix.crypto_feed.CryptoFeed.probe).
PROBE_TYPE: Final = "io.civic-bridge.probe"
# Stable names first (MSC2409/MSC3202 once merged), then the unstable ones Synapse sends.
TO_DEVICE_KEYS: Final = ("to_device", "de.sorunome.msc2409.to_device")
DEVICE_LISTS_KEYS: Final = ("device_lists", "org.matrix.msc3202.device_lists")
OTK_COUNT_KEYS: Final = ("device_one_time_keys_count",
                         "org.matrix.msc3202.device_one_time_keys_count",
                         "org.matrix.msc3202.device_one_time_key_counts")
FALLBACK_KEYS: Final = ("device_unused_fallback_key_types",
                        "org.matrix.msc3202.device_unused_fallback_key_types")

# A to-device event queued with a transaction's room events is stored as
# {TO_DEVICE_WRAPPER: event}: it has no event or room id.
TO_DEVICE_WRAPPER: Final = "io.civic-bridge.to_device"

DeviceKey = tuple[str, str]  # (user id, device id)
Counts = dict[str, int]  # dropped to-device events by reason


@dataclass(frozen=True)
class CryptoParts:
    """The E2EE parts of one transaction."""

    to_device: list[dict[str, Any]] = field(default_factory=list)
    malformed: int = 0  # to-device items without the fields routing needs
    changed: set[str] = field(default_factory=set)
    left: set[str] = field(default_factory=set)
    # Absent device: not reported. A listed device without `signed_curve25519` has 0.
    otk_counts: dict[DeviceKey, int] = field(default_factory=dict)
    fallback_unused: dict[DeviceKey, list[str]] = field(default_factory=dict)
    has_counts: bool = False  # the transaction carried an MSC3202 count key at all


def _first(body: Mapping[str, Any], keys: tuple[str, ...], kind: type) -> Any:
    for key in keys:
        value = body.get(key)
        if isinstance(value, kind):
            return value
    return None


def _per_device(value: Any) -> dict[DeviceKey, Any]:
    out: dict[DeviceKey, Any] = {}
    if not isinstance(value, dict):
        return out
    for user_id, devices in value.items():
        if isinstance(user_id, str) and isinstance(devices, dict):
            for device_id, item in devices.items():
                if isinstance(device_id, str):
                    out[(user_id, device_id)] = item
    return out


def parse_crypto(body: Mapping[str, Any]) -> CryptoParts:
    """Read the to-device events, device lists and key counts of a transaction body."""
    to_device: list[dict[str, Any]] = []
    malformed = 0
    for item in _first(body, TO_DEVICE_KEYS, list) or []:
        if (isinstance(item, dict) and isinstance(item.get("content"), dict)
                and all(isinstance(item.get(k), str) and item.get(k)
                        for k in ("type", "sender", "to_user_id", "to_device_id"))):
            to_device.append(item)
        else:
            malformed += 1
    lists = _first(body, DEVICE_LISTS_KEYS, dict) or {}

    def users(key: str) -> set[str]:
        value = lists.get(key)
        return {u for u in value if isinstance(u, str)} if isinstance(value, list) else set()

    raw_counts = _first(body, OTK_COUNT_KEYS, dict)
    counts: dict[DeviceKey, int] = {}
    for key, algorithms in _per_device(raw_counts).items():
        if isinstance(algorithms, dict):
            count = algorithms.get("signed_curve25519", 0)  # {} means none left
            counts[key] = count if isinstance(count, int) and count >= 0 else 0
    fallback = {key: [a for a in types if isinstance(a, str)]
                for key, types in _per_device(_first(body, FALLBACK_KEYS, dict)).items()
                if isinstance(types, list)}
    return CryptoParts(to_device, malformed, users("changed"), users("left"), counts,
                       fallback, has_counts=raw_counts is not None)


def wrap(item: Mapping[str, Any]) -> dict[str, Any]:
    return {TO_DEVICE_WRAPPER: dict(item)}


def unwrap(event: Mapping[str, Any]) -> dict[str, Any] | None:
    """The to-device event a queued item holds; None for a room event."""
    item = event.get(TO_DEVICE_WRAPPER)
    return item if isinstance(item, dict) else None


def to_device_key(item: Mapping[str, Any]) -> str:
    """The dedupe key of a queued to-device event: a hash of all of it (its recipient
    included), so a transaction Synapse repeats queues nothing twice."""
    canonical = json.dumps(item, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "to-device:" + hashlib.sha256(canonical.encode()).hexdigest()
