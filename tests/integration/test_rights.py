"""Rights requests for everyone, and retention of invite accounts, over the real admin
API, the real Synapse and the WhatsApp simulator (issue 15 points 6 and 7): a contact
who never consented is found, exported and erased by phone number; an invite-link
account is exported and erased (deactivated on the homeserver); unused invite accounts
are retired by `civic-bridge purge`; consent records carry their language."""

from __future__ import annotations

import json
import re
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import update

from bridge.db.invites import InviteAccountRow, InviteLinkRow
from bridge.devtools.simulator import SimulatedUser
from bridge.types import Pseudonym, UserID
from bridge.whatsapp.consent import OPT_IN_BUTTON
from tests.fixtures.bridge import BridgeHarness
from tests.integration.test_admin_scopes import api, refused_for_scope
from tests.integration.test_moderation import User, as_user, create_room, q
from tests.integration.test_whatsapp import (
    admin_cli,
    bridge_cli,
    new_citizen,
    opt_in,
    to_citizen,
    wait_until,
)

pytestmark = pytest.mark.integration
REASON = "solicitud presentada en la oficina de atención 2026/118"


def spoken(wa_id: str) -> str:
    """The number as the person at the desk says it: national, with spaces."""
    return f"{wa_id[2:5]} {wa_id[5:7]} {wa_id[7:9]} {wa_id[9:]}"


async def first_contact(h: BridgeHarness, citizen: SimulatedUser, text: str) -> Any:
    """The citizen writes once and never answers the privacy notice."""
    assert await h.wa.deliver(h.webhook_url, h.wa.text_message(citizen, text)) == 200
    await h.wa.wait_for_sent(lambda s: s.get("type") == "interactive" and
                             to_citizen(s, citizen), timeout=30)
    b = h.running.bridge

    async def held() -> Any:
        row = await b.db.citizens.by_index(b.privacy.index.digest(citizen.user_id))
        return row if row and await b.db.inbound.held_for(row.id) else None
    return await wait_until(held, 30, "the first message held")


async def audit_actions(h: BridgeHarness, limit: int = 30) -> list[Any]:
    return await h.running.bridge.db.audit.list(limit=limit)


async def test_a_contact_who_never_consented_is_exported_and_erased_by_phone(
        bridge: BridgeHarness, tmp_path: Path) -> None:
    citizen = new_citizen("Rosa Díaz")
    assert citizen.wa_id is not None
    row = await first_contact(bridge, citizen, "¿Puedo pedir cita para el padrón?")
    assert row.ghost_user_id is None and row.consent_state == "prompted"
    phone = spoken(citizen.wa_id)

    # Export by the number alone: a pseudonym is all the contact has otherwise.
    status, body = await api(bridge, "only-citizens.erase", "POST",
                             "/admin/v1/citizens/export", {"phone": phone, "reason": REASON})
    assert refused_for_scope(status, body)
    status, body = await api(bridge, "only-citizens.export", "POST",
                             "/admin/v1/citizens/export", {"phone": phone})
    assert status == 400 and "reason" in body["error"]
    status, body = await api(bridge, "only-citizens.export", "POST",
                             "/admin/v1/citizens/export", {"phone": phone, "reason": REASON})
    assert status == 200, body
    [data] = body["citizens"]
    assert data["pseudonym"] == row.pseudonym_code and data["matrix_user_id"] is None
    assert data["whatsapp"] == {"wa_id": citizen.wa_id, "identifier": citizen.user_id}
    assert data["consent_state"] == "prompted"
    # The held message, decrypted: it is their own export.
    [held] = data["held_messages"]
    # As the bridge stored it: the parsed message (bridge.whatsapp.stored).
    assert held["webhook"]["format"] == 2
    assert held["webhook"]["message"]["text"] == "¿Puedo pedir cita para el padrón?"
    assert held["deleted_by"] is not None
    # The privacy notice the bridge sent them, from the outbox.
    [notice] = data["outbox_items"]
    assert notice["status"] == "sent"
    assert notice["message"]["buttons"][0] == [OPT_IN_BUTTON, "Acepto"]
    assert [r["language"] for r in data["consent_records"]] == ["es"]
    entries = await audit_actions(bridge)
    assert (entries[0].action, entries[0].object, entries[0].reason) == (
        "citizen.export", f"pseudonym {row.pseudonym_code}", REASON)
    assert (entries[1].action, entries[1].result) == ("citizen.lookup", "ok")
    trail = json.dumps([(e.object, e.reason) for e in entries])
    assert citizen.wa_id not in trail and citizen.wa_id[2:] not in trail

    # The same from the command line (the number in the body, never in a URL).
    exported = await admin_cli(bridge, tmp_path, "--token-name", "only-citizens.export",
                               "citizen", "export", "--phone", phone, "--reason", REASON)
    assert json.loads(exported)["citizens"][0]["pseudonym"] == row.pseudonym_code

    # The pseudonym code the look-up answers names them too.
    status, by_code = await api(bridge, "only-citizens.export", "GET",
                                f"/admin/v1/citizens/{row.pseudonym_code}/export?reason=acceso")
    assert status == 200 and by_code["pseudonym"] == row.pseudonym_code

    # Erasure by the number.
    status, body = await api(bridge, "only-citizens.export", "POST",
                             "/admin/v1/citizens/erase", {"phone": phone, "reason": REASON})
    assert refused_for_scope(status, body)
    status, body = await api(bridge, "only-citizens.erase", "POST", "/admin/v1/citizens/erase",
                             {"phone": f"+34 {phone}", "reason": REASON})
    assert status == 200, body
    assert [e["pseudonym"] for e in body["erased"]] == [row.pseudonym_code]
    b = bridge.running.bridge
    assert await b.db.citizens.get(row.id) is None
    assert await b.db.inbound.held_for(row.id) == []
    records = await b.db.consent.for_pseudonym(Pseudonym(row.pseudonym_code))
    assert records and all(r.citizen_id is None for r in records)
    status, body = await api(bridge, "only-citizens.export", "POST",
                             "/admin/v1/citizens/export", {"phone": phone, "reason": REASON})
    assert status == 404, body


async def redeem(h: BridgeHarness, room_id: str, lang: str = "en") -> tuple[str, str]:
    """An account from an invite link, the form posted as a browser would (no login)."""
    status, link = await h.running.call("POST", f"/admin/v1/rooms/{room_id}/invite-links",
                                        {"uses": 1})
    assert status == 201, link
    password = secrets.token_urlsafe(16)
    async with aiohttp.ClientSession() as http, http.post(link["url"], data={
            "pseudonym": "", "password": password, "password2": password,
            "consent": "yes", "lang": lang}) as resp:
        page = await resp.text()
        assert resp.status == 200, page
    found = re.search(r"@(v_[a-z]+):localhost", page)
    assert found is not None, page
    return found.group(0), password


async def login(h: BridgeHarness, user_id: str, password: str) -> User:
    _, token, _ = await h.synapse.synapse.login(user_id[1:].split(":")[0], password)
    return User(user_id, token)


async def synapse_user(h: BridgeHarness, user_id: str) -> dict[str, Any]:
    assert h.hs_admin is not None
    token = h.running.config.moderation.synapse_admin_token
    status, body = await h.synapse.synapse.request(
        "GET", f"/_synapse/admin/v2/users/{q(user_id)}", None, token)
    assert status == 200, body
    return body


async def test_an_invite_link_account_is_exported_and_erased(bridge: BridgeHarness) -> None:
    room = await create_room(bridge, "Vecinos del barrio")
    user_id, password = await redeem(bridge, room, lang="en")
    user = await login(bridge, user_id, password)
    status, _ = await as_user(bridge, user, "POST", f"/_matrix/client/v3/join/{q(room)}")
    assert status == 200
    path = f"/admin/v1/citizens/{q(user_id)}"

    status, data = await api(bridge, "only-citizens.export", "GET",
                             f"{path}/export?reason={q(REASON)}")
    assert status == 200, data
    assert data["kind"] == "invite_account" and data["matrix_user_id"] == user_id
    assert data["invite_link"]["room_id"] == room and data["invited_to"] == room
    assert data["account_created_at"] is not None
    assert {"room_id": room, "name": "Vecinos del barrio", "kind": "citizen",
            "membership": "join"} in data["rooms"]
    [record] = data["consent_records"]
    assert (record["purpose"], record["state"], record["language"]) == (
        "membership", "granted", "en")
    entry = (await audit_actions(bridge))[0]
    assert (entry.action, entry.object, entry.reason) == (
        "citizen.export", f"invite account {user_id}", REASON)

    status, body = await api(bridge, "only-citizens.export", "DELETE", path, {"reason": REASON})
    assert refused_for_scope(status, body)
    status, body = await api(bridge, "only-citizens.erase", "DELETE", path, {"reason": REASON})
    assert status == 200, body
    assert body["erased"] is True and body["matrix_user_id"] == user_id
    # Deactivated and erased on the homeserver; forgotten here; audited.
    hs = await synapse_user(bridge, user_id)
    assert hs["deactivated"] is True and hs.get("erased") is True
    status, answer = await as_user(bridge, user, "GET", "/_matrix/client/v3/account/whoami")
    assert status == 401, answer
    assert await bridge.running.bridge.db.invites.account(UserID(user_id)) is None
    entry = (await audit_actions(bridge))[0]
    assert (entry.action, entry.object, entry.result, entry.reason) == (
        "citizen.erase", f"invite account {user_id}", "ok", REASON)
    # Consent evidence stays, by the pseudonymous Matrix ID.
    records = await bridge.running.bridge.db.consent.for_pseudonym(Pseudonym(user_id))
    assert [r.state for r in records] == ["granted"]
    status, _ = await api(bridge, "only-citizens.export", "GET",
                          f"{path}/export?reason={q(REASON)}")
    assert status == 404


async def purge_cli(h: BridgeHarness, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    return await bridge_cli(h, tmp_path, "purge", *args, timeout=120)


async def test_unused_invite_accounts_are_retired_and_spent_links_purged(
        bridge: BridgeHarness, tmp_path: Path) -> None:
    room = await create_room(bridge, "Asociación de vecinos")
    unused, _ = await redeem(bridge, room)
    used, password = await redeem(bridge, room)
    user = await login(bridge, used, password)
    status, _ = await as_user(bridge, user, "POST", f"/_matrix/client/v3/join/{q(room)}")
    assert status == 200
    b = bridge.running.bridge
    account = await b.db.invites.account(UserID(unused))
    assert account is not None and account.link_id is not None
    old = datetime.now(UTC) - timedelta(days=31)
    async with b.db.engine.begin() as conn:
        await conn.execute(update(InviteAccountRow)
                           .where(InviteAccountRow.user_id.in_([unused, used]))
                           .values(created_at=old))
        await conn.execute(update(InviteLinkRow).where(InviteLinkRow.id == account.link_id)
                           .values(created_at=old, expires_at=old))

    code, out, err = await purge_cli(bridge, tmp_path, "--dry-run")
    assert code == 0, err
    assert await b.db.invites.account(UserID(unused)) is not None
    assert (await synapse_user(bridge, unused))["deactivated"] is False

    code, out, err = await purge_cli(bridge, tmp_path)
    assert code == 0, err
    assert "invite_accounts:" in out and "invite_links:" in out, out
    hs = await synapse_user(bridge, unused)
    assert hs["deactivated"] is True and hs.get("erased") is True
    assert await b.db.invites.account(UserID(unused)) is None
    assert await b.db.invites.get(account.link_id) is None
    retired = [e for e in await audit_actions(bridge, 50)
               if e.action == "invite_account.retire"]
    assert [(e.actor, e.object) for e in retired][:1] == [
        ("retention", f"invite account {unused}")]
    # The account that logged in and joined stays, and is never checked again.
    kept = await b.db.invites.account(UserID(used))
    assert kept is not None and kept.in_use_at is not None
    assert (await synapse_user(bridge, used))["deactivated"] is False


async def test_consent_records_carry_the_language(bridge: BridgeHarness) -> None:
    citizen = new_citizen("Joan Puig")
    j = await opt_in(bridge, citizen, "Bon dia, una consulta")
    try:
        assert await bridge.wa.deliver(bridge.webhook_url,
                                       bridge.wa.text_message(citizen, "AVISOS")) == 200
        b = bridge.running.bridge
        row = await b.db.citizens.by_index(b.privacy.index.digest(citizen.user_id))
        assert row is not None and row.ghost_user_id is not None

        async def notices_asked() -> bool:
            return any(r.purpose == "notices" for r in await b.db.consent.for_citizen(row.id))
        await wait_until(notices_asked, 30, "notices consent asked")
        assert await bridge.wa.deliver(bridge.webhook_url,
                                       bridge.wa.text_message(citizen, "BAJA")) == 200

        async def withdrawn() -> bool:
            records = await b.db.consent.for_citizen(row.id)
            return any(r.state == "withdrawn" and r.purpose == "mirroring" for r in records)
        await wait_until(withdrawn, 30, "opt-out recorded")
        status, data = await api(bridge, "only-citizens.export", "GET",
                                 f"/admin/v1/citizens/{q(row.ghost_user_id)}/export"
                                 f"?reason={q(REASON)}")
        assert status == 200, data
        chat = [(r["state"], r["language"]) for r in data["consent_records"]
                if r["purpose"] == "mirroring"]
        assert chat == [("prompted", "es"), ("granted", "es"), ("withdrawn", "es")]
        notices = [r["language"] for r in data["consent_records"] if r["purpose"] == "notices"]
        assert notices and set(notices) == {b.config.notices.template_language}
        # What they wrote after opting in went through the queue: its copy is exported.
        texts = [item["webhook"]["message"].get("text") for item in data["queued_items"]
                 if "message" in item["webhook"]]
        assert "Bon dia, una consulta" in texts
    finally:
        await j.desk.close()
