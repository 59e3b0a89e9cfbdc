"""The audit trail: what GET /admin/v1/audit shows, the `civic-bridge admin audit` CLI,
and tampering (an edited or removed row) being detected by both."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select, text

from bridge.auditchain import AuditKeys, entry_mac, parse_anchors
from bridge.db.models import AuditRow
from tests.fixtures.bridge import BridgeHarness

pytestmark = pytest.mark.integration
EXIT_TAMPERED, EXIT_CONFIRM = 4, 5


@pytest.fixture
async def config_file(bridge: BridgeHarness, tmp_path: Path) -> AsyncIterator[Path]:
    """The running bridge's config as a file, for the CLI."""
    path = tmp_path / "config.yaml"
    raw = bridge.running.config.model_dump(mode="json")
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    yield path


async def cli(config: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "admin", "-c", str(config), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def audit(bridge: BridgeHarness, query: str = "") -> dict[str, Any]:
    status, body = await bridge.running.call("GET", f"/admin/v1/audit{query}")
    assert status == 200, body
    return dict(body)


async def test_every_entry_has_actor_time_object_action_result_reason(
        bridge: BridgeHarness) -> None:
    await bridge.running.bridge.db.audit.append("test", "test.older", "-", "ok", None)
    status, body = await bridge.running.call("POST", "/admin/v1/rooms",
                                             {"name": "Auditada", "kind": "citizen"})
    room_id = body["room_id"]
    status, _ = await bridge.running.call(
        "POST", f"/admin/v1/rooms/{room_id}/invite",
        {"user_id": bridge.desk.user_id, "reason": "refuerzo del servicio"})
    assert status == 200
    page = await audit(bridge, "?limit=2")
    assert page["chain"] == {"intact": True, "first_bad_id": None}
    newest, before = page["entries"]
    assert {k: newest[k] for k in ("actor", "action", "object", "result", "reason")} == {
        "actor": "api:admin", "action": "room.invite",
        "object": f"{room_id} {bridge.desk.user_id}", "result": "ok",
        "reason": "refuerzo del servicio"}
    assert (before["action"], before["object"]) == ("room.create", room_id)
    at = datetime.fromisoformat(newest["at"])
    assert at.utcoffset() is not None and at.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert newest["prev_hash"] == before["hash"]

    # Paging back from the oldest entry shown.
    assert page["next_before"] == before["id"]
    older = await audit(bridge, f"?limit=1&before={before['id']}")
    assert older["entries"][0]["id"] < before["id"]

    for bad in ("?limit=abc", "?before=-1"):
        status, body = await bridge.running.call("GET", f"/admin/v1/audit{bad}")
        assert status == 400, bad
    assert (await bridge.running.call("GET", "/admin/v1/audit", token=None))[0] == 401
    assert (await bridge.running.call("GET", "/admin/v1/audit/verify", token="x" * 20))[0] == 401


async def test_cli_lists_and_verifies(bridge: BridgeHarness, config_file: Path) -> None:
    status, body = await bridge.running.call("POST", "/admin/v1/rooms",
                                             {"name": "Desde la CLI", "kind": "team"})
    assert status == 201, body
    room_id = body["room_id"]
    code, out, err = await cli(config_file, "audit", "verify")
    assert (code, out.strip()) == (0, "audit chain intact"), err
    code, out, err = await cli(config_file, "audit", "list", "--limit", "3")
    assert code == 0, err
    header, rule, *rows = out.splitlines()
    assert header.split() == ["id", "at", "(UTC)", "actor", "action", "object", "result",
                              "reason"]
    assert set(rule.replace(" ", "")) == {"-"}
    assert "room.create" in rows[0] and room_id in rows[0]
    assert rows[-1] == "audit chain intact"

    code, out, err = await cli(config_file, "rooms", "list")
    assert code == 0 and room_id in out and "Desde la CLI" in out
    code, out, err = await cli(config_file, "kick", room_id, "@nadie:localhost",
                               "--reason", "prueba")
    assert code == 1 and "refused" in err
    code, out, err = await cli(config_file, "--url", "http://127.0.0.1:9", "audit", "verify")
    assert code == 3 and "cannot reach" in err


async def _row(bridge: BridgeHarness, entry_id: int) -> dict[str, Any]:
    async with bridge.running.bridge.db.session() as session:
        row = (await session.execute(text("SELECT * FROM audit_log WHERE id = :i"),
                                     {"i": entry_id})).mappings().one()
    return dict(row)


async def _execute(bridge: BridgeHarness, sql: str, **params: Any) -> None:
    async with bridge.running.bridge.db.session() as session:
        await session.execute(text(sql), params)


async def test_an_edited_or_removed_row_is_detected(bridge: BridgeHarness,
                                                     config_file: Path) -> None:
    b = bridge.running.bridge
    target = await b.db.audit.append("admin-api", "room.kick", "!x:localhost @y:localhost",
                                     "ok", "motivo original")
    after = await b.db.audit.append("admin-api", "room.ban", "!x:localhost @y:localhost",
                                    "ok", "otro")
    original = await _row(bridge, target.id)
    try:
        # Someone rewrites the reason of an entry, directly in the database.
        await _execute(bridge, "UPDATE audit_log SET reason = 'nada que ver' WHERE id = :i",
                       i=target.id)
        page = await audit(bridge)
        assert page["chain"] == {"intact": False, "first_bad_id": target.id}
        status, body = await bridge.running.call("GET", "/admin/v1/audit/verify")
        assert status == 200 and body == {"intact": False, "first_bad_id": target.id}
        code, out, err = await cli(config_file, "audit", "verify")
        assert code == EXIT_TAMPERED and f"AUDIT CHAIN BROKEN: entry {target.id}" in err
        code, out, err = await cli(config_file, "audit", "list")
        assert code == EXIT_TAMPERED and "AUDIT CHAIN BROKEN" in err
        assert "nada que ver" in out  # the entries are still listed

        # Recomputing the edited row's own hash does not help: the next link breaks.
        await _execute(bridge, "UPDATE audit_log SET reason = :r WHERE id = :i",
                       r=original["reason"], i=target.id)
        assert (await audit(bridge))["chain"]["intact"] is True
        await _execute(bridge, "DELETE FROM audit_log WHERE id = :i", i=target.id)
        assert (await audit(bridge))["chain"] == {"intact": False, "first_bad_id": after.id}
    finally:
        await _execute(bridge, "DELETE FROM audit_log WHERE id = :i", i=target.id)
        columns = ", ".join(original)
        await _execute(bridge, f"INSERT INTO audit_log ({columns}) VALUES "
                       f"({', '.join(':' + c for c in original)})", **original)
    code, _, err = await cli(config_file, "audit", "verify")
    assert code == 0, err


async def test_cli_confirmation_exit_code(bridge: BridgeHarness, config_file: Path) -> None:
    status, body = await bridge.running.call("POST", "/admin/v1/rooms",
                                             {"name": "Tablón", "kind": "announcement"})
    assert status == 201, body
    room_id = body["room_id"]
    code, out, err = await cli(config_file, "announce", room_id, "Mañana no hay servicio")
    assert code == EXIT_CONFIRM and "Room 'Tablón' has 2 members" in err
    code, out, err = await cli(config_file, "announce", room_id, "Mañana no hay servicio",
                               "--confirm")
    assert code == 0 and out.startswith("event_id: $"), err
    code, out, err = await cli(config_file, "link", room_id, "--uses", "3", "--expires-in", "2d")
    assert code == 0 and "/invite/" in out and "3 use(s)" in out, err


# --- anchors and the keyed chain, end to end ---------------------------------------


async def _rows_from(bridge: BridgeHarness, first_id: int) -> list[dict[str, Any]]:
    async with bridge.running.bridge.db.session() as session:
        rows = (await session.execute(text("SELECT * FROM audit_log WHERE id >= :i ORDER BY id"),
                                      {"i": first_id})).mappings().all()
    return [dict(r) for r in rows]


async def _put_back(bridge: BridgeHarness, rows: list[dict[str, Any]]) -> None:
    """Restore the trail from `rows[0]` on exactly as it was."""
    await _execute(bridge, "DELETE FROM audit_log WHERE id >= :i", i=rows[0]["id"])
    for row in rows:
        columns = ", ".join(row)
        await _execute(bridge, f"INSERT INTO audit_log ({columns}) VALUES "
                       f"({', '.join(':' + c for c in row)})", **row)


async def _rewrite_with_the_key(bridge: BridgeHarness, entry_id: int) -> None:
    """What an insider holding audit.key can do: change an entry and re-MAC the rest."""
    keys = AuditKeys.from_base64(bridge.running.config.audit.key,
                                 bridge.running.config.audit.previous_keys)
    prev = None
    async with bridge.running.bridge.db.session() as session:
        for row in (await session.scalars(select(AuditRow).where(AuditRow.id >= entry_id)
                                          .order_by(AuditRow.id))):
            if row.id == entry_id:
                row.reason = "nada que ver"
            row.prev_hash = prev or row.prev_hash
            row.key_id = keys.current_id
            row.hash = entry_mac(keys.current, kid=keys.current_id, id=row.id, at=row.at,
                                 actor=row.actor, action=row.action, object=row.object,
                                 result=row.result, reason=row.reason,
                                 prev_hash=row.prev_hash)
            prev = row.hash


async def test_anchors_catch_a_rewrite_with_the_key_and_removed_newest_entries(
        bridge: BridgeHarness, config_file: Path, tmp_path: Path) -> None:
    b = bridge.running.bridge
    first = await b.db.audit.append("admin-api", "room.kick", "!x:localhost @y:localhost",
                                    "ok", "motivo")
    code, line, err = await cli(config_file, "audit", "anchor")
    assert code == 0, err
    anchored = json.loads(line)
    code, same, err = await cli(config_file, "--json", "audit", "anchor")
    assert (code, same) == (0, line), err
    assert anchored["id"] >= first.id and len(anchored["hash"]) == 64
    assert anchored["date"] == datetime.now(UTC).date().isoformat()
    anchors = tmp_path / "anchors.log"
    anchors.write_text(f"Dec  1 23:59:59 host civic-bridge-audit: {line}", encoding="utf-8")
    later = await b.db.audit.append("admin-api", "room.ban", "!x:localhost @y:localhost",
                                    "ok", "otro")

    code, out, err = await cli(config_file, "audit", "verify", "--anchor", str(anchors))
    assert code == 0, err
    assert out.splitlines() == ["audit chain intact",
                                f"1 anchor(s) match (newest: entry {anchored['id']} of "
                                f"{anchored['date']})"]
    saved = await _rows_from(bridge, first.id)
    try:
        # Rewritten by someone holding the key: the chain alone still checks out…
        await _rewrite_with_the_key(bridge, first.id)
        code, out, err = await cli(config_file, "audit", "verify")
        assert code == 0, err
        # …the anchor does not.
        code, out, err = await cli(config_file, "audit", "verify", "--anchor", str(anchors))
        assert code == EXIT_TAMPERED, out
        assert (f"AUDIT TRAIL REWRITTEN: entry {anchored['id']} anchored on "
                f"{anchored['date']} no longer has its anchored hash") in err
        await _put_back(bridge, saved)

        # The newest entries removed (the anchored one included): invisible to the chain.
        await _execute(bridge, "DELETE FROM audit_log WHERE id >= :i", i=anchored["id"])
        assert (await audit(bridge))["chain"]["intact"] is True
        code, out, err = await cli(config_file, "--json", "audit", "verify", "--anchor",
                                   str(anchors))
        assert code == EXIT_TAMPERED
        answer = json.loads(out)
        assert answer["anchors"]["match"] is False
        assert answer["anchors"]["failed"] == {"date": anchored["date"], "id": anchored["id"],
                                               "missing": True}
        await _put_back(bridge, saved)

        # An attacker without the key: caught by the chain itself, with the entry's id.
        await _execute(bridge, "UPDATE audit_log SET reason = 'x' WHERE id = :i",
                       i=later.id)
        code, out, err = await cli(config_file, "audit", "anchor")
        assert code == EXIT_TAMPERED and out == "" and f"entry {later.id}" in err
    finally:
        await _put_back(bridge, saved)
    code, _, err = await cli(config_file, "audit", "verify", "--anchor", str(anchors))
    assert code == 0, err
    for bad, why in ((tmp_path / "missing.log", "cannot read"),
                     (config_file, "no audit anchors")):
        code, _, err = await cli(config_file, "audit", "verify", "--anchor", str(bad))
        assert code == 2 and why in err, err


async def test_restart_with_a_rotated_key_and_the_daily_anchor_command(
        bridge: BridgeHarness, tmp_path: Path) -> None:
    """The operator rotates audit.key and configures audit.anchor_command; after the
    restart the trail says so, the anchor is exported, and everything verifies."""
    running = bridge.running
    before = await running.bridge.db.audit.append("admin-api", "room.kick", "-", "ok", None)
    old = running.config.audit
    new_key = base64.b64encode(secrets.token_bytes(32)).decode()
    out = tmp_path / "exported.log"
    command = [sys.executable, "-c",
               f"import sys; open({str(out)!r}, 'a').write(sys.stdin.read())"]
    rotated = old.model_copy(update={"key": new_key,
                                     "previous_keys": [*old.previous_keys, old.key],
                                     "anchor_command": command})
    await running.stop()
    running.config = running.config.model_copy(update={"audit": rotated})
    try:
        await running.start()
        for _ in range(100):
            if out.exists() and out.read_text():
                break
            await asyncio.sleep(0.2)
        [anchor] = parse_anchors(out.read_text())
        entries = await running.bridge.db.audit.list(limit=10)
        rotation = next(e for e in entries if e.action == "audit.key.rotated")
        assert rotation.prev_hash == before.hash and rotation.id == anchor.id
        assert rotation.key_id == AuditKeys.from_base64(new_key).current_id
        assert rotation.key_id != before.key_id
        assert await running.bridge.db.audit.verify() == (True, None)
        status, metrics = await running.call("GET", "/metrics", token=None)
        assert status == 200
        assert 'civic_bridge_audit_anchors_total{result="ok"} 1.0' in metrics
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump(running.config.model_dump(mode="json")),
                          encoding="utf-8")
        code, text_out, err = await cli(config, "audit", "verify", "--anchor", str(out))
        assert code == 0 and "1 anchor(s) match" in text_out, err
    finally:
        # The session's bridge goes on with the new key (its entries need it) and
        # without the command (its file goes away with tmp_path).
        await running.stop()
        running.config = running.config.model_copy(update={
            "audit": rotated.model_copy(update={"anchor_command": []})})
        await running.start()
