"""The WhatsApp webhook is stored and answered on a thread of its own
(bridge.web.ingest_thread): its answer does not wait for the bridge's event loop, and
what it stored is then processed by the bridge as before."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from typing import Any

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


def delivery(h: BridgeHarness, text: str) -> tuple[dict[str, Any], bytes]:
    """A new citizen's text message, and the signed webhook body that carries it."""
    message = h.wa.text_message(new_citizen(), text)
    return message, json.dumps(h.wa.envelope(message), separators=(",", ":")).encode()


def post_webhook(h: BridgeHarness, body: bytes, timeout: float = 60) -> int:
    """POST a signed delivery as Meta would (blocking: call it from a thread); its status."""
    request = urllib.request.Request(h.webhook_url, data=body, method="POST", headers={
        "Content-Type": "application/json", "X-Hub-Signature-256": h.wa.sign(body)})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def answer_with_loop_held(h: BridgeHarness, body: bytes) -> int | None:
    """POST `body` from another thread (another machine, as far as the bridge can tell)
    while this event loop, the bridge's, does nothing else for up to HOLD_SECONDS: the
    answer's status, or None if it did not come while the loop was held."""
    status: list[int] = []
    answered = threading.Event()

    def meta() -> None:
        status.append(post_webhook(h, body))
        answered.set()

    sender = threading.Thread(target=meta)
    sender.start()
    answered_while_held = answered.wait(HOLD_SECONDS)  # blocks the loop, on purpose
    await asyncio.to_thread(sender.join)
    return status[0] if answered_while_held else None


async def stored_status(h: BridgeHarness, message: dict[str, Any]) -> list[str]:
    """The status of the queue rows stored for `message`."""
    async with h.running.bridge.db.session() as session:
        rows = (await session.scalars(select(InboundRow).where(
            InboundRow.source == "whatsapp",
            InboundRow.dedupe_key == key_of(h, wamid_of(message))))).all()
    return [row.status for row in rows]


async def test_a_webhook_is_answered_while_the_bridge_loop_is_busy(
        bridge: BridgeHarness) -> None:
    message, body = delivery(bridge, "¿a qué hora abre el registro?")
    assert await answer_with_loop_held(bridge, body) == 200, \
        "the webhook's answer waited for the bridge's event loop"

    # Then the bridge's loop processes what was stored, once.
    await asyncio.sleep(0)
    await bridge.running.idle("whatsapp")
    assert await stored_status(bridge, message) in (["done"], ["held"])
    spool = bridge.running.bridge.webhooks.spool
    assert spool is None or len(spool) == 0
