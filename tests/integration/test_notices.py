"""Notices of availability end to end: Cloud API simulator ⇄ bridge (admin API, outbox,
webhooks), over real HTTP. DPO requirements 1-5."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from sqlalchemy import text

from bridge.admin.notices import LABEL, Notices
from bridge.db import Citizen, ConsentRecord
from bridge.devtools.simulator import SimulatedUser
from bridge.errors import Unavailable
from bridge.types import Pseudonym
from bridge.whatsapp.consent import OPT_IN_BUTTON, OPT_OUT_BUTTON
from bridge.whatsapp.notice_consent import NOTICES_IN_BUTTON, NOTICES_OUT_BUTTON, consent_hash
from bridge.whatsapp.subscriptions import SUBSCRIPTION_CODE, NoticeSubscriptions
from tests.fixtures.bridge import BridgeHarness
from tests.integration.test_whatsapp import (
    USED_IDENTIFIERS,
    admin_cli,
    new_citizen,
    to_citizen,
    wait_until,
)

pytestmark = pytest.mark.integration

RESPONSES: list[str] = []  # every admin API answer of this module, for the privacy sweep


async def api(h: BridgeHarness, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    status, data = await h.running.call(method, path, body)
    RESPONSES.append(json.dumps(data, ensure_ascii=False))
    return status, data


async def write(h: BridgeHarness, value: dict[str, Any]) -> str:
    assert await h.wa.deliver(h.webhook_url, value) == 200
    return str(value["messages"][0]["id"]) if "messages" in value else ""


def buttons(sent: dict[str, Any]) -> list[str]:
    if sent.get("type") != "interactive":
        return []
    # (Interactive lists, the room picker of bridge.rooms_wa, have rows, not buttons.)
    return [b["reply"]["id"] for b in sent["interactive"]["action"].get("buttons", [])]


def templates_to(h: BridgeHarness, citizen: SimulatedUser) -> list[dict[str, Any]]:
    return [s for s in h.wa.sent if to_citizen(s, citizen) and s.get("type") == "template"]


async def row(h: BridgeHarness, citizen: SimulatedUser) -> Citizen:
    b = h.running.bridge
    found = await wait_until(lambda: b.db.citizens.by_index(b.privacy.index.digest(
        citizen.user_id)), 30, "citizen row")
    assert isinstance(found, Citizen)
    return found


async def notices_state(h: BridgeHarness, citizen: SimulatedUser) -> str | None:
    sub = await h.running.bridge.db.subscriptions.get((await row(h, citizen)).id)
    return None if sub is None else sub.state


async def in_state(h: BridgeHarness, citizen: SimulatedUser, state: str) -> None:
    async def check() -> bool:
        return await notices_state(h, citizen) == state
    await wait_until(check, 30, f"notices {state}")


async def subscribe(h: BridgeHarness, citizen: SimulatedUser) -> str:
    """AVISOS → consent text with buttons → «Acepto» → confirmation; the code."""
    await write(h, h.wa.text_message(citizen, "Avisos"))
    await h.wa.wait_for_sent(lambda s: to_citizen(s, citizen) and buttons(s) == [
        NOTICES_IN_BUTTON, NOTICES_OUT_BUTTON], timeout=30)
    await write(h, h.wa.button_reply(citizen, NOTICES_IN_BUTTON, "Acepto"))
    confirm = await h.wa.wait_for_sent(
        lambda s: to_citizen(s, citizen) and buttons(s) == [NOTICES_OUT_BUTTON], timeout=30)
    code = SUBSCRIPTION_CODE.search(confirm["interactive"]["body"]["text"])
    assert code is not None
    await in_state(h, citizen, "granted")
    return code.group()


async def send(h: BridgeHarness, recipient: str, reference: str) -> tuple[int, Any]:
    return await api(h, "POST", "/admin/v1/notices",
                     {"recipient": recipient, "reference": reference})


async def entry(h: BridgeHarness, reference: str) -> dict[str, Any]:
    status, data = await api(h, "GET", "/admin/v1/notices?reference=" + quote(reference))
    assert status == 200 and data["label"] == LABEL
    [found] = data["notices"]
    return dict(found)


async def test_notices_consent_journey(bridge: BridgeHarness) -> None:
    h, b = bridge, bridge.running.bridge
    citizen = new_citizen()
    await write(h, h.wa.text_message(citizen, "  AVÍSOS "))
    text_sent = await h.wa.wait_for_sent(lambda s: to_citizen(s, citizen) and buttons(s) == [
        NOTICES_IN_BUTTON, NOTICES_OUT_BUTTON], timeout=30)
    body = text_sent["interactive"]["body"]["text"]
    assert "Ayuntamiento de Ejemplo" in body and "https://sede.ejemplo.invalid/" in body
    await in_state(h, citizen, "prompted")

    # Keyword fallback: the keyword again, once the text was shown, accepts.
    accepted = await write(h, h.wa.text_message(citizen, "avisos"))
    confirm = await h.wa.wait_for_sent(
        lambda s: to_citizen(s, citizen) and buttons(s) == [NOTICES_OUT_BUTTON], timeout=30)
    await in_state(h, citizen, "granted")
    citizen_row = await row(h, citizen)
    sub = await b.db.subscriptions.get(citizen_row.id)
    assert sub is not None and sub.code in confirm["interactive"]["body"]["text"]
    assert sub.code != citizen_row.pseudonym_code
    # Notices only: no chat notice, no ghost, no portal, chat consent untouched.
    assert citizen_row.consent_state == "unknown" and citizen_row.ghost_user_id is None
    assert await b.db.rooms.portal_for(citizen_row.id) is None
    assert not any(to_citizen(s, citizen) and OPT_IN_BUTTON in buttons(s) for s in h.wa.sent)

    records = await b.db.consent.for_citizen(citizen_row.id)
    assert [(r.purpose, r.state) for r in records] == [("notices", "prompted"),
                                                       ("notices", "granted")]
    granted = records[-1]
    assert (granted.notice_version, granted.notice_hash, granted.channel, granted.language) == (
        "1", consent_hash(h.running.config), "whatsapp", "es")
    # The evidence is the citizen's message, named by the keyed hash of its wamid.
    assert granted.evidence == "wamid-hmac:" + b.privacy.index.wamid(accepted)

    # Opt-out of notices only, by keyword: confirmed, withdrawn, chat still untouched.
    await write(h, h.wa.text_message(citizen, "Baja  avisos"))
    await h.wa.wait_for_sent(lambda s: to_citizen(s, citizen) and "ya no recibirá avisos"
                             in s.get("text", {}).get("body", ""), timeout=30)
    await in_state(h, citizen, "withdrawn")
    assert (await row(h, citizen)).consent_state == "unknown"

    # Back in (same code), then out by the button on the confirmation.
    assert await subscribe(h, citizen) == sub.code
    await write(h, h.wa.button_reply(citizen, NOTICES_OUT_BUTTON, "Baja de avisos"))
    await in_state(h, citizen, "withdrawn")

    # A plain BAJA withdraws every purpose granted, and says so.
    await subscribe(h, citizen)
    await write(h, h.wa.text_message(citizen, "BAJA"))
    done = await h.wa.wait_for_sent(lambda s: to_citizen(s, citizen) and "También hemos "
                                    "anulado" in s.get("text", {}).get("body", ""), timeout=30)
    assert "no reenviaremos" in done["text"]["body"]
    await in_state(h, citizen, "withdrawn")
    states = [(r.purpose, r.state) for r in await b.db.consent.for_citizen(citizen_row.id)]
    assert states[-2:] in ([("notices", "withdrawn"), ("mirroring", "refused")],
                           [("mirroring", "refused"), ("notices", "withdrawn")])
    actions = {(e.action, e.reason) for e in await b.db.audit.list(limit=50)}
    assert ("consent.granted", "notices") in actions and ("consent.withdrawn", "notices") in actions


async def test_chat_refusal_button_keeps_notices(bridge: BridgeHarness) -> None:
    h = bridge
    citizen = new_citizen()
    await subscribe(h, citizen)
    await write(h, h.wa.text_message(citizen, "hola, una pregunta"))
    await h.wa.wait_for_sent(lambda s: to_citizen(s, citizen) and OPT_IN_BUTTON in buttons(s),
                             timeout=30)
    await write(h, h.wa.button_reply(citizen, OPT_OUT_BUTTON, "No, gracias"))
    await wait_until(lambda: _chat_state(h, citizen, "refused"), 30, "chat refused")
    assert await notices_state(h, citizen) == "granted"


async def _chat_state(h: BridgeHarness, citizen: SimulatedUser, state: str) -> bool:
    return (await row(h, citizen)).consent_state == state


async def test_notice_is_one_fixed_template_and_statuses_fill_the_log(
        bridge: BridgeHarness) -> None:
    h, b = bridge, bridge.running.bridge
    citizen = new_citizen()
    code = await subscribe(h, citizen)
    reference = "NOT-2026/000123"
    status, data = await send(h, code.lower(), reference)  # codes are case-insensitive
    assert status == 202, data
    pseudonym = (await row(h, citizen)).pseudonym_code
    assert (data["reference"], data["pseudonym"], data["status"]) == (reference, pseudonym,
                                                                      "queued")
    assert data["template"] == {"name": "aviso_puesta_disposicion", "language": "es",
                                "version": "7"}
    assert data["proof_of_notification"] is False and data["label"] == LABEL
    assert data["requested_by"] == "api:admin"

    sent = await h.wa.wait_for_sent(
        lambda s: to_citizen(s, citizen) and s.get("type") == "template", timeout=30)
    assert sent["template"] == {
        "name": "aviso_puesta_disposicion",
        "language": {"code": "es", "policy": "deterministic"},
        "components": [{"type": "body", "parameters": [
            {"type": "text", "text": "Ayuntamiento de Ejemplo"}]}]}
    assert set(sent) == {"messaging_product", "recipient_type", "to", "type", "template",
                         "biz_opaque_callback_data"}
    assert re.fullmatch(r"cb1\.[0-9]+", sent["biz_opaque_callback_data"])  # the outbox row
    assert reference not in json.dumps(sent) and "000123" not in json.dumps(sent)

    # The same request again: the same entry, nothing sent again.
    status, again = await send(h, code, reference)
    assert status == 200 and again["id"] == data["id"]
    await asyncio.sleep(1.5)
    assert len(templates_to(h, citizen)) == 1

    await wait_until(lambda: _has_wamid(h, data["id"]), 30, "wamid logged")
    logged = await b.db.notices.get(data["id"])
    wamid = h.wa.sent_ids[h.wa.sent.index(sent)]
    assert wamid is not None
    assert logged is not None and logged.wamid_hash == b.privacy.index.wamid(wamid)
    await write(h, h.wa.status_update(wamid, "delivered", citizen))
    await write(h, h.wa.status_update(wamid, "read", citizen))
    await wait_until(lambda: _status_is(h, reference, "read"), 30, "read")
    shown = await entry(h, reference)
    assert shown["sent_at"] and shown["delivered_at"] and shown["read_at"]
    # Whether WhatsApp's message id is on record, never the id (it embeds the number).
    assert shown["has_wamid"] is True and "wamid" not in shown and shown["label"] == LABEL
    assert wamid not in json.dumps(shown)

    actions = [(e.action, e.object, e.result, e.reason) for e in await b.db.audit.list(limit=20)]
    assert ("notice.send", f"pseudonym {pseudonym}", "queued", f"reference {reference}") in actions
    assert ("notice.send", f"pseudonym {pseudonym}", "repeat", f"reference {reference}") in actions
    status, metrics = await h.running.call("GET", "/metrics", token=None)
    assert 'civic_bridge_notices_total{outcome="queued"}' in metrics
    assert 'civic_bridge_notices_total{outcome="read"}' in metrics


async def _has_wamid(h: BridgeHarness, notice_id: int) -> bool:
    notice = await h.running.bridge.db.notices.get(notice_id)
    return notice is not None and notice.wamid_hash is not None


async def _status_is(h: BridgeHarness, reference: str, status: str) -> bool:
    return bool((await entry(h, reference))["status"] == status)


async def test_failed_status_records_the_error(bridge: BridgeHarness) -> None:
    h = bridge
    citizen = new_citizen()
    code = await subscribe(h, citizen)
    status, data = await send(h, code, "NOT-2026/FAIL")
    assert status == 202
    await wait_until(lambda: _has_wamid(h, data["id"]), 30, "wamid logged")
    sent = next(s for s in reversed(h.wa.sent)
                if to_citizen(s, citizen) and s.get("type") == "template")
    wamid = h.wa.sent_ids[h.wa.sent.index(sent)]
    assert wamid is not None
    await write(h, h.wa.status_update(wamid, "failed", citizen,
                                      errors=[(131026, "Message undeliverable")]))
    await wait_until(lambda: _status_is(h, "NOT-2026/FAIL", "failed"), 30, "failed")
    shown = await entry(h, "NOT-2026/FAIL")
    assert shown["failed_at"] and shown["error"] == "Message undeliverable"


async def test_without_consent_409_and_nothing_sent(bridge: BridgeHarness) -> None:
    h = bridge
    prompted = new_citizen()
    await write(h, h.wa.text_message(prompted, "AVISOS"))
    await in_state(h, prompted, "prompted")
    sub = await h.running.bridge.db.subscriptions.get((await row(h, prompted)).id)
    assert sub is not None
    status, data = await send(h, sub.code, "NOT-2026/NC1")
    assert status == 409 and data["errcode"] == "CB_NO_NOTICES_CONSENT"

    withdrawn = new_citizen()
    code = await subscribe(h, withdrawn)
    await write(h, h.wa.text_message(withdrawn, "baja avisos"))
    await in_state(h, withdrawn, "withdrawn")
    status, data = await send(h, code, "NOT-2026/NC2")
    assert status == 409 and data["errcode"] == "CB_NO_NOTICES_CONSENT"

    status, data = await send(h, "BCDF-BCDF-BCDF", "NOT-2026/NC3")
    assert status == 404 and data["errcode"] == "M_NOT_FOUND"
    status, data = await send(h, "+34600000000", "NOT-2026/NC4")
    assert status == 400 and data["error"].startswith("recipient:")
    await asyncio.sleep(1)
    assert templates_to(h, prompted) == [] and templates_to(h, withdrawn) == []
    for ref in ("NOT-2026/NC1", "NOT-2026/NC2", "NOT-2026/NC3"):
        assert (await api(h, "GET", f"/admin/v1/notices?reference={quote(ref)}"))[1][
            "notices"] == []


@pytest.mark.parametrize("field", ["body", "text", "link", "url", "attachment"])
async def test_content_cannot_be_passed(bridge: BridgeHarness, field: str) -> None:
    h = bridge
    citizen = new_citizen()
    code = await subscribe(h, citizen)
    status, data = await api(h, "POST", "/admin/v1/notices", {
        "recipient": code, "reference": f"NOT-2026/C-{field}", field: "Resolución: denegada"})
    assert status == 400 and data["errcode"] == "M_INVALID_PARAM"
    assert data["error"].startswith(f"{field}: unknown field")
    await asyncio.sleep(0.5)
    assert templates_to(h, citizen) == []
    assert (await api(h, "GET", f"/admin/v1/notices?reference=NOT-2026/C-{field}"))[1][
        "notices"] == []


async def test_graph_500_then_200_delivers_exactly_once(bridge: BridgeHarness) -> None:
    h = bridge
    citizen = new_citizen()
    code = await subscribe(h, citizen)
    h.wa.fail_next(code=1, http_status=500)
    status, _ = await send(h, code, "NOT-2026/RETRY")
    assert status == 202
    await h.wa.wait_for_sent(lambda s: to_citizen(s, citizen) and s.get("type") == "template",
                             timeout=30)
    await asyncio.sleep(2)
    assert len(templates_to(h, citizen)) == 1
    assert (await entry(h, "NOT-2026/RETRY"))["status"] == "sent"
    assert any(r.status == 500 for r in h.wa.requests)


async def test_queued_notice_survives_a_restart_and_is_sent_once(bridge: BridgeHarness) -> None:
    h = bridge
    citizen = new_citizen()
    code = await subscribe(h, citizen)
    await h.running.bridge.outbox.stop()  # persisted, not attempted, then the process goes
    status, _ = await send(h, code, "NOT-2026/RESTART")
    assert status == 202
    assert templates_to(h, citizen) == []
    await h.running.stop()
    await h.running.start()
    await h.wa.wait_for_sent(lambda s: to_citizen(s, citizen) and s.get("type") == "template",
                             timeout=60)
    await asyncio.sleep(1.5)
    assert len(templates_to(h, citizen)) == 1


async def test_opt_out_cancels_a_pending_notice(bridge: BridgeHarness) -> None:
    h, b = bridge, bridge.running.bridge
    citizen = new_citizen()
    code = await subscribe(h, citizen)
    await b.outbox.stop()
    try:
        status, _ = await send(h, code, "NOT-2026/CANCEL")
        assert status == 202
        await write(h, h.wa.text_message(citizen, "BAJA AVISOS"))
        await in_state(h, citizen, "withdrawn")
        await wait_until(lambda: _status_is(h, "NOT-2026/CANCEL", "failed"), 30, "cancelled")
    finally:
        b.outbox.start()
    await h.wa.wait_for_sent(lambda s: to_citizen(s, citizen) and "ya no recibirá avisos"
                             in s.get("text", {}).get("body", ""), timeout=30)
    await asyncio.sleep(1)
    assert templates_to(h, citizen) == []
    assert (await entry(h, "NOT-2026/CANCEL"))["error"] == "consent withdrawn"


async def test_recipient_by_ghost_id_for_a_chat_citizen(bridge: BridgeHarness) -> None:
    h, b = bridge, bridge.running.bridge
    citizen = new_citizen()
    await write(h, h.wa.text_message(citizen, "hola"))
    await h.wa.wait_for_sent(lambda s: to_citizen(s, citizen) and OPT_IN_BUTTON in buttons(s),
                             timeout=30)
    await write(h, h.wa.button_reply(citizen, OPT_IN_BUTTON, "Acepto"))
    await wait_until(lambda: _chat_state(h, citizen, "granted"), 60, "chat granted")
    ghost = (await row(h, citizen)).ghost_user_id
    assert ghost is not None
    status, data = await send(h, ghost, "NOT-2026/GHOST")
    assert status == 409  # the chat consent is not a notices consent
    await subscribe(h, citizen)
    status, data = await send(h, ghost, "NOT-2026/GHOST")
    assert status == 202 and data["pseudonym"] == (await row(h, citizen)).pseudonym_code
    await h.wa.wait_for_sent(lambda s: to_citizen(s, citizen) and s.get("type") == "template",
                             timeout=30)
    _, listed = await api(h, "GET", "/admin/v1/notices?recipient=" + quote(ghost))
    assert [n["reference"] for n in listed["notices"]] == ["NOT-2026/GHOST"]
    assert b.config.notices.enabled


async def test_cli_send_and_list(bridge: BridgeHarness, tmp_path: Path) -> None:
    h = bridge
    citizen = new_citizen()
    code = await subscribe(h, citizen)
    out = await admin_cli(h, tmp_path, "notice", "send", code, "NOT-2026/CLI")
    assert "NOT-2026/CLI" in out and "queued" in out and LABEL in out
    await h.wa.wait_for_sent(lambda s: to_citizen(s, citizen) and s.get("type") == "template",
                             timeout=30)
    out = await admin_cli(h, tmp_path, "notice", "list", "--reference", "NOT-2026/CLI")
    assert "NOT-2026/CLI" in out and LABEL in out
    listed = json.loads(await admin_cli(h, tmp_path, "--json", "notice", "list",
                                        "--recipient", code))
    assert [n["reference"] for n in listed["notices"]] == ["NOT-2026/CLI"]
    RESPONSES.append(out)


async def test_export_erasure_and_retention(bridge: BridgeHarness) -> None:
    h, b = bridge, bridge.running.bridge
    citizen = new_citizen()
    code = await subscribe(h, citizen)
    assert (await send(h, code, "NOT-2026/EXP"))[0] == 202
    pseudonym = (await row(h, citizen)).pseudonym_code
    path = "/admin/v1/citizens/" + quote(code)
    # The export carries identifiers by design (for the citizen only): not swept.
    status, data = await h.running.call("GET", path + "/export?reason=acceso%2001")
    assert status == 200, data
    assert data["matrix_user_id"] is None and data["pseudonym"] == pseudonym
    assert data["notices"]["consent_state"] == "granted"
    assert data["notices"]["subscription_code"] == code
    assert [n["reference"] for n in data["notices"]["log"]] == ["NOT-2026/EXP"]
    assert data["notices"]["log"][0]["label"] == LABEL
    assert ("notices", "granted") in {(r["purpose"], r["state"]) for r in data["consent_records"]}

    status, erased = await api(h, "DELETE", path, {"reason": "supresión 02"})
    assert status == 200 and any("notice log" in k for k in erased["kept"])
    assert await b.db.subscriptions.by_code(code) is None
    kept = await b.db.notices.list(pseudonym=Pseudonym(pseudonym))
    assert [n.reference for n in kept] == ["NOT-2026/EXP"] and kept[0].citizen_id is None
    records = await b.db.consent.for_pseudonym(Pseudonym(pseudonym))
    assert (records[-1].purpose, records[-1].state, records[-1].evidence) == (
        "notices", "withdrawn", "erasure")
    assert (await send(h, code, "NOT-2026/EXP2"))[0] == 404

    # Retention: an entry older than notices.log_retention_days goes with the next purge.
    async with b.db.engine.begin() as conn:
        old = datetime(2000, 1, 1) if b.db.dialect == "sqlite" else datetime(2000, 1, 1,
                                                                             tzinfo=UTC)
        await conn.execute(text("UPDATE notices SET created_at = :t WHERE id = :i"),
                           {"t": old, "i": kept[0].id})
    deleted = await b.purge(datetime.now(UTC))
    assert deleted["notice log entries"] == 1
    assert await b.db.notices.list(pseudonym=Pseudonym(pseudonym)) == []
    assert any("1 notice log entries" in line for line in h.log_lines)


async def withdraw(h: BridgeHarness, recipient: str, **body: Any) -> tuple[int, Any]:
    """An assisted withdrawal; `body` overrides (None drops) the valid defaults."""
    full = {"recipient": recipient, "staff_id": staff(h), "evidence": "REG-2026/E-000417",
            **body}
    return await api(h, "POST", "/admin/v1/notices/withdrawals",
                     {k: v for k, v in full.items() if v is not None})


def staff(h: BridgeHarness) -> str:
    return f"@garcia:{h.running.config.homeserver.domain}"


async def notices_records(h: BridgeHarness, citizen: SimulatedUser) -> list[ConsentRecord]:
    return [r for r in await h.running.bridge.db.consent.for_citizen((await row(h, citizen)).id)
            if r.purpose == "notices"]


async def test_assisted_withdrawal_is_recorded_and_cancels_unsent_notices(
        bridge: BridgeHarness) -> None:
    h, b = bridge, bridge.running.bridge
    citizen = new_citizen()
    code = await subscribe(h, citizen)
    pseudonym = (await row(h, citizen)).pseudonym_code
    messages = len([s for s in h.wa.sent if to_citizen(s, citizen)])
    await b.outbox.stop()
    try:
        assert (await send(h, code, "NOT-2026/DESK"))[0] == 202  # queued, not yet sent
        status, data = await withdraw(h, code)
        assert (status, data) == (200, {"pseudonym": pseudonym, "state": "withdrawn",
                                        "withdrawn": True})
        assert await notices_state(h, citizen) == "withdrawn"
        shown = await entry(h, "NOT-2026/DESK")
        assert (shown["status"], shown["error"]) == ("failed", "consent withdrawn")
    finally:
        b.outbox.start()

    record = (await notices_records(h, citizen))[-1]
    assert (record.state, record.channel, record.staff_id, record.evidence) == (
        "withdrawn", "in_person", staff(h), "REG-2026/E-000417")
    assert (record.notice_version, record.notice_hash, record.language) == (
        "1", consent_hash(h.running.config), "es")
    audit = [(e.actor, e.action, e.result, e.reason) for e in await b.db.audit.list(limit=50)
             if e.object == f"pseudonym {pseudonym}" and e.action == "consent.withdrawn"]
    assert audit == [("api:admin", "consent.withdrawn", "ok", "notices")]

    status, data = await send(h, code, "NOT-2026/DESK2")
    assert status == 409 and data["errcode"] == "CB_NO_NOTICES_CONSENT"
    # Neither the cancelled notice nor any confirmation reaches the citizen's WhatsApp.
    await asyncio.sleep(1.5)
    assert len([s for s in h.wa.sent if to_citizen(s, citizen)]) == messages


async def test_assisted_withdrawal_repeat_and_nothing_to_withdraw(
        bridge: BridgeHarness) -> None:
    h = bridge
    citizen = new_citizen()
    code = await subscribe(h, citizen)
    pseudonym = (await row(h, citizen)).pseudonym_code
    # A double submission at the desk: one withdrawal, recorded once.
    first, second = await asyncio.gather(withdraw(h, code), withdraw(h, code))
    assert sorted([first[1]["withdrawn"], second[1]["withdrawn"]]) == [False, True]
    records = await notices_records(h, citizen)
    assert [r.state for r in records][-2:] == ["granted", "withdrawn"]
    for evidence in ("REG-2026/E-000417", "REG-2026/E-000418"):  # a retry, a second request
        status, data = await withdraw(h, code, evidence=evidence)
        assert (status, data) == (200, {"pseudonym": pseudonym, "state": "withdrawn",
                                        "withdrawn": False})
    assert await notices_records(h, citizen) == records

    prompted = new_citizen()  # shown the text, never granted: nothing to withdraw
    await write(h, h.wa.text_message(prompted, "AVISOS"))
    await in_state(h, prompted, "prompted")
    sub = await h.running.bridge.db.subscriptions.get((await row(h, prompted)).id)
    assert sub is not None
    status, data = await withdraw(h, sub.code)
    assert status == 200 and (data["state"], data["withdrawn"]) == ("prompted", False)
    assert await notices_state(h, prompted) == "prompted"
    assert [r.state for r in await notices_records(h, prompted)] == ["prompted"]


async def test_assisted_withdrawal_refuses_bad_requests(bridge: BridgeHarness) -> None:
    h, b = bridge, bridge.running.bridge
    citizen = new_citizen()
    code = await subscribe(h, citizen)
    domain, prefix = b.config.homeserver.domain, b.config.appservice.ghost_prefix
    for body, field in [({"reason": "en ventanilla"}, "reason"),
                        ({"staff_id": None}, "staff_id"),
                        ({"staff_id": "garcia"}, "staff_id"),
                        ({"staff_id": b.ghosts.bot}, "staff_id"),
                        ({"staff_id": f"@{prefix}hjklmnpq:{domain}"}, "staff_id"),
                        ({"evidence": None}, "evidence"),
                        ({"evidence": "12345678Z"}, "evidence"),
                        ({"evidence": "+34612345678"}, "evidence")]:
        status, data = await withdraw(h, code, **body)
        assert (status, data["errcode"]) == (400, "M_INVALID_PARAM"), body
        assert data["error"].startswith(f"{field}:"), data
    assert await notices_state(h, citizen) == "granted"
    assert [r.state for r in await notices_records(h, citizen)][-1] == "granted"

    for recipient in ("BCDF-BCDF-BCDF", f"@nobody:{domain}"):
        status, data = await withdraw(h, recipient)
        assert (status, data["errcode"]) == (404, "M_NOT_FOUND")


async def test_assisted_withdrawal_needs_notices_on(bridge: BridgeHarness) -> None:
    h, b = bridge, bridge.running.bridge
    citizen = new_citizen()
    code = await subscribe(h, citizen)
    off = b.config.model_copy(update={"notices": b.config.notices.model_copy(
        update={"enabled": False})})
    notices = Notices(off, b.db, b.outbox, b.metrics,
                      NoticeSubscriptions(off, b.db, b.outbox, b.metrics), b.ghosts.is_ours)
    with pytest.raises(Unavailable):
        await notices.withdraw("admin-api", {"recipient": code, "staff_id": staff(h),
                                             "evidence": "REG-2026/E-1"})
    assert await notices_state(h, citizen) == "granted"


async def test_cli_withdraw(bridge: BridgeHarness, tmp_path: Path) -> None:
    h = bridge
    citizen = new_citizen()
    code = await subscribe(h, citizen)
    pseudonym = (await row(h, citizen)).pseudonym_code
    args = ("notice", "withdraw", code, "--staff-id", staff(h), "--evidence", "REG-2026/E-CLI")
    out = await admin_cli(h, tmp_path, *args)
    assert f"notices consent of {pseudonym} withdrawn" in out
    record = (await notices_records(h, citizen))[-1]
    assert (record.channel, record.staff_id, record.evidence) == (
        "in_person", staff(h), "REG-2026/E-CLI")
    out = await admin_cli(h, tmp_path, *args)
    assert f"nothing to withdraw: notices consent of {pseudonym} is withdrawn" in out
    RESPONSES.append(out)


async def test_a_retried_opt_out_still_says_notices_were_withdrawn(
        bridge: BridgeHarness) -> None:
    """A crash between withdrawing notices and queuing the BAJA confirmation: the retry
    of the same message must still tell the citizen that notices were withdrawn."""
    h = bridge
    b = h.running.bridge
    citizen = new_citizen()
    await subscribe(h, citizen)
    citizen_row = await row(h, citizen)
    subscriptions = NoticeSubscriptions(b.config, b.db, b.outbox, b.metrics)
    assert await subscriptions.withdraw(citizen_row, "wamid.BAJA-1", "whatsapp")
    assert await subscriptions.withdraw(citizen_row, "wamid.BAJA-1", "whatsapp")  # the retry
    assert not await subscriptions.withdraw(citizen_row, "wamid.BAJA-2", "whatsapp")
    records = [r for r in await b.db.consent.for_citizen(citizen_row.id)
               if r.purpose == "notices"]
    assert [r.state for r in records][-2:] == ["granted", "withdrawn"]  # recorded once


async def test_notices_privacy_sweep(bridge: BridgeHarness) -> None:
    """No test phone number or BSUID in any admin API answer of this module, the
    metrics, or any log record of the run."""
    assert RESPONSES and USED_IDENTIFIERS
    _, metrics = await bridge.running.call("GET", "/metrics", token=None)
    haystack = "\n".join([*RESPONSES, str(metrics), *bridge.log_lines])
    for identifier in USED_IDENTIFIERS:
        assert identifier not in haystack, "an identifier leaked"
    assert re.search(r"notice \d+ queued for [A-Z]{4}-[A-Z]{4}", haystack)

