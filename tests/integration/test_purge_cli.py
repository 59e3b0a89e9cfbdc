"""`civic-bridge purge [--dry-run]` as operators run it (a subprocess), on SQLite and
PostgreSQL: one line per table, a dry run changes nothing, the purge then deletes what
is past each period and nothing else; a never-consented contact goes the erasure's way
(audited, consent evidence kept by pseudonym)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import func, select

from bridge.auditchain import AuditKeys
from bridge.cli import init_config
from bridge.config import load_config
from bridge.db import Database
from bridge.db.invites import InviteAccountRow, InviteLinkRow
from bridge.db.models import (
    CitizenRow,
    ConsentRecordRow,
    InboundRow,
    MessageMapRow,
    OutboxRow,
    RoomBacklogRow,
    RoomMessageRow,
)
from bridge.types import EventID, Pseudonym, UserID, WamidHash
from bridge.whatsapp.webhook_parse import citizen_lane
from tests.fixtures.db import Backend
from tests.integration.test_cli import DEAD_HOMESERVER, assert_no_traceback, cli
from tests.integration.test_retention_periods import (
    ROOM,
    citizen,
    days_ago,
    link,
    outbox,
    set_row,
)

TABLES = (CitizenRow, OutboxRow, MessageMapRow, InviteLinkRow, InviteAccountRow, InboundRow,
          ConsentRecordRow, RoomBacklogRow, RoomMessageRow)


async def counts(db: Database) -> dict[str, int]:
    async with db.engine.connect() as conn:
        return {m.__tablename__: int((await conn.execute(
            select(func.count()).select_from(m))).scalar_one()) for m in TABLES}


async def seed(db: Database) -> dict[str, Any]:
    silent = await citizen(db, "prompted", seen=31)  # never consented, silent 31 days
    await db.consent.append(citizen_id=silent.id, pseudonym=Pseudonym(silent.pseudonym_code),
                            purpose="mirroring", state="prompted", notice_version="2",
                            notice_hash="0" * 64, channel="whatsapp", language="es")
    held = await db.inbound.enqueue("whatsapp", "wamid.held", "sealed",
                                    lane=citizen_lane(silent.index_hash))
    assert held is not None
    await db.inbound.hold(held, silent.id, datetime.now(UTC) + timedelta(days=1))
    notice = await outbox(db, silent, "sent", 1)  # the privacy notice they were sent
    recent = await citizen(db, "prompted", seen=29)
    granted = await citizen(db, "granted", seen=60)
    old_send, new_send = await outbox(db, granted, "sent", 31), await outbox(db, granted,
                                                                             "sent", 29)
    for n, age in enumerate((91, 89)):
        assert await db.messages.link((WamidHash(f"{n:064x}"), ""), ROOM, EventID(f"$e{n}"), "out")
        await set_row(db, MessageMapRow, MessageMapRow.event_id == f"$e{n}",
                      created_at=days_ago(age))
    # A WhatsApp room member (issue 17): room messages kept for them 15 and 13 days
    # (rooms.backlog_days: 14), and per-member wamid pairs 91 and 89 days old.
    for n, age in enumerate((15, 13)):
        assert await db.wa_rooms.keep(granted.id, ROOM, f"wr:$b{n}:{granted.id}", "sealed")
        await set_row(db, RoomBacklogRow, RoomBacklogRow.event_key == f"wr:$b{n}:{granted.id}",
                      created_at=days_ago(age))
    for n, age in enumerate((91, 89)):
        await db.wa_rooms.link((WamidHash(f"{n + 10:064x}"), "ct"), granted.id, ROOM,
                               EventID(f"$r{n}"))
        await set_row(db, RoomMessageRow, RoomMessageRow.event_id == f"$r{n}",
                      created_at=days_ago(age))
    old_link, new_link = await link(db, 40, expires=31), await link(db, 20, expires=10)
    account = UserID("@v_unused:agency.example")
    await db.invites.add_account(user_id=account, link_id=new_link, room_id=ROOM,
                                 display_name="Vecina")
    await set_row(db, InviteAccountRow, InviteAccountRow.user_id == account,
                  created_at=days_ago(31))
    return {"silent": silent, "held": held, "notice": notice, "recent": recent,
            "granted": granted, "old_send": old_send, "new_send": new_send,
            "old_link": old_link, "new_link": new_link}


async def test_purge_reports_per_table_and_a_dry_run_changes_nothing(
        tmp_path: Path, db_backend: Backend) -> None:
    url = await db_backend.migrated()
    raw = init_config("agency.example", DEAD_HOMESERVER)
    raw["database"] = {"url": url}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    config = load_config(tmp_path / "config.yaml")
    async with await Database.open(url, audit_keys=AuditKeys.from_base64(
            config.audit.key)) as db:
        rows = await seed(db)
        before = await counts(db)

        dry = await cli("purge", "-c", "config.yaml", "--dry-run", cwd=tmp_path)
        assert dry.returncode == 0, dry.stderr
        assert_no_traceback(dry)
        lines = dry.stdout.splitlines()
        for expected in (
                "outbox: 1 settled outbox sends would be deleted",
                "message_map: 1 message map pairs would be deleted",
                "citizens: 1 never-consented contacts would be deleted",
                "invite_links: 1 spent invite links would be deleted",
                "invite_accounts: 0 unused invite accounts would be deleted, 1 left (cannot "
                "tell without moderation.synapse_admin_token)",
                "inbound+outbox: 0 dead letters would be deleted",
                "wa_room_backlog: 1 undelivered room messages would be deleted",
                "wa_room_messages: 1 room message map pairs would be deleted",
                "dry run: nothing was deleted"):
            assert expected in lines, dry.stdout
        assert len(lines) == 15  # every step, one line each, and the dry-run note
        assert await counts(db) == before

        done = await cli("purge", "-c", "config.yaml", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "outbox: 1 settled outbox sends deleted" in done.stdout.splitlines()
        assert "citizens: 1 never-consented contacts deleted" in done.stdout.splitlines()
        silent = rows["silent"]
        assert await db.citizens.get(silent.id) is None
        # Everything linked to the contact went with them: held message, their sends.
        assert await db.inbound.get(rows["held"]) is None
        assert await db.outbox.get(rows["notice"]) is None
        assert await db.outbox.get(rows["old_send"]) is None
        for kept in ("recent", "granted"):
            assert await db.citizens.get(rows[kept].id) is not None
        assert await db.outbox.get(rows["new_send"]) is not None
        assert await db.messages.by_event(EventID("$e1")) is not None
        assert await db.messages.by_event(EventID("$e0")) is None
        assert await db.invites.get(rows["old_link"]) is None
        granted = rows["granted"]
        assert [e.event_key for e in await db.wa_rooms.backlog(granted.id)] == [
            f"wr:$b1:{granted.id}"]
        assert await db.wa_rooms.wamid_for("$r0", granted.id) is None
        assert await db.wa_rooms.wamid_for("$r1", granted.id) is not None
        assert await db.invites.get(rows["new_link"]) is not None
        # Consent evidence stays, by pseudonym; the erasure is audited with its reason.
        [record] = await db.consent.for_pseudonym(Pseudonym(silent.pseudonym_code))
        assert record.citizen_id is None
        erased = [e for e in await db.audit.list(limit=20) if e.action == "citizen.erase"]
        assert [(e.actor, e.object) for e in erased] == [
            ("retention", f"pseudonym {silent.pseudonym_code}")]
        assert "never consented" in (erased[0].reason or "")

        again = await cli("purge", "-c", "config.yaml", cwd=tmp_path)
        assert again.returncode == 0
        assert "citizens: 0 never-consented contacts deleted" in again.stdout.splitlines()


async def test_purge_refuses_a_database_that_is_not_migrated(
        tmp_path: Path, db_backend: Backend) -> None:
    raw = init_config("agency.example", DEAD_HOMESERVER)
    raw["database"] = {"url": await db_backend.blank()}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    result = await cli("purge", "-c", "config.yaml", "--dry-run", cwd=tmp_path)
    assert result.returncode == 2
    assert_no_traceback(result)
    assert "civic-bridge migrate -c config.yaml" in result.stderr
