"""The audit trail: what GET /admin/v1/audit shows, the `civic-bridge admin audit` CLI,
and tampering (an edited or removed row) being detected by both."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import text

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
