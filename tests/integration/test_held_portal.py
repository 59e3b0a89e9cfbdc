"""A held staff message (DNI/IBAN) is released only from its own portal.

The same service-desk account is in many portals; a ✅ or «enviar» that points at a held
message of another portal must not send it, neither to that portal's citizen nor to the
citizen of the room where the confirmation was written.
"""

from __future__ import annotations

import asyncio

import pytest
from nio import RoomSendError

from bridge.types import EventID
from tests.fixtures.bridge import BridgeHarness
from tests.integration.test_whatsapp import (
    body_is,
    new_citizen,
    opt_in,
    to_citizen,
)

pytestmark = pytest.mark.integration


def _other_portal_count(bridge: BridgeHarness) -> float:
    value = bridge.running.bridge.metrics.registry.get_sample_value(
        "civic_bridge_held_confirmations_total", {"outcome": "other_portal"})
    return value or 0.0


async def test_held_message_is_released_only_from_its_own_portal(
        bridge: BridgeHarness) -> None:
    b = bridge.running.bridge
    citizen_a, citizen_b = new_citizen(), new_citizen("Juan López")
    a = await opt_in(bridge, citizen_a, "necesito la cuenta para pagar la tasa")
    try:
        bp = await opt_in(bridge, citizen_b, "otra consulta distinta")
        try:
            await a.seen(body_is("necesito la cuenta para pagar la tasa"))
            await bp.seen(body_is("otra consulta distinta"))
            iban = "Ingrese en ES91 2100 0418 4502 0005 1332, expediente 2026/88."
            held = await a.desk.send_text(a.room_id, iban)
            await a.seen(lambda ev: getattr(ev, "body", "").startswith("Retenido"))
            # The desk's device in B has spoken there: the bot holds its room key.
            await bp.desk.send_text(bp.room_id, "le atiendo enseguida")
            await bp.sent_to_citizen(
                lambda s: s.get("text", {}).get("body") == "le atiendo enseguida")
            before = _other_portal_count(bridge)

            # A ✅ in B pointing at A's message: Synapse itself refuses a reaction to an
            # event of another room, so the reply «enviar» is the way across.
            refused = await bp.desk.client.room_send(bp.room_id, "m.reaction", {
                "m.relates_to": {"rel_type": "m.annotation", "event_id": held, "key": "✅"}},
                ignore_unverified_devices=True)
            assert isinstance(refused, RoomSendError), refused
            # Confirmed from portal B by a reply: refused there, with a notice, counted.
            await bp.desk.client.room_send(bp.room_id, "m.room.message", {
                "msgtype": "m.text", "body": f"> <{bp.desk.user_id}> {iban}\n\nenviar",
                "m.relates_to": {"m.in_reply_to": {"event_id": held}}},
                ignore_unverified_devices=True)
            await bp.seen(lambda ev: "otra sala" in getattr(ev, "body", ""))
            assert _other_portal_count(bridge) == before + 1
            refusals = [e for e in await b.db.audit.list(limit=50)
                        if e.action == "message.release" and e.result == "refused"]
            assert refusals and refusals[0].object == f"room {bp.room_id}"
            await asyncio.sleep(0.5)  # anything wrongly queued has had time to go out
            assert not [s for s in bridge.wa.sent if iban in str(s)]
            # Nor did the «enviar» itself go to B's citizen: it was a confirmation.
            assert not [s for s in bridge.wa.sent if to_citizen(s, citizen_b)
                        and s.get("text", {}).get("body", "").endswith("enviar")]
            assert await b.db.held.get(EventID(held)) is not None  # still held

            # Confirmed in its own portal: it goes to A's citizen, and only to them.
            await a.desk.client.room_send(a.room_id, "m.reaction", {"m.relates_to": {
                "rel_type": "m.annotation", "event_id": held, "key": "✅"}},
                ignore_unverified_devices=True)
            await a.sent_to_citizen(lambda s: s.get("text", {}).get("body") == iban)
            await asyncio.sleep(0.5)
            went = [s for s in bridge.wa.sent if iban in str(s)]
            assert len(went) == 1 and to_citizen(went[0], citizen_a)
            assert await b.db.held.get(EventID(held)) is None
        finally:
            await bp.desk.close()
    finally:
        await a.desk.close()
