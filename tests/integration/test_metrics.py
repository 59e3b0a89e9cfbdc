"""/metrics on the session's bridge (real Synapse, Cloud API simulator): Prometheus text
that parses, counters that move with real traffic, and label values from small fixed
sets only (never a phone number, BSUID, user, room or message id)."""

from __future__ import annotations

import asyncio
import re
import secrets
import string
from typing import Any, get_args

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridge.db.reports import REPORT_SOURCES
from bridge.devtools.simulator import SimulatedUser
from bridge.model import ConsentPurpose, ConsentState, InboundSource
from bridge.moderation.rules import ACTIONS
from bridge.retention import STEPS as RETENTION_STEPS
from bridge.retry import DEAD_REASONS
from bridge.whatsapp.consent import OPT_IN_BUTTON
from bridge.whatsapp.staff_events import NotSentReason
from bridge.whatsapp.webhook_parse import MessageKind
from tests.fixtures.bridge import BridgeHarness

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

OUTBOX_TYPES = ("text", "buttons", "template", "reaction", "media", "location", "list")
ALLOWED_LABELS: dict[str, set[str]] = {
    "direction": {"in", "out"},
    "type": {*get_args(MessageKind), *OUTBOX_TYPES},
    "reason": {"signature", "json", "format", *DEAD_REASONS, *get_args(NotSentReason),
               "unauthenticated", "forbidden",
               # bridge.whatsapp.mirror: inbound messages staff got a notice for instead
               "media_too_large", "media_failed", "unsupported", "whatsapp_error",
               "account_error",
               # bridge.rooms_wa: civic_bridge_room_not_relayed
               "announcement", "muted", "media_off", "left_out", "not_member",
               "undelivered",
               # bridge.matrix.crypto_feed: to-device events no device could take
               "malformed", "not_ours", "unknown_device"},
    "purpose": {*get_args(ConsentPurpose), "room"},  # "room": any agency room (issue 17)
    "state": set(get_args(ConsentState)),
    "what": {*(label for _, label in RETENTION_STEPS), "management", "reporter", "poll"},
    "source": {*get_args(InboundSource), "outbox"},
    "outcome": {"queued", "repeat", "no_consent", "unknown_recipient", "sent", "delivered",
                "read", "failed", "released", "expired", "other_portal",
                # receipts, staff templates
                "window_closed", "rate_limited", "no_message", "listed", "not_portal",
                "unknown", "refused_parameters"},
    "kind": {"read", "typing"},
    # bridge.whatsapp.identity
    "change": {"user_changed_number", "user_changed_user_id", "other"},
    # bridge.moderation
    "origin": set(REPORT_SOURCES),
    "action": set(ACTIONS),
    "result": {"reverted", "not_reverted", "rekeyed", "notice_only", "conflict",
               "unknown_citizen", "ok", "failed", "broken",
               # bridge.matrix.catchup: device inbox fetches
               "recovered", "nothing_new"},
    # bridge.whatsapp.webhook: items sent before the replay window
    "part": {"message", "status"},
}
LOOKS_PERSONAL = re.compile(r"\d{5,}|[A-Z]{2}\.[A-Za-z0-9]{6,}|^[@!$#+]|wamid|:")
EXPECTED_FAMILIES = {
    "civic_bridge_messages_relayed", "civic_bridge_outbox_depth", "civic_bridge_outbox_retries",
    "civic_bridge_inbound_retries", "civic_bridge_webhook_rejects",
    "civic_bridge_consent_changes", "civic_bridge_relay_seconds", "civic_bridge_webhook_seconds",
    "civic_bridge_as_transaction_seconds", "civic_bridge_as_transactions",
    "civic_bridge_active", "civic_bridge_dead_letters_current",
    "civic_bridge_matrix_send_batch",
}


async def scrape(h: BridgeHarness) -> tuple[set[str], Samples]:
    status, body = await h.running.call("GET", "/metrics", token=None)
    assert status == 200
    assert isinstance(body, str)
    families = list(text_string_to_metric_families(body))  # raises on malformed text
    samples: Samples = {}
    for family in families:
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return {f.name for f in families}, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def assert_labels_are_not_personal(samples: Samples) -> None:
    for name, labels in samples:
        for key, val in labels:
            if key == "le":  # histogram bucket bounds
                assert val == "+Inf" or float(val) >= 0, (name, key, val)
                continue
            assert key in ALLOWED_LABELS, f"{name}: unexpected label {key}"
            assert val in ALLOWED_LABELS[key], f"{name}: {key}={val!r} not in the fixed set"
            assert not LOOKS_PERSONAL.search(val), f"{name}: {key}={val!r}"


def new_citizen() -> SimulatedUser:
    wa_id = "346" + "".join(secrets.choice(string.digits) for _ in range(8))
    bsuid = "ES." + "".join(secrets.choice(string.ascii_letters) for _ in range(20))
    return SimulatedUser(wa_id=wa_id, user_id=bsuid, name="María Pérez")


async def test_ops_endpoints_in_a_single_process(bridge: BridgeHarness) -> None:
    # SQLite: no election, the one process is active.
    assert await bridge.running.call("GET", "/health", token=None) == (200, {"status": "ok"})
    status, ready = await bridge.running.call("GET", "/ready", token=None)
    assert status == 200
    assert ready == {"role": "active", "started": True, "database": True, "homeserver": True}
    names, samples = await scrape(bridge)
    assert not EXPECTED_FAMILIES - names
    assert value(samples, "civic_bridge_active") == 1


async def test_counters_move_and_labels_stay_impersonal(bridge: BridgeHarness) -> None:
    h = bridge
    _, before = await scrape(h)
    citizen = new_citizen()

    # Rejected webhooks: a forged signature, then a signed body that is not JSON.
    hello = h.wa.text_message(citizen, f"Hola, mi número es {citizen.wa_id}")
    assert await h.wa.deliver(h.webhook_url, hello, signing="forged") == 401
    assert await h.wa.deliver_raw(h.webhook_url, b"{not json") == 400

    # A relayed conversation: first contact (notice out), opt-in (consent, portal, the
    # held first message relayed in).
    assert await h.wa.deliver(h.webhook_url, hello) == 200
    await h.wa.wait_for_sent(lambda s: s.get("to") == citizen.wa_id
                             and s.get("type") == "interactive", timeout=30)
    tap = h.wa.button_reply(citizen, OPT_IN_BUTTON, "Acepto")
    assert await h.wa.deliver(h.webhook_url, tap) == 200
    db, index = h.running.bridge.db, h.running.bridge.privacy.index
    async with asyncio.timeout(30):
        while await db.messages.by_wamid(index.wamid(hello["messages"][0]["id"])) is None:
            await asyncio.sleep(0.1)

    # An appservice transaction, stored and acknowledged.
    status, _ = await h.running.call(
        "PUT", f"/_matrix/app/v1/transactions/metrics-{secrets.token_hex(4)}",
        {"events": []}, token="hs")
    assert status == 200

    _, after = await scrape(h)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("civic_bridge_webhook_rejects_total", reason="signature") == 1
    assert delta("civic_bridge_webhook_rejects_total", reason="json") == 1
    assert delta("civic_bridge_messages_relayed_total", direction="in", type="text") >= 1
    assert delta("civic_bridge_messages_relayed_total", direction="out", type="buttons") >= 1
    assert delta("civic_bridge_consent_changes_total", purpose="mirroring",
                 state="granted") >= 1
    assert delta("civic_bridge_relay_seconds_count", direction="in") >= 1
    assert delta("civic_bridge_relay_seconds_count", direction="out") >= 1
    # The relayed message left through the devices' send gate.
    assert delta("civic_bridge_matrix_send_batch_count") >= 1
    assert delta("civic_bridge_webhook_seconds_count") >= 4
    # Synapse pushes transactions of its own meanwhile (the portal's events).
    assert delta("civic_bridge_as_transaction_seconds_count") >= 1
    assert delta("civic_bridge_as_transactions_total") >= 1
    assert ("civic_bridge_outbox_depth", ()) in after

    assert_labels_are_not_personal(after)
    everything: Any = repr(after)
    for identifier in (citizen.wa_id, citizen.user_id, citizen.wa_id[2:]):
        assert identifier not in everything
