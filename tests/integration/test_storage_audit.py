"""The keyed audit chain in the database, on SQLite and PostgreSQL: what `verify`
catches when someone with write access edits, deletes, reorders or re-chains entries,
the upgrade from the unkeyed chain, and key rotation."""

from __future__ import annotations

import base64
import secrets
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, text

from bridge.auditanchor import LAST_ANCHOR_DAY, AnchorPublisher
from bridge.auditchain import (
    GENESIS,
    Anchor,
    AuditKeys,
    entry_mac,
    key_id,
    legacy_hash,
    parse_anchors,
)
from bridge.db import Database, upgrade
from bridge.db.audit import AuditKeyMissing
from bridge.db.engine import create_engine
from bridge.db.models import AuditRow, utcnow
from bridge.metrics import Metrics
from bridge.model import AuditEntry


async def _raw(db: Database, sql: str, **params: object) -> None:
    async with db.engine.begin() as conn:
        await conn.execute(text(sql), params)


async def _entries(db: Database, n: int) -> list[AuditEntry]:
    return [await db.audit.append("admin-api", "room.kick", f"!r:x @u{i}:x", "ok", "spam")
            for i in range(n)]


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


async def test_entries_are_keyed_and_name_their_key(db: Database) -> None:
    entries = await _entries(db, 2)
    assert [e.scheme for e in entries] == ["hmac-sha256"] * 2
    kid = entries[0].key_id
    assert kid is not None and len(kid) == 8
    assert entries[1].prev_hash == entries[0].hash
    assert await db.audit.verify() == (True, None)
    assert await db.audit.head() == entries[1]


async def test_an_edited_field_is_caught_at_that_entry(db: Database) -> None:
    entries = await _entries(db, 4)
    for column, value in (("actor", "otra-persona"), ("action", "room.invite"),
                          ("object", "!r:x @nadie:x"), ("result", "denied"),
                          ("at", None)):
        async with db.engine.begin() as conn:
            before = (await conn.execute(text(f"SELECT {column} FROM audit_log WHERE id = :i"),
                                         {"i": entries[2].id})).scalar_one()
        if value is None:  # another entry's time, in whatever form the backend stores it
            await _raw(db, "UPDATE audit_log SET at = (SELECT at FROM audit_log WHERE "
                       "id = :o) WHERE id = :i", o=entries[0].id, i=entries[2].id)
        else:
            await _raw(db, f"UPDATE audit_log SET {column} = :v WHERE id = :i", v=value,
                       i=entries[2].id)
        assert await db.audit.verify() == (False, entries[2].id), column
        await _raw(db, f"UPDATE audit_log SET {column} = :v WHERE id = :i", v=before,
                   i=entries[2].id)
        assert await db.audit.verify() == (True, None), column


async def test_a_deleted_entry_is_caught_at_the_next_one(db: Database) -> None:
    entries = await _entries(db, 4)
    await _raw(db, "DELETE FROM audit_log WHERE id = :i", i=entries[1].id)
    assert await db.audit.verify() == (False, entries[2].id)


async def test_two_swapped_entries_are_caught(db: Database) -> None:
    entries = await _entries(db, 4)
    a, b = entries[1].id, entries[2].id
    await _raw(db, "UPDATE audit_log SET id = :tmp WHERE id = :a", tmp=10_000, a=a)
    await _raw(db, "UPDATE audit_log SET id = :a WHERE id = :b", a=a, b=b)
    await _raw(db, "UPDATE audit_log SET id = :b WHERE id = :tmp", b=b, tmp=10_000)
    assert await db.audit.verify() == (False, a)


async def test_swapped_contents_with_the_links_fixed_fail_the_mac(db: Database) -> None:
    # Ids stay, contents move: even with prev_hash and hash copied along, the MAC binds
    # an entry to its id.
    entries = await _entries(db, 3)
    x, y = entries[0], entries[1]
    await _raw(db, "UPDATE audit_log SET object = :o WHERE id = :i", o=y.object, i=x.id)
    await _raw(db, "UPDATE audit_log SET object = :o WHERE id = :i", o=x.object, i=y.id)
    assert await db.audit.verify() == (False, x.id)


async def _rechain(db: Database, from_id: int, rehash: Any) -> None:
    """Rewrite `reason` of entry `from_id` and recompute every hash from there on, as
    an insider with write access would; `rehash(row, prev)` -> (scheme, key_id, hash)."""
    async with db.engine.begin() as conn:
        rows = (await conn.execute(text("SELECT * FROM audit_log ORDER BY id"))).mappings().all()
    prev = GENESIS
    for row in rows:
        if row["id"] < from_id:
            prev = row["hash"]
            continue
        async with db.session() as session:
            entity = await session.get(AuditRow, row["id"])
            assert entity is not None
            if row["id"] == from_id:
                entity.reason = "motivo cambiado"
            entity.prev_hash = prev
            entity.scheme, entity.key_id, entity.hash = rehash(entity, prev)
            prev = entity.hash


async def test_a_rewrite_without_the_key_is_caught(db: Database) -> None:
    entries = await _entries(db, 5)

    def plain(row: AuditRow, prev: str) -> tuple[str, str | None, str]:
        return "sha256", None, legacy_hash(at=row.at, actor=row.actor, action=row.action,
                                           object=row.object, result=row.result,
                                           reason=row.reason, prev_hash=prev)

    # Plain SHA-256 from entry 3 on: a downgrade after keyed entries.
    await _rechain(db, entries[2].id, plain)
    assert await db.audit.verify() == (False, entries[2].id)
    # Plain SHA-256 over the whole trail: nothing is keyed, nothing can be trusted.
    await _rechain(db, entries[0].id, plain)
    assert await db.audit.verify() == (False, entries[0].id)

    # HMAC with a key of the attacker's own, under the real key id or their own.
    mine = secrets.token_bytes(32)
    for kid in (entries[0].key_id, key_id(mine)):
        def forged(row: AuditRow, prev: str, kid: str | None = kid) -> tuple[str, str, str]:
            assert kid is not None
            return "hmac-sha256", kid, entry_mac(
                mine, kid=kid, id=row.id, at=row.at, actor=row.actor, action=row.action,
                object=row.object, result=row.result, reason=row.reason, prev_hash=prev)

        await _rechain(db, entries[3].id, forged)
        assert (await db.audit.verify())[0] is False


async def test_the_newest_entries_removed_with_the_key_need_an_anchor(db: Database) -> None:
    # What the chain alone cannot see (documented): the tail removed. Anchors cover it
    # (tests/integration/test_audit.py).
    entries = await _entries(db, 3)
    await _raw(db, "DELETE FROM audit_log WHERE id = :i", i=entries[2].id)
    assert await db.audit.verify() == (True, None)


async def test_a_database_handle_without_the_key_writes_nothing(db: Database) -> None:
    await _entries(db, 1)
    keyless = Database(db.engine)
    with pytest.raises(AuditKeyMissing):
        await keyless.audit.append("admin", "room.kick", "o", "ok")
    with pytest.raises(AuditKeyMissing):
        await keyless.audit.verify()
    assert len(await db.audit.list()) == 1


async def test_rotation_keeps_old_entries_verifiable(db: Database) -> None:
    old = await _entries(db, 2)
    new_key = _b64(secrets.token_bytes(32))
    assert db._audit_keys is not None
    old_b64 = _b64(db._audit_keys.current)
    rotated = Database(db.engine, AuditKeys.from_base64(new_key, [old_b64]))
    assert await rotated.audit.verify() == (False, old[0].id)  # not sealed yet
    seal = await rotated.audit.seal()
    assert seal is not None and seal.action == "audit.key.rotated"
    assert seal.key_id != old[0].key_id and seal.prev_hash == old[-1].hash
    assert await rotated.audit.seal() is None  # once
    await rotated.audit.append("admin", "room.ban", "o", "ok")
    assert await rotated.audit.verify() == (True, None)
    # Without the retired key, the entries it keyed cannot be checked.
    forgetful = Database(db.engine, AuditKeys.from_base64(new_key))
    assert await forgetful.audit.verify() == (False, old[0].id)
    # The old key alone cannot add to the trail any more.
    await db.audit.append("admin", "room.kick", "o", "ok")
    assert (await rotated.audit.verify())[0] is False


async def test_upgrade_from_the_unkeyed_chain(blank_db_url: str) -> None:
    """A trail written before 0009 (plain SHA-256) is sealed at start and stays checked."""
    await upgrade(blank_db_url, "0006")
    legacy = Database(create_engine(blank_db_url))
    prev, ids = GENESIS, []
    try:
        for i in range(3):
            fields: dict[str, Any] = {"at": utcnow(), "actor": "admin-api",
                                      "action": "room.kick", "object": f"o{i}",
                                      "result": "ok", "reason": None}
            digest = legacy_hash(**fields, prev_hash=prev)
            async with legacy.engine.begin() as conn:
                result = await conn.execute(insert(AuditRow).values(
                    **fields, prev_hash=prev, hash=digest).returning(AuditRow.id))
                ids.append(result.scalar_one())
            prev = digest
    finally:
        await legacy.close()
    await upgrade(blank_db_url)
    keys = AuditKeys.from_base64(_b64(secrets.token_bytes(32)))
    db = await Database.open(blank_db_url, audit_keys=keys)
    try:
        rows = await db.audit.list()
        assert [(e.scheme, e.key_id) for e in rows] == [("sha256", None)] * 3
        assert await db.audit.verify() == (False, ids[0])  # unsealed
        seal = await db.audit.seal()
        assert seal is not None and seal.action == "audit.chain.keyed"
        assert seal.prev_hash == prev and f"up to {ids[-1]}" in (seal.reason or "")
        await db.audit.append("admin-api", "room.ban", "o", "ok")
        assert await db.audit.verify() == (True, None)
        # A legacy entry is still covered: edited, its plain hash fails…
        await _raw(db, "UPDATE audit_log SET object = 'x' WHERE id = :i", i=ids[1])
        assert await db.audit.verify() == (False, ids[1])
        # …and with the plain chain recomputed up to the seal, the seal's keyed link does.
        prev = (await db.audit.list(limit=1, before_id=ids[1]))[0].hash
        for entry_id in ids[1:]:
            async with db.session() as session:
                row = await session.get(AuditRow, entry_id)
                assert row is not None
                row.prev_hash, row.hash = prev, legacy_hash(
                    at=row.at, actor=row.actor, action=row.action, object=row.object,
                    result=row.result, reason=row.reason, prev_hash=prev)
                prev = row.hash
        assert await db.audit.verify() == (False, seal.id)
    finally:
        await db.close()


# --- the daily anchor (bridge.auditanchor), with a real command --------------------


def _writer(path: Path, status: int = 0) -> list[str]:
    """A command that appends its stdin to `path` and exits with `status`."""
    script = (f"import sys; open({str(path)!r}, 'a').write(sys.stdin.read()); "
              f"sys.exit({status})")
    return [sys.executable, "-c", script]


async def test_the_anchor_is_exported_once_a_day_and_retried_when_it_fails(
        db: Database, tmp_path: Path) -> None:
    entries = await _entries(db, 3)
    metrics = Metrics()
    day = [datetime(2026, 12, 1, 23, 0, tzinfo=UTC)]
    out = tmp_path / "anchors.log"

    def counted(result: str) -> float:
        return metrics.registry.get_sample_value("civic_bridge_audit_anchors_total",
                                                 {"result": result}) or 0.0

    failing = AnchorPublisher(db, _writer(out, status=3), metrics, now=lambda: day[0])
    assert await failing.tick() is None
    assert counted("failed") == 1 and await db.kv.get(LAST_ANCHOR_DAY) is None
    missing = AnchorPublisher(db, [str(tmp_path / "no-such-program")], metrics,
                              now=lambda: day[0])
    assert await missing.tick() is None and counted("failed") == 2

    publisher = AnchorPublisher(db, _writer(out), metrics, now=lambda: day[0])
    out.unlink()
    anchor = await publisher.tick()
    assert anchor == Anchor("2026-12-01", entries[-1].id, entries[-1].hash)
    assert parse_anchors(out.read_text()) == [anchor]
    assert counted("ok") == 1
    head = await db.audit.head()
    assert head is not None and (head.action, head.object) == ("audit.anchor",
                                                               f"entry {anchor.id}")
    assert await publisher.tick() is None  # once a day, also after a restart (kv)
    day[0] += timedelta(hours=2)
    second = await publisher.tick()
    assert second is not None and second.date == "2026-12-02" and second.id == head.id
    assert len(parse_anchors(out.read_text())) == 2

    # A tampered trail is not vouched for: counted and logged, nothing exported.
    await _raw(db, "UPDATE audit_log SET reason = 'x' WHERE id = :i", i=entries[0].id)
    day[0] += timedelta(days=1)
    assert await publisher.tick() is None and counted("broken") == 1
    assert len(parse_anchors(out.read_text())) == 2
