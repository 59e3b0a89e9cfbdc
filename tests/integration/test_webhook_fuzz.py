"""Whatever a signed webhook or an appservice transaction carries, the bridge never
answers 5xx (Meta and Synapse would retry it forever): it stores what it can, ignores
and counts malformed parts, and refuses with 400 only a body that is not JSON at all."""

from __future__ import annotations

import asyncio
import json
import secrets
import urllib.error
import urllib.request
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures.bridge import BridgeHarness
from tests.fixtures.webhook_fuzz import any_json, bodies, encode, text

pytestmark = pytest.mark.integration


def _post(url: str, body: bytes, headers: dict[str, str], method: str = "POST") -> int:
    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


async def test_no_webhook_body_gets_a_5xx(bridge: BridgeHarness) -> None:
    """Arbitrary JSON structures, signed, through the real route of the running bridge
    (the requests run in a thread so the bridge's event loop keeps serving)."""
    wa, url = bridge.wa, bridge.webhook_url
    phone_id = bridge.running.config.whatsapp.phone_number_id

    @settings(max_examples=120, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body=bodies(phone_id))
    def check(body: dict[str, Any]) -> None:
        raw = encode(body)
        status = _post(url, raw, {"Content-Type": "application/json",
                                  "X-Hub-Signature-256": wa.sign(raw)})
        assert status < 500, f"{status} for {raw[:300]!r}"

    await asyncio.to_thread(check)
    # Whatever was accepted gets processed: nothing stays queued.
    await bridge.running.idle("whatsapp", timeout=120)
    assert await bridge.running.bridge.db.inbound.pending("whatsapp") == []


async def test_lone_surrogate_in_a_webhook_is_stored_and_processed(
        bridge: BridgeHarness) -> None:
    """A text with a lone surrogate is acknowledged and reaches the worker, which
    answers the unknown sender with the privacy notice."""
    from tests.integration.test_whatsapp import new_citizen, to_citizen
    citizen = new_citizen()
    value = bridge.wa.text_message(citizen, "hola \ud800 mundo")
    assert await bridge.wa.deliver(bridge.webhook_url, value) == 200
    await bridge.wa.wait_for_sent(
        lambda s: s.get("type") == "interactive" and to_citizen(s, citizen), timeout=30)


async def test_no_transaction_gets_a_5xx(bridge: BridgeHarness) -> None:
    """Events with arbitrary content (lone surrogates included) in rooms the bridge does
    not know: stored and answered 200, never 5xx."""
    base = f"{bridge.running.url}/_matrix/app/v1/transactions/"
    headers = {"Content-Type": "application/json",
               "Authorization": f"Bearer {bridge.running.config.appservice.hs_token}"}
    event = st.fixed_dictionaries({
        "event_id": st.builds(lambda: "$fuzz" + secrets.token_hex(8)),
        "room_id": st.just("!fuzz:localhost"), "type": st.just("m.room.message"),
        "sender": st.just("@someone:localhost"),
        "content": st.dictionaries(text, any_json, max_size=4)})

    @settings(max_examples=60, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(events=st.lists(event, max_size=3))
    def check(events: list[dict[str, Any]]) -> None:
        raw = json.dumps({"events": events}).encode()
        status = _post(base + secrets.token_hex(6), raw, headers, method="PUT")
        assert status < 500, f"{status} for {raw[:300]!r}"

    await asyncio.to_thread(check)
