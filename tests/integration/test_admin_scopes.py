"""Least privilege over the real admin API: each named token reaches its scope's routes
and nothing else, the audit log names the token (and who acts through it),
re-identification and look-up by phone number are scoped, reasoned, audited and
rate-limited. The session bridge has one `only-<scope>` token per scope
(tests/fixtures/bridge.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from bridge.app import make_admin_app, make_app
from bridge.config import ADMIN_SCOPES
from tests.fixtures.bridge import BridgeHarness
from tests.integration.test_whatsapp import bridge_cli, new_citizen, opt_in, wait_until

pytestmark = pytest.mark.integration

# Every admin route and the scope it needs: a route added without a row here fails
# test_each_scope_reaches_its_routes_and_nothing_else.
EXPECTED: dict[tuple[str, str], str] = {
    ("POST", "/admin/v1/rooms"): "rooms",
    ("GET", "/admin/v1/rooms"): "rooms",
    ("GET", "/admin/v1/rooms/{room_id}/members"): "rooms",
    ("GET", "/admin/v1/keys"): "rooms",
    ("POST", "/admin/v1/portals/{room_id}/templates"): "rooms",
    ("POST", "/admin/v1/rooms/{room_id}/invite"): "invites",
    ("POST", "/admin/v1/rooms/{room_id}/invite-links"): "invites",
    ("POST", "/admin/v1/rooms/{room_id}/whatsapp-members"): "invites",
    ("GET", "/admin/v1/rooms/{room_id}/whatsapp-members"): "rooms",
    ("POST", "/admin/v1/rooms/{room_id}/whatsapp-settings"): "rooms",
    **{("POST", f"/admin/v1/rooms/{{room_id}}/{action}"): "moderation"
       for action in ("kick", "ban", "unban", "mute", "unmute", "redact", "knocks/approve",
                      "knocks/deny", "close", "announce")},
    ("GET", "/admin/v1/audit"): "audit.read",
    ("GET", "/admin/v1/audit/verify"): "audit.read",
    ("GET", "/admin/v1/citizens/{user_id}/export"): "citizens.export",
    ("POST", "/admin/v1/citizens/lookup"): "citizens.export",
    ("POST", "/admin/v1/citizens/export"): "citizens.export",
    ("POST", "/admin/v1/citizens/erase"): "citizens.erase",
    ("DELETE", "/admin/v1/citizens/{user_id}"): "citizens.erase",
    ("POST", "/admin/v1/citizens/{user_id}/reveal"): "reidentify",
    ("POST", "/admin/v1/notices"): "notices",
    ("POST", "/admin/v1/notices/withdrawals"): "notices",
    ("GET", "/admin/v1/notices"): "notices",
    ("GET", "/admin/v1/dead-letters"): "moderation",
    ("POST", "/admin/v1/dead-letters/{id}/{action}"): "moderation",
    ("GET", "/admin/v1/reports"): "moderation",
    ("POST", "/admin/v1/reports/{report_id}/{action}"): "moderation",
}
# Placeholders filled so that an allowed call is harmless (404 or 400, nothing changes).
FILL = {"{room_id}": quote("!nosuchroom:localhost", safe=""),
        "{user_id}": quote("@nosuchcitizen:localhost", safe=""),
        "{id}": "in-999999999", "{action}": "discard", "{report_id}": "999999999"}


def token(h: BridgeHarness, name: str) -> str:
    if name == "admin":
        return h.running.config.admin.token
    return next(t.token for t in h.running.config.admin.tokens if t.name == name)


async def api(h: BridgeHarness, name: str, method: str, path: str, body: Any = None,
              acting: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token(h, name)}"}
    if acting is not None:
        headers["X-Civic-Bridge-Actor"] = acting
    async with aiohttp.ClientSession() as http, http.request(
            method, h.running.url_for(path), json=body, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


def admin_routes(h: BridgeHarness) -> set[tuple[str, str]]:
    # Not started: only its routing table is read.
    app = make_admin_app(make_app(h.running.config))
    return {(r.method, r.resource.canonical) for r in app.router.routes()
            if r.resource is not None and r.resource.canonical.startswith("/admin/")
            and r.method != "HEAD"}


def refused_for_scope(status: int, body: Any) -> bool:
    return status == 403 and "lacks the scope" in str(body.get("error", ""))


async def test_each_scope_reaches_its_routes_and_nothing_else(bridge: BridgeHarness) -> None:
    routes = admin_routes(bridge)
    assert routes == set(EXPECTED), "a new admin route needs its row in EXPECTED"
    for (method, canonical), needed in sorted(EXPECTED.items()):
        path = canonical
        for placeholder, value in FILL.items():
            path = path.replace(placeholder, value)
        body = None if method == "GET" else {}
        for scope in ADMIN_SCOPES:
            status, answer = await api(bridge, f"only-{scope}", method, path, body)
            where = f"{method} {canonical} with only-{scope}: {status} {answer}"
            if scope == needed:  # allowed: the route itself answers (never a crash)
                assert status not in (401, 403) and status < 500, where
            else:
                assert (status, answer) == (403, {
                    "errcode": "M_FORBIDDEN",
                    "error": f"this token lacks the scope {needed}"}), where
        # The legacy admin.token has every scope.
        status, answer = await api(bridge, "admin", method, path, body)
        assert status not in (401, 403) and status < 500, (
            f"{method} {canonical} with admin.token: {answer}")


async def test_unknown_or_missing_token_is_401(bridge: BridgeHarness) -> None:
    for header in ({}, {"Authorization": "Bearer " + "y" * 40},
                   {"Authorization": "Bearer " + token(bridge, "only-rooms")[:-1]}):
        async with aiohttp.ClientSession() as http, http.get(
                bridge.running.admin_url + "/admin/v1/rooms", headers=header) as resp:
            assert resp.status == 401
            assert (await resp.json())["errcode"] == "M_UNKNOWN_TOKEN"


async def test_refusals_are_counted_logged_and_a_known_callers_audited(
        bridge: BridgeHarness) -> None:
    """A probe with no or a wrong token is logged (route, never the token) and counted; a
    known token reaching beyond its scope is also audited under its name (ENS op.exp.8)."""
    registry = bridge.running.bridge.metrics.registry

    def refused(reason: str) -> float:
        return registry.get_sample_value("civic_bridge_admin_refusals_total",
                                         {"reason": reason}) or 0.0

    before = refused("unauthenticated"), refused("forbidden")
    mark = len(bridge.log_lines)
    wrong = "z" * 40
    async with aiohttp.ClientSession() as http, http.get(
            bridge.running.admin_url + "/admin/v1/citizens/lookup",
            headers={"Authorization": f"Bearer {wrong}"}) as resp:
        assert resp.status == 401
    status, _ = await api(bridge, "only-notices", "GET", "/admin/v1/audit")
    assert status == 403
    assert (refused("unauthenticated"), refused("forbidden")) == (before[0] + 1, before[1] + 1)
    lines = "".join(bridge.log_lines[mark:])
    assert "/admin/v1/citizens/lookup refused" in lines and wrong not in lines
    assert "refused to token only-notices (lacks audit.read)" in lines
    entry = await newest(bridge, "admin.refused")
    assert (entry["actor"], entry["object"], entry["result"]) == (
        "api:only-notices", "GET /admin/v1/audit", "forbidden")


async def newest(h: BridgeHarness, action: str) -> dict[str, Any]:
    status, page = await api(h, "only-audit.read", "GET", "/admin/v1/audit?limit=50")
    assert status == 200, page
    return next(e for e in page["entries"] if e["action"] == action)


async def test_audit_names_the_token_and_who_acts_through_it(bridge: BridgeHarness) -> None:
    status, body = await api(bridge, "only-rooms", "POST", "/admin/v1/rooms",
                             {"name": "Sala de alcance", "kind": "team"})
    assert status == 201, body
    entry = await newest(bridge, "room.create")
    assert (entry["actor"], entry["object"]) == ("api:only-rooms", body["room_id"])

    status, body = await api(bridge, "only-rooms", "POST", "/admin/v1/rooms",
                             {"name": "Sala de Ana", "kind": "team"},
                             acting=bridge.admin.user_id)
    assert status == 201, body
    entry = await newest(bridge, "room.create")
    assert entry["actor"] == f"api:only-rooms as {bridge.admin.user_id}"

    # The claim must be a Matrix user ID; it never stands in for the token.
    status, body = await api(bridge, "only-rooms", "POST", "/admin/v1/rooms",
                             {"name": "Sala", "kind": "team"}, acting="Ana (jefa)")
    assert status == 400 and "X-Civic-Bridge-Actor" in body["error"]
    async with aiohttp.ClientSession() as http, http.get(
            bridge.running.admin_url + "/admin/v1/rooms",
            headers={"X-Civic-Bridge-Actor": bridge.admin.user_id}) as resp:
        assert resp.status == 401

    # The legacy token is named `admin`.
    status, body = await api(bridge, "admin", "POST", "/admin/v1/rooms",
                             {"name": "Sala heredada", "kind": "team"})
    assert status == 201
    assert (await newest(bridge, "room.create"))["actor"] == "api:admin"


async def test_auditor_reads_and_verifies_the_trail_only(bridge: BridgeHarness) -> None:
    status, page = await api(bridge, "only-audit.read", "GET", "/admin/v1/audit?limit=5")
    assert status == 200 and page["chain"]["intact"] is True and page["entries"]
    status, chain = await api(bridge, "only-audit.read", "GET", "/admin/v1/audit/verify")
    assert (status, chain) == (200, {"intact": True, "first_bad_id": None})
    for method, path in (("GET", "/admin/v1/rooms"), ("GET", "/admin/v1/notices"),
                         ("GET", "/admin/v1/citizens/%40x%3Alocalhost/export?reason=auditoria"),
                         ("POST", "/admin/v1/citizens/lookup")):
        status, body = await api(bridge, "only-audit.read", method, path,
                                 None if method == "GET" else {})
        assert refused_for_scope(status, body), (path, body)


async def cli(h: BridgeHarness, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    return await bridge_cli(h, tmp_path, "admin", *args)


async def test_reveal_and_lookup(bridge: BridgeHarness, tmp_path: Path) -> None:
    citizen = new_citizen()
    assert citizen.wa_id is not None
    j = await opt_in(bridge, citizen, "necesito que me llamen")
    try:
        b = bridge.running.bridge
        row = await wait_until(lambda: b.db.citizens.by_index(
            b.privacy.index.digest(citizen.user_id)), 30, "citizen")
        ghost = row.ghost_user_id
        assert ghost is not None
        reveal = f"/admin/v1/citizens/{quote(ghost, safe='')}/reveal"
        why = "devolución de llamada solicitada por la persona"

        # Only the reidentify scope; a reason of at least 10 characters.
        for other in ("only-citizens.export", "only-audit.read", "only-rooms"):
            status, body = await api(bridge, other, "POST", reveal, {"reason": why})
            assert refused_for_scope(status, body), body
        for reason in (None, "", "porque sí"):
            status, body = await api(bridge, "only-reidentify", "POST", reveal,
                                     {"reason": reason})
            assert status == 400 and "reason" in body["error"], body
        status, body = await api(bridge, "only-reidentify", "POST", reveal, {"reason": why},
                                 acting=bridge.admin.user_id)
        assert status == 200, body
        assert body == {"pseudonym": row.pseudonym_code, "matrix_user_id": ghost,
                        "phone": f"+{citizen.wa_id}", "wa_id": citizen.wa_id,
                        "bsuid": citizen.user_id}
        entry = await newest(bridge, "citizen.reveal")
        assert {k: entry[k] for k in ("actor", "object", "result", "reason")} == {
            "actor": f"api:only-reidentify as {bridge.admin.user_id}",
            "object": f"pseudonym {row.pseudonym_code}", "result": "ok", "reason": why}

        # A number typed where the pseudonym goes finds nobody and is not recorded.
        status, body = await api(bridge, "only-reidentify", "POST",
                                 f"/admin/v1/citizens/{quote('+' + citizen.wa_id)}/reveal",
                                 {"reason": why})
        assert status == 404, body
        entry = await newest(bridge, "citizen.reveal")
        assert (entry["object"], entry["result"]) == ("(not a pseudonym)", "not_found")

        # Look-up by the number, however it is written.
        wa = citizen.wa_id
        national = f"{wa[2:5]} {wa[5:7]} {wa[7:9]} {wa[9:]}"
        lookup = "/admin/v1/citizens/lookup"
        for written in (f"+34 {national}", national, wa[2:], f"0034-{wa[2:]}"):
            status, body = await api(bridge, "only-citizens.export", "POST", lookup,
                                     {"phone": written, "reason": "solicitud de acceso 2026-31"})
            assert status == 200, (written, body)
            assert body == {"citizens": [{
                "pseudonym": row.pseudonym_code, "matrix_user_id": ghost,
                "consent_state": "granted", "subscription_code": None,
                "notices_consent_state": None}]}
        entry = await newest(bridge, "citizen.lookup")
        assert (entry["actor"], entry["object"], entry["result"], entry["reason"]) == (
            "api:only-citizens.export", f"pseudonym {row.pseudonym_code}", "ok",
            "solicitud de acceso 2026-31")
        nobody = "+34 699 000 00" + ("1" if wa[-1] != "1" else "2")
        status, body = await api(bridge, "only-citizens.export", "POST", lookup,
                                 {"phone": nobody, "reason": "solicitud de acceso 2026-32"})
        assert status == 404, body
        assert (await newest(bridge, "citizen.lookup"))["result"] == "not_found"
        status, body = await api(bridge, "only-citizens.export", "POST", lookup,
                                 {"phone": national})
        assert status == 400 and "reason" in body["error"]
        status, body = await api(bridge, "only-reidentify", "POST", lookup,
                                 {"phone": national, "reason": "solicitud de acceso"})
        assert refused_for_scope(status, body)

        # The command line, with a named token and who acts.
        code, out, err = await cli(bridge, tmp_path, "--token-name", "only-reidentify",
                                   "--as", bridge.admin.user_id, "--json", "reveal", ghost,
                                   "--reason", "verificación de identidad en sede")
        assert code == 0, err
        assert json.loads(out)["wa_id"] == citizen.wa_id
        code, out, err = await cli(bridge, tmp_path, "--token-name", "only-citizens.export",
                                   "lookup", f"+34 {national}", "--reason",
                                   "solicitud de acceso en ventanilla")
        assert code == 0, err
        assert row.pseudonym_code in out and ghost in out and wa not in out
        code, _, err = await cli(bridge, tmp_path, "--token-name", "only-notices", "reveal",
                                 ghost, "--reason", "esto no debe funcionar")
        assert code == 1 and "lacks the scope reidentify" in err
        code, _, err = await cli(bridge, tmp_path, "--token-name", "nadie", "keys")
        assert code == 2 and "nadie" in err

        # Nothing in the audit trail holds the number or the BSUID.
        status, page = await api(bridge, "only-audit.read", "GET", "/admin/v1/audit?limit=200")
        trail = json.dumps(page["entries"])
        for secret in (wa, wa[2:], citizen.user_id):
            assert secret not in trail

        # Rate limit: admin.reveal_per_hour (10) per token, then 429, audited.
        limit = bridge.running.config.admin.reveal_per_hour
        for _ in range(limit):
            status, body = await api(bridge, "reveal-limit", "POST", reveal, {"reason": why})
            assert status == 200, body
        status, body = await api(bridge, "reveal-limit", "POST", reveal, {"reason": why})
        assert (status, body["errcode"]) == (429, "M_LIMIT_EXCEEDED"), body
        entry = await newest(bridge, "citizen.reveal")
        assert (entry["actor"], entry["result"]) == ("api:reveal-limit", "rate_limited")
        # Another token has its own budget.
        assert (await api(bridge, "only-reidentify", "POST", reveal, {"reason": why}))[0] == 200
    finally:
        await j.desk.close()


async def test_lookup_finds_a_contact_keyed_by_number_who_never_consented(
        bridge: BridgeHarness) -> None:
    """Someone who wrote once without a BSUID (keyed by the number's keyed hash) and never
    answered the consent question is found too (a rights request reaches everyone)."""
    citizen = new_citizen()
    assert citizen.wa_id is not None
    value = bridge.wa.text_message(citizen, "¿a qué hora abren?")
    for contact in value["contacts"]:
        contact.pop("user_id")
    for message in value["messages"]:
        message.pop("from_user_id")
    assert await bridge.wa.deliver(bridge.webhook_url, value) == 200
    b = bridge.running.bridge
    row = await wait_until(lambda: b.db.citizens.by_index(
        b.privacy.index.digest(citizen.wa_id or "")), 30, "contact keyed by number")
    assert row.ghost_user_id is None
    wa = citizen.wa_id
    status, body = await api(bridge, "only-citizens.export", "POST", "/admin/v1/citizens/lookup",
                             {"phone": f"{wa[2:5]} {wa[5:7]} {wa[7:9]} {wa[9:]}",
                              "reason": "solicitud de supresión en ventanilla"})
    assert status == 200, body
    assert body["citizens"] == [{"pseudonym": row.pseudonym_code, "matrix_user_id": None,
                                 "consent_state": row.consent_state, "subscription_code": None,
                                 "notices_consent_state": None}]
    assert row.consent_state in ("unknown", "prompted")
