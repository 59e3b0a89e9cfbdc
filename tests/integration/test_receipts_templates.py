"""Staff read receipts and typing reach WhatsApp; staff send approved templates.

Real Synapse (E2EE on, staff as nio clients), the bridge, the Cloud API simulator over
HTTP. The bridge runs with `whatsapp.templates` for this module (restarted with it, and
back to the session's config at the end).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import pytest_asyncio
from nio import RoomReadMarkersResponse, RoomTypingResponse

from bridge.config import Config, TemplateConfig
from tests.fixtures.bridge import BridgeHarness
from tests.fixtures.wamids import opened
from tests.integration.test_whatsapp import (
    USED_IDENTIFIERS,
    Journey,
    admin_cli,
    body_is,
    new_citizen,
    opt_in,
    to_citizen,
    wait_until,
)

pytestmark = pytest.mark.integration

TEMPLATES = [
    TemplateConfig(name="seguimiento_consulta", category="utility",
                   description="Retomar una consulta pasadas 24 horas",
                   body="Hola, tenemos novedades sobre su consulta de {{asunto}}. Responda "
                        "a este mensaje para continuar.", parameters=["asunto"]),
    TemplateConfig(name="cita_confirmada", description="Confirmar una cita",
                   body="Su cita es el {{1}} a las {{2}}.", parameter_format="positional",
                   parameters=["fecha", "hora"]),
]


async def restart_with(h: BridgeHarness, config: Config) -> None:
    await h.running.stop()
    h.running.config = config
    await h.running.start()


def with_whatsapp(config: Config, **changes: Any) -> Config:
    return config.model_copy(update={"whatsapp": config.whatsapp.model_copy(update=changes)})


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def templated(bridge: BridgeHarness) -> AsyncIterator[BridgeHarness]:
    original = bridge.running.config
    await restart_with(bridge, with_whatsapp(original, templates=TEMPLATES))
    try:
        yield bridge
    finally:
        await restart_with(bridge, original)


def reads(h: BridgeHarness, wamid: str) -> list[dict[str, Any]]:
    """Mark-read calls (with or without typing) the simulator got for `wamid`."""
    return [s for s in h.wa.sent if s.get("status") == "read" and s.get("message_id") == wamid]


async def citizen_message(j: Journey, text: str) -> tuple[str, str]:
    """The citizen writes `text`; (its wamid, its event id in the portal)."""
    wamid = await j.write(j.h.wa.text_message(j.citizen, text))
    event = await j.seen(body_is(text))
    return wamid, event.event_id


async def read_up_to(j: Journey, event_id: str) -> None:
    answer = await j.desk.client.room_read_markers(j.room_id, event_id, event_id)
    assert isinstance(answer, RoomReadMarkersResponse), answer


async def typing(j: Journey, state: bool = True) -> None:
    answer = await j.desk.client.room_typing(j.room_id, state, timeout=30000)
    assert isinstance(answer, RoomTypingResponse), answer


async def test_staff_read_receipt_and_typing_reach_whatsapp(templated: BridgeHarness) -> None:
    h, b = templated, templated.running.bridge
    j = await opt_in(h, new_citizen(), "Hola, ¿me pueden ayudar?")
    try:
        first = await j.seen(body_is("Hola, ¿me pueden ayudar?"))
        link = await b.db.messages.by_event(first.event_id)
        assert link is not None
        wamid = opened(b, link)  # the citizen's message, as Meta named it
        await read_up_to(j, first.event_id)
        sent = await h.wa.wait_for_sent(lambda s: s in reads(h, wamid), timeout=30)
        assert sent == {"messaging_product": "whatsapp", "status": "read",
                        "message_id": wamid}

        # A later receipt that covers no newer message of the citizen sends nothing.
        reply = await j.desk.send_text(j.room_id, "Claro, dígame.")
        await j.sent_to_citizen(lambda s: s.get("text", {}).get("body") == "Claro, dígame.")
        await wait_until(lambda: b.db.messages.by_event(reply), 30, "reply linked")
        await read_up_to(j, reply)

        # The bridge's own receipts (here the bot's) are not staff's: no tick.
        wamid2, event2 = await citizen_message(j, "Es sobre el padrón")
        await b.api.receipt(b.ghosts.bot, j.room_id, event2)
        await asyncio.sleep(2)
        assert len(reads(h, wamid)) == 1
        assert reads(h, wamid2) == []

        # Staff typing: the typing indicator on the newest message, once per ~20 s.
        await typing(j)
        indicator = await h.wa.wait_for_sent(lambda s: s in reads(h, wamid2), timeout=30)
        assert indicator == {"messaging_product": "whatsapp", "status": "read",
                             "message_id": wamid2, "typing_indicator": {"type": "text"}}
        await typing(j, False)
        await typing(j)
        await asyncio.sleep(2)
        assert len(reads(h, wamid2)) == 1
        await typing(j, False)
        status, metrics = await h.running.call("GET", "/metrics", token=None)
        assert status == 200
        assert 'civic_bridge_whatsapp_receipts_total{kind="typing",outcome="rate_limited"}' \
            in metrics
        assert 'civic_bridge_whatsapp_receipts_total{kind="read",outcome="repeat"}' in metrics
    finally:
        await j.desk.close()


async def test_send_read_receipts_false_sends_neither(templated: BridgeHarness) -> None:
    h = templated
    templates_config = h.running.config
    await restart_with(h, with_whatsapp(templates_config, send_read_receipts=False))
    try:
        j = await opt_in(h, new_citizen(), "Buenas tardes")
        try:
            first = await j.seen(body_is("Buenas tardes"))
            link = await h.running.bridge.db.messages.by_event(first.event_id)
            assert link is not None
            wamid = opened(h.running.bridge, link)
            await read_up_to(j, first.event_id)
            await typing(j)
            # A later send proves the bridge processed what came before it.
            await j.desk.send_text(j.room_id, "Un momento, por favor.")
            await j.sent_to_citizen(
                lambda s: s.get("text", {}).get("body") == "Un momento, por favor.")
            await asyncio.sleep(2)
            assert reads(h, wamid) == []
            await typing(j, False)
        finally:
            await j.desk.close()
    finally:
        await restart_with(h, templates_config)


async def late_journey(h: BridgeHarness, first: str) -> Journey:
    """A citizen whose last message is 25 hours old: the window is closed."""
    real_clock = h.wa.clock
    h.wa.clock = lambda: real_clock() - 25 * 3600
    try:
        return await opt_in(h, new_citizen(), first)
    finally:
        h.wa.clock = real_clock


def notice_with(text: str) -> Any:
    return lambda ev: text in getattr(ev, "body", "")


async def test_templates_listed_and_sent_after_the_window(templated: BridgeHarness) -> None:
    h, b = templated, templated.running.bridge
    j = await late_journey(h, "Escribí el viernes")
    try:
        first = await j.seen(body_is("Escribí el viernes"))
        link = await b.db.messages.by_event(first.event_id)
        assert link is not None
        wamid = opened(b, link)
        # No typing indicator while staff could not answer with free text.
        await typing(j)
        await j.desk.send_text(j.room_id, "!plantilla")
        listing = await j.seen(notice_with("Plantillas aprobadas"))
        assert "seguimiento_consulta" in listing.body and "cita_confirmada" in listing.body
        assert "Retomar una consulta pasadas 24 horas" in listing.body
        assert not [s for s in h.wa.sent if to_citizen(s, j.citizen)
                    and "plantilla" in str(s).lower()]

        # Free text is refused with the window notice; a template goes.
        await j.desk.send_text(j.room_id, "¿Sigue necesitando ayuda?")
        window = await j.seen(notice_with("más de 24 horas"))
        assert "!plantilla" in window.body
        await j.desk.send_text(j.room_id,
                               "!plantilla seguimiento_consulta asunto=su empadronamiento")
        sent = await j.sent_to_citizen(lambda s: s.get("type") == "template")
        assert sent["template"]["name"] == "seguimiento_consulta"
        assert sent["template"]["language"]["code"] == "es"
        assert sent["template"]["components"] == [{"type": "body", "parameters": [
            {"type": "text", "parameter_name": "asunto", "text": "su empadronamiento"}]}]
        assert not [s for s in h.wa.sent if to_citizen(s, j.citizen)
                    and s.get("text", {}).get("body") == "¿Sigue necesitando ayuda?"]
        shown = await j.seen(notice_with("Plantilla «seguimiento_consulta» enviada"))
        assert "novedades sobre su consulta de su empadronamiento." in shown.body

        # Bad parameters: refused with a notice before anything is queued.
        queued = await b.db.outbox.depth()
        await j.desk.send_text(j.room_id, '!plantilla cita_confirmada "3 de mayo"')
        await j.seen(notice_with("necesita 2 valores"))
        await j.desk.send_text(j.room_id, "!plantilla seguimiento_consulta llame al 612345678")
        await j.seen(notice_with("datos personales"))
        await j.desk.send_text(j.room_id, "!plantilla no_existe x")
        await j.seen(notice_with("No hay ninguna plantilla aprobada"))
        assert await b.db.outbox.depth() <= queued
        templates_sent = [s for s in h.wa.sent if to_citizen(s, j.citizen)
                          and s.get("type") == "template"]
        assert len(templates_sent) == 1
        async def typing_refused() -> bool:
            metrics = (await h.running.call("GET", "/metrics", token=None))[1]
            if 'kind="typing",outcome="window_closed"' in metrics:
                return True
            # Typing is ephemeral: Synapse does not retry it to an appservice it saw
            # down (the fixtures restart the bridge), so start typing again.
            await typing(j, False)
            await typing(j)
            await asyncio.sleep(1)
            return False
        await wait_until(typing_refused, 60, "typing seen and not sent")
        assert not [s for s in reads(h, wamid) if "typing_indicator" in s]
        await typing(j, False)

        # The citizen answers: the window reopens for free text.
        await j.write(h.wa.text_message(j.citizen, "Sí, gracias"))
        await j.seen(body_is("Sí, gracias"))
        await j.desk.send_text(j.room_id, "Perfecto, seguimos.")
        await j.sent_to_citizen(lambda s: s.get("text", {}).get("body") == "Perfecto, seguimos.")

        actions = [(e.action, e.result, e.reason) for e in await b.db.audit.list(limit=30)
                   if e.object == f"room {j.room_id}"]
        assert ("template.send", "queued", "template seguimiento_consulta") in actions
        assert ("template.send", "refused_parameters", "template cita_confirmada") in actions
        assert ("template.send", "unknown", "unknown template") in actions
    finally:
        await j.desk.close()


async def test_admin_route_sends_a_template_and_is_audited(templated: BridgeHarness,
                                                           tmp_path: Path) -> None:
    h, b = templated, templated.running.bridge
    j = await late_journey(h, "Necesito una cita")
    try:
        await j.seen(body_is("Necesito una cita"))
        path = f"/admin/v1/portals/{quote(j.room_id, safe='')}/templates"
        body = {"name": "cita_confirmada", "parameters": ["3 de mayo", "10:30"]}
        assert (await h.running.call("POST", path, body, token=None))[0] == 401
        status, answer = await h.running.call("POST", path, body)
        assert status == 202, answer
        assert answer["queued"] is True and answer["text"] == "Su cita es el 3 de mayo a las 10:30."
        sent = await j.sent_to_citizen(lambda s: s.get("type") == "template")
        assert sent["template"]["name"] == "cita_confirmada"
        assert sent["template"]["components"] == [{"type": "body", "parameters": [
            {"type": "text", "text": "3 de mayo"}, {"type": "text", "text": "10:30"}]}]
        await j.seen(notice_with("enviada a WhatsApp por la administración"))
        # WhatsApp's answer is linked to the room's notice: a reply quotes it.
        await wait_until(lambda: b.db.messages.by_event(answer["event_id"]), 30, "link")

        for bad, code in [({"name": "cita_confirmada", "parameters": ["3 de mayo"]}, 400),
                          ({"name": "cita_confirmada",
                            "parameters": ["12345678Z", "10:30"]}, 400),
                          ({"name": "cita_confirmada", "parameters": ["a", "b"], "x": 1}, 400),
                          ({"name": "no_existe", "parameters": []}, 404)]:
            status, error = await h.running.call("POST", path, bad)
            assert status == code, (bad, error)
            assert "12345678Z" not in str(error)
        not_portal = f"/admin/v1/portals/{quote('!nope:x', safe='')}/templates"
        assert (await h.running.call("POST", not_portal, body))[0] == 404

        # The CLI verb calls the same route.
        out = await admin_cli(h, tmp_path, "template", j.room_id, "seguimiento_consulta",
                              "asunto=su cita")
        assert "queued: True" in out
        await j.sent_to_citizen(lambda s: s.get("type") == "template" and s["template"][
            "name"] == "seguimiento_consulta")

        entries = [(e.actor, e.action, e.result) for e in await b.db.audit.list(limit=30)
                   if e.object == f"room {j.room_id}"]
        assert entries.count(("api:admin", "template.send", "queued")) == 2
        assert ("api:admin", "template.send", "refused_parameters") in entries
        sent_count = len([s for s in h.wa.sent if to_citizen(s, j.citizen)
                          and s.get("type") == "template"])
        assert sent_count == 2
    finally:
        await j.desk.close()


async def test_no_wamid_or_identifier_in_the_logs(templated: BridgeHarness) -> None:
    """No log record of the run (before redaction) carries a wamid this module's
    receipts and templates used, nor a test citizen's number or BSUID. That includes
    third-party debug logs such as aiosqlite's SQL parameters: the database is given
    keyed hashes and ciphertexts of wamids only."""
    h = templated
    used = set(USED_IDENTIFIERS)
    wamids = {s["message_id"] for s in h.wa.sent if s.get("status") == "read"}
    # Sends to the citizens these tests made (other modules' tests, such as one that
    # writes clear wamids into a database on purpose, use the same simulator).
    wamids |= {w for w, s in zip(h.wa.sent_ids, h.wa.sent, strict=True)
               if w and (s.get("to") in used or s.get("recipient") in used)}
    assert wamids and used
    ours = [line for line in h.log_lines if line.startswith("bridge")]
    assert ours
    for secrets_, lines in ((wamids, h.log_lines), (used, h.log_lines)):
        for secret in secrets_:
            found = next((x for x in lines if secret in x), None)
            assert found is None, f"logged: {found.replace(secret, '<SECRET>')[:300]}"
