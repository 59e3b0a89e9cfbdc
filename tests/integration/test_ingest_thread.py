"""The WhatsApp webhook is stored and answered on a thread of its own
(bridge.web.ingest_thread): its answer does not wait for the bridge's event loop, and
what it stored is then processed by the bridge as before."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request

import pytest
from sqlalchemy import select

from bridge.db.models import InboundRow
from tests.fixtures.bridge import BridgeHarness
from tests.integration.test_webhook_replay import key_of
from tests.integration.test_whatsapp import new_citizen, wamid_of

pytestmark = pytest.mark.integration

# How long the bridge's loop is held at most; the answer comes long before (or never,
# if it needed the loop: then the test fails after this).
HOLD_SECONDS = 20.0


async def test_a_webhook_is_answered_while_the_bridge_loop_is_busy(
        bridge: BridgeHarness) -> None:
    message = bridge.wa.text_message(new_citizen(), "¿a qué hora abre el registro?")
    body = json.dumps(bridge.wa.envelope(message), separators=(",", ":")).encode()
    request = urllib.request.Request(bridge.webhook_url, data=body, method="POST", headers={
        "Content-Type": "application/json", "X-Hub-Signature-256": bridge.wa.sign(body)})
    answered = threading.Event()
    status: list[int] = []

    def meta() -> None:  # another machine, as far as the bridge can tell
        with urllib.request.urlopen(request, timeout=60) as resp:
            status.append(resp.status)
        answered.set()

    sender = threading.Thread(target=meta)
    sender.start()
    # The bridge's loop does nothing else until the answer came (or HOLD_SECONDS).
    answered_while_held = answered.wait(HOLD_SECONDS)
    await asyncio.to_thread(sender.join)
    assert answered_while_held, "the webhook's answer waited for the bridge's event loop"
    assert status == [200]

    # Then the bridge's loop processes what was stored, once.
    await asyncio.sleep(0)
    await bridge.running.idle("whatsapp")
    async with bridge.running.bridge.db.session() as session:
        rows = (await session.scalars(select(InboundRow).where(
            InboundRow.source == "whatsapp",
            InboundRow.dedupe_key == key_of(bridge, wamid_of(message))))).all()
    assert [row.status for row in rows] in (["done"], ["held"])
    spool = bridge.running.bridge.webhooks.spool
    assert spool is None or len(spool) == 0
