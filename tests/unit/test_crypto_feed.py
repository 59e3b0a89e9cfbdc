"""Reading the E2EE parts of appservice transactions (MSC2409 / MSC3202)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from bridge.db.queues import _event_key, event_lane
from bridge.matrix.appservice import parse_transaction, transaction_key
from bridge.matrix.crypto_feed import NO_COUNTS, NO_TO_DEVICE, CryptoFeed
from bridge.matrix.crypto_parts import PROBE_TYPE, parse_crypto, unwrap, wrap

GHOST, DEV = "@cb_ghost:localhost", "GHOSTDEV"


def _to_device(**extra: Any) -> dict[str, Any]:
    return {"type": "m.room.encrypted", "sender": "@alice:localhost", "to_user_id": GHOST,
            "to_device_id": DEV, "content": {"algorithm": "m.olm.v1.curve25519-aes-sha2",
                                             "ciphertext": {}}, **extra}


def test_unstable_keys_as_synapse_sends_them() -> None:
    body = {
        "events": [],
        "de.sorunome.msc2409.to_device": [_to_device()],
        "org.matrix.msc3202.device_one_time_keys_count": {
            GHOST: {DEV: {"signed_curve25519": 49}}, "@cb_other:localhost": {"OTHER": {}}},
        "org.matrix.msc3202.device_unused_fallback_key_types": {
            GHOST: {DEV: ["signed_curve25519"]}, "@cb_other:localhost": {"OTHER": []}},
        "org.matrix.msc3202.device_lists": {"changed": ["@alice:localhost"],
                                            "left": ["@bob:localhost"]},
    }
    parts = parse_crypto(body)
    assert parts.to_device == [_to_device()] and parts.malformed == 0
    # An empty object is a count of zero, not "no count".
    assert parts.otk_counts == {(GHOST, DEV): 49, ("@cb_other:localhost", "OTHER"): 0}
    assert parts.fallback_unused == {(GHOST, DEV): ["signed_curve25519"],
                                     ("@cb_other:localhost", "OTHER"): []}
    assert parts.changed == {"@alice:localhost"} and parts.left == {"@bob:localhost"}
    assert parts.has_counts
    txn = parse_transaction(json.dumps(body).encode())
    assert txn.crypto == parts
    assert txn.changed_users == {"@alice:localhost", "@bob:localhost"}


def test_stable_keys_win_over_unstable_ones() -> None:
    body = {
        "to_device": [_to_device(type="m.dummy")],
        "de.sorunome.msc2409.to_device": [_to_device()],
        "device_one_time_keys_count": {GHOST: {DEV: {"signed_curve25519": 3}}},
        "org.matrix.msc3202.device_one_time_keys_count": {GHOST: {DEV: {"signed_curve25519": 9}}},
        "device_unused_fallback_key_types": {GHOST: {DEV: []}},
        "org.matrix.msc3202.device_unused_fallback_key_types": {
            GHOST: {DEV: ["signed_curve25519"]}},
        "device_lists": {"changed": ["@x:localhost"]},
        "org.matrix.msc3202.device_lists": {"changed": ["@y:localhost"]},
    }
    parts = parse_crypto(body)
    assert [e["type"] for e in parts.to_device] == ["m.dummy"]
    assert parts.otk_counts == {(GHOST, DEV): 3}
    assert parts.fallback_unused == {(GHOST, DEV): []}
    assert parts.changed == {"@x:localhost"}
    # The older spelling of the counts key is read too.
    old = parse_crypto({"org.matrix.msc3202.device_one_time_key_counts":
                        {GHOST: {DEV: {"signed_curve25519": 7}}}})
    assert old.otk_counts == {(GHOST, DEV): 7} and old.has_counts


def test_malformed_items_are_counted_not_routed() -> None:
    parts = parse_crypto({"de.sorunome.msc2409.to_device": [
        _to_device(), "nope", {**_to_device(), "to_device_id": None},
        {**_to_device(), "content": "x"}]})
    assert parts.to_device == [_to_device()] and parts.malformed == 3
    empty = parse_crypto({"events": []})
    assert empty.to_device == [] and not empty.has_counts and empty.otk_counts == {}


def test_queued_to_device_event_has_its_own_key_and_recipient_lane() -> None:
    item = _to_device()
    wrapped = wrap(item)
    assert unwrap(wrapped) == item and unwrap({"event_id": "$x", "room_id": "!r"}) is None
    assert event_lane(wrapped) == f"to-device:{GHOST}"
    key = _event_key("txn1", 0, wrapped)
    assert key.startswith("to-device:") and key == _event_key("txn9", 5, wrap(dict(item)))
    assert key != _event_key("txn1", 0, wrap({**item, "to_device_id": "OTHERDEV"}))
    # A transaction with only to-device events is remembered under an id that names
    # them, so the same txnId with other to-device events is not taken for a retry.
    assert transaction_key("5", [], [item]) != transaction_key("5", [], [_to_device(x=1)])
    assert transaction_key("5", [], [item]) == transaction_key("5", [], [dict(item)])


class _Devices:
    def __init__(self) -> None:
        self.feed: Any = None
        self.changed: list[set[str]] = []
        self.counts: list[tuple[str, str, Any, Any]] = []
        self.woken = 0

    def wake_all(self) -> None:
        self.woken += 1

    def is_ours(self, user_id: str) -> bool:
        return user_id.startswith("@cb_")

    def users_changed(self, users: set[str]) -> None:
        self.changed.append(users)

    def key_counts(self, user_id: str, device_id: str, otk: int | None = None,
                   fallback_unused: list[str] | None = None) -> None:
        self.counts.append((user_id, device_id, otk, fallback_unused))


def _feed() -> tuple[CryptoFeed, _Devices, Counter]:
    devices = _Devices()
    dropped = Counter("dropped", "d", ["reason"], registry=CollectorRegistry())
    return CryptoFeed(devices, dropped), devices, dropped  # type: ignore[arg-type]


def test_observe_keeps_ours_and_drops_and_counts_the_rest() -> None:
    feed, _, dropped = _feed()
    foreign = _to_device(to_user_id="@alice:localhost")
    parts = parse_crypto({"to_device": [_to_device(), foreign, "bad"]})
    keep, counts = feed.observe(parts)
    assert keep == [_to_device()] and counts == {"malformed": 1, "not_ours": 1}
    assert dropped.labels("not_ours")._value.get() == 0  # counted once known new
    feed.count_dropped(counts)
    assert dropped.labels("not_ours")._value.get() == 1
    assert dropped.labels("malformed")._value.get() == 1


def test_apply_routes_counts_only_when_fed_and_lists_always() -> None:
    feed, devices, _ = _feed()
    parts = parse_crypto({
        "org.matrix.msc3202.device_one_time_keys_count": {GHOST: {DEV: {}},
                                                          "@alice:localhost": {"A": {}}},
        "org.matrix.msc3202.device_lists": {"changed": ["@alice:localhost", GHOST]}})
    feed.apply(parts)
    # Our own users' device changes are our own uploads: not a reason to query.
    assert devices.changed == [{"@alice:localhost"}]
    assert devices.counts == []  # undecided / polling: nio's /sync has the counts
    feed.decide("appservice")
    feed.apply(parts)
    assert devices.counts == [(GHOST, DEV, 0, None)]


class _API:
    def __init__(self, feed: CryptoFeed, deliver: dict[str, Any] | None) -> None:
        self.feed, self.deliver = feed, deliver
        self.lag = 0.01  # seconds until the transaction carrying the probe comes

    async def request(self, method: str, path: str, *, as_user: str | None = None,
                      json: Any = None, params: Any = None) -> dict[str, Any]:
        assert method == "PUT" and PROBE_TYPE in path and as_user == GHOST
        content = json["messages"][GHOST][DEV]
        if self.deliver is not None:
            body = {"de.sorunome.msc2409.to_device": [
                _to_device(type=PROBE_TYPE, sender=GHOST, content=content)], **self.deliver}
            loop = asyncio.get_running_loop()
            loop.call_later(self.lag, lambda: self.feed.observe(parse_crypto(body)))
        return {}


async def test_probe_decides_the_transport() -> None:
    counts = {"org.matrix.msc3202.device_one_time_keys_count": {GHOST: {DEV: {}}}}
    for deliver, mode, problem in ((counts, "appservice", None), ({}, "sync", NO_COUNTS),
                                   (None, "sync", NO_TO_DEVICE)):
        feed, _, _ = _feed()
        await feed.probe(_API(feed, deliver), GHOST, DEV, timeout=0.5)  # type: ignore[arg-type]
        assert (feed.mode, feed.problem) == (mode, problem)
        assert feed.decided.is_set()
        warning = feed.warning()
        assert (warning is None) == (mode == "appservice")
        if warning is not None:
            assert "experimental_features" in warning and "/sync" in warning


class _HeldDown(_API):
    """A homeserver holding the bridge DOWN: probes are dropped until the ping."""

    def __init__(self, feed: CryptoFeed, deliver: dict[str, Any]) -> None:
        super().__init__(feed, None)
        self.up_deliver = deliver
        self.sent = 0

    async def request(self, method: str, path: str, *, as_user: str | None = None,
                      json: Any = None, params: Any = None) -> dict[str, Any]:
        self.sent += 1
        return await super().request(method, path, as_user=as_user, json=json, params=params)

    async def ping(self) -> bool:
        await asyncio.sleep(0.05)
        self.deliver = self.up_deliver  # UP from now on
        return True


async def test_probe_dropped_while_held_down_is_sent_again_after_the_ping() -> None:
    """A restart while Synapse held the bridge DOWN: the first probe is dropped; once
    the ping made Synapse retry, the probe goes again and the transport is decided
    right (before: /sync polling for the life of the process)."""
    counts = {"org.matrix.msc3202.device_one_time_keys_count": {GHOST: {DEV: {}}}}
    feed, _, _ = _feed()
    api = _HeldDown(feed, counts)
    await feed.probe(api, GHOST, DEV, timeout=2.0,  # type: ignore[arg-type]
                     recovered=api.ping)
    assert feed.mode == "appservice" and api.sent == 2
    # The probe sent again comes after the wait would have ended: it is waited for.
    feed, _, _ = _feed()
    slow = _HeldDown(feed, counts)
    slow.lag = 0.5
    await feed.probe(slow, GHOST, DEV, timeout=1.2, recovered=slow.ping)  # type: ignore[arg-type]
    assert feed.mode == "appservice" and slow.sent == 2
    # A ping still retrying when the wait ends (the homeserver cannot reach the
    # bridge) is not waited for: the decision takes no longer than before.
    feed, _, _ = _feed()
    late = _HeldDown(feed, counts)

    async def slow_ping() -> bool:
        await asyncio.sleep(30)
        return await late.ping()

    loop = asyncio.get_running_loop()
    began = loop.time()
    await feed.probe(late, GHOST, DEV, timeout=0.2, recovered=slow_ping)  # type: ignore[arg-type]
    assert (feed.mode, late.sent) == ("sync", 1) and loop.time() - began < 1.0
    # A failed ping (an old homeserver) leaves it as it was: one probe, the fallback.
    feed, _, _ = _feed()
    held = _HeldDown(feed, counts)

    async def no_ping() -> bool:
        return False

    await feed.probe(held, GHOST, DEV, timeout=0.3, recovered=no_ping)  # type: ignore[arg-type]
    assert (feed.mode, feed.problem, held.sent) == ("sync", NO_TO_DEVICE, 1)


def test_a_probe_nonce_that_is_not_a_string_is_ignored() -> None:
    feed, _, _ = _feed()
    bad = _to_device(type=PROBE_TYPE, content={"nonce": ["x"]})
    assert feed.observe(parse_crypto({"to_device": [bad]})) == ([], {})


async def test_counts_of_closed_devices_are_kept_only_while_they_need_action(
        tmp_path: Any) -> None:
    from bridge.matrix.devices import Devices

    devices = Devices(None, tmp_path, "pickle")  # type: ignore[arg-type]  # no device opens
    devices.key_counts(GHOST, DEV, otk=3, fallback_unused=["signed_curve25519"])
    assert devices._pending_counts == {(GHOST, DEV): {"otk": 3}}
    devices.key_counts(GHOST, DEV, otk=None, fallback_unused=[])
    assert devices._pending_counts == {(GHOST, DEV): {"otk": 3, "fallback_unused": []}}
    devices.key_counts(GHOST, DEV, otk=None, fallback_unused=["signed_curve25519"])
    assert devices._pending_counts == {(GHOST, DEV): {"otk": 3}}  # the low count stays
    devices.key_counts(GHOST, DEV, otk=50)
    assert devices._pending_counts == {}


async def test_a_restart_starts_as_remembered_and_rechecks_in_the_background() -> None:
    counts = {"org.matrix.msc3202.device_one_time_keys_count": {GHOST: {DEV: {}}}}
    feed, devices, _ = _feed()
    assert not feed.start_as(None) and not feed.start_as("pending")  # nothing to go by
    assert not feed.decided.is_set()
    assert feed.start_as("appservice")  # at once, no probe waited for
    assert feed.decided.is_set() and feed.appservice
    await feed.recheck(_API(feed, counts), GHOST, DEV, timeout=0.5)  # type: ignore[arg-type]
    assert feed.appservice and devices.woken == 0  # confirmed: nothing moves
    # The homeserver's switches were turned off since: the devices move to /sync.
    await feed.recheck(_API(feed, None), GHOST, DEV, timeout=0.3)  # type: ignore[arg-type]
    assert (feed.mode, feed.problem) == ("sync", NO_TO_DEVICE) and devices.woken == 1
    # And the other way round.
    feed, devices, _ = _feed()
    assert feed.start_as("sync") and feed.mode == "sync"
    await feed.recheck(_API(feed, counts), GHOST, DEV, timeout=0.5)  # type: ignore[arg-type]
    assert feed.appservice and devices.woken == 1 and feed.warning() is None
