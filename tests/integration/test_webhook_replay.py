"""The replay window: a correctly signed webhook message or status sent before the dedupe
retention (bridge.db.queues.REPLAY_WINDOW) is acknowledged, counted and never queued, so
a redelivery whose dedupe key was purged cannot be relayed a second time."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import select

from bridge.db.models import InboundRow
from bridge.db.queues import FINISHED_RETENTION, REPLAY_WINDOW
from bridge.whatsapp.webhook_parse import dedupe_key
from tests.fixtures.bridge import BridgeHarness
from tests.integration.test_metrics import scrape, value
from tests.integration.test_whatsapp import new_citizen, wamid_of

pytestmark = pytest.mark.integration

DAY = 86400.0


def key_of(bridge: BridgeHarness, wamid: str, status: str | None = None) -> str:
    """The queue's dedupe key of a message or status (the wamid by its keyed hash)."""
    return dedupe_key(bridge.running.bridge.privacy.index, wamid, status)



@contextmanager
def sent_ago(h: BridgeHarness, seconds: float) -> Iterator[None]:
    """Payloads the simulator builds meanwhile carry a timestamp `seconds` old."""
    real_clock = h.wa.clock
    h.wa.clock = lambda: real_clock() - seconds
    try:
        yield
    finally:
        h.wa.clock = real_clock


async def queued(h: BridgeHarness, key: str) -> bool:
    """Stored for processing: in the webhook spool on its way to the queue (SQLite,
    bridge.db.spool), or in the queue (a row leaves the spool once queued)."""
    spool = h.running.bridge.webhooks.spool
    if spool is not None and any(row.dedupe_key == key for row in spool.head(10_000)):
        return True
    async with h.running.bridge.db.session() as session:
        found = await session.scalar(select(InboundRow.id).where(
            InboundRow.source == "whatsapp", InboundRow.dedupe_key == key))
    return found is not None


def test_the_window_ends_before_the_dedupe_keys_are_purged() -> None:
    assert REPLAY_WINDOW < FINISHED_RETENTION


async def test_old_message_and_status_are_acknowledged_counted_and_not_queued(
        bridge: BridgeHarness) -> None:
    _, before = await scrape(bridge)
    citizen = new_citizen()
    with sent_ago(bridge, FINISHED_RETENTION.total_seconds() + DAY):
        message = bridge.wa.text_message(citizen, "hola, ¿siguen ahí?")
        status = bridge.wa.status_update("wamid.viejo", "read", citizen)
    assert await bridge.wa.deliver(bridge.webhook_url, message) == 200
    assert await bridge.wa.deliver(bridge.webhook_url, status, field="messages") == 200
    assert not await queued(bridge, key_of(bridge, wamid_of(message)))
    assert not await queued(bridge, key_of(bridge, "wamid.viejo", "read"))
    _, after = await scrape(bridge)
    name = "civic_bridge_webhook_replays_total"
    assert value(after, name, part="message") == value(before, name, part="message") + 1
    assert value(after, name, part="status") == value(before, name, part="status") + 1


async def test_a_message_inside_the_window_is_queued(bridge: BridgeHarness) -> None:
    citizen = new_citizen()
    with sent_ago(bridge, REPLAY_WINDOW.total_seconds() - DAY):
        message = bridge.wa.text_message(citizen, "escribí hace días")
    assert await bridge.wa.deliver(bridge.webhook_url, message) == 200
    assert await queued(bridge, key_of(bridge, wamid_of(message)))
    await bridge.running.idle("whatsapp")
