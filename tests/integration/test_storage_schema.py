"""Migrations and the schema check, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, inspect, text
from sqlalchemy.exc import IntegrityError, StatementError

from bridge.db import (
    FIX_COMMAND,
    VERSION_TABLE,
    Database,
    downgrade,
    head_revision,
    safe_url,
    schema_status,
    upgrade,
)
from bridge.db.engine import create_engine
from bridge.db.models import Base
from bridge.errors import SchemaError
from bridge.privacy import AAD_PAYLOAD, Cipher
from bridge.types import EventID, RoomID, UserID
from bridge.whatsapp.outbound import adopt_legacy_holds, held_aad


async def _execute(url: str, *statements: str) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            for statement in statements:
                await conn.execute(text(statement))
    finally:
        await engine.dispose()


async def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await engine.dispose()


async def test_empty_database_is_refused_with_the_fix(blank_db_url: str) -> None:
    assert await schema_status(blank_db_url) == "empty"
    with pytest.raises(SchemaError) as err:
        await Database.open(blank_db_url)
    assert str(err.value) == f"database is empty; run: {FIX_COMMAND}"
    assert FIX_COMMAND == "civic-bridge migrate -c CONFIG"


async def test_upgrade_makes_it_current_and_is_idempotent(blank_db_url: str) -> None:
    await upgrade(blank_db_url)
    assert await schema_status(blank_db_url) == "current"
    await upgrade(blank_db_url)  # a second `civic-bridge migrate` changes nothing
    assert await schema_status(blank_db_url) == "current"
    assert VERSION_TABLE in await _tables(blank_db_url)
    async with await Database.open(blank_db_url) as db:
        await db.ping()


async def test_foreign_database_is_refused_and_left_alone(blank_db_url: str) -> None:
    await _execute(blank_db_url, "CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    assert await schema_status(blank_db_url) == "foreign"
    with pytest.raises(SchemaError) as err:
        await Database.open(blank_db_url)
    message = str(err.value)
    assert "is not civic-bridge's" in message
    assert f"no {VERSION_TABLE}" in message
    assert "point database.url at an empty database" in message
    # migrate must not add our tables next to someone else's
    with pytest.raises(SchemaError):
        await upgrade(blank_db_url)
    assert await _tables(blank_db_url) == {"invoices"}


async def test_database_behind_is_refused_then_migrated(blank_db_url: str) -> None:
    await upgrade(blank_db_url)
    await downgrade(blank_db_url, "base")  # ours (version table) but at no revision
    assert await _tables(blank_db_url) == {VERSION_TABLE}
    assert await schema_status(blank_db_url) == "behind"
    with pytest.raises(SchemaError) as err:
        await Database.open(blank_db_url)
    assert str(err.value) == (
        f"database is behind the code's schema (at no revision, need {head_revision()}); "
        f"run: {FIX_COMMAND}"
    )
    await upgrade(blank_db_url)
    assert await schema_status(blank_db_url) == "current"


async def test_database_ahead_is_refused(blank_db_url: str) -> None:
    await upgrade(blank_db_url)
    await _execute(blank_db_url, f"UPDATE {VERSION_TABLE} SET version_num = '9999'")
    assert await schema_status(blank_db_url) == "ahead"
    with pytest.raises(SchemaError, match=r"ahead of the code's schema \(at 9999"):
        await Database.open(blank_db_url)
    with pytest.raises(SchemaError):
        await upgrade(blank_db_url)


async def test_open_without_check_skips_the_schema_check(blank_db_url: str) -> None:
    async with await Database.open(blank_db_url, check=False) as db:
        await db.ping()


async def test_messages_never_show_the_password(blank_db_url: str) -> None:
    assert safe_url("postgresql+asyncpg://bridge:s3cret@db/bridge") == (
        "postgresql+asyncpg://bridge:***@db/bridge"
    )
    if not blank_db_url.startswith("postgresql"):
        return
    # Trust auth ignores the password, so the message is built from a URL that has one.
    with_password = blank_db_url.replace("postgres@", "postgres:s3cret@", 1)
    await _execute(with_password, "CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    with pytest.raises(SchemaError) as err:
        await Database.open(with_password)
    assert "s3cret" not in str(err.value)
    assert ":***@" in str(err.value)


def _diff(conn: Connection) -> list[object]:
    context = MigrationContext.configure(
        conn, opts={"version_table": VERSION_TABLE, "compare_type": True}
    )
    return list(compare_metadata(context, Base.metadata))


async def test_migrations_produce_exactly_the_models(db: Database) -> None:
    async with db.engine.connect() as conn:
        assert await conn.run_sync(_diff) == []


async def test_sqlite_pragmas_and_foreign_keys(db: Database) -> None:
    if db.dialect == "sqlite":
        async with db.engine.connect() as conn:
            assert (await conn.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
            assert (await conn.execute(text("PRAGMA foreign_keys"))).scalar() == 1
    # Enforced on both backends: no outbox row for a citizen that does not exist.
    with pytest.raises(IntegrityError):
        await db.outbox.add("$e", 999, RoomID("!r:x"), "payload")


async def test_timestamps_are_aware_utc_and_naive_ones_refused(db: Database) -> None:
    citizen = await db.citizens.create(
        index_hash="a" * 64, identifier_ct="ct", pseudonym_code="K7Q2"
    )
    assert citizen.created_at.tzinfo is UTC
    await db.citizens.touch_inbound(citizen.id, datetime(2025, 3, 1, 12, 0, tzinfo=UTC))
    stored = await db.citizens.get(citizen.id)
    assert stored is not None
    assert stored.last_inbound_at == datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    with pytest.raises((StatementError, ValueError), match="naive datetime"):
        await db.citizens.touch_inbound(citizen.id, datetime(2025, 3, 2, 12, 0))


async def test_database_errors_do_not_carry_the_parameters(db: Database) -> None:
    """A failing statement's error text (logged, shown in tracebacks) must not end with
    `[parameters: ...]`: the values are message bodies, ciphertexts and hashes."""
    engine = create_engine(db.engine.url.render_as_string(hide_password=False))
    secret = "cuerpo del mensaje 600112233"
    try:
        async with engine.begin() as conn:
            with pytest.raises(StatementError) as caught:
                await conn.execute(text("INSERT INTO no_such_table (x) VALUES (:x)"),
                                   {"x": secret})
    finally:
        await engine.dispose()
    assert secret not in str(caught.value)
    assert "hidden due to hide_parameters" in str(caught.value)


async def test_sessions_cancelled_midway_leave_no_write_lock(tmp_path: Path) -> None:
    """A task cancelled inside a session (a bridge stopping) must not leave SQLite's
    write lock behind: the next writer on the file (the restarted bridge, `migrate`)
    would find "database is locked" for good. Cancelled at random points, many times."""
    path = tmp_path / "cancel.db"
    url = f"sqlite+aiosqlite:///{path}"
    await _execute(url, "CREATE TABLE t (x INTEGER)")
    rng = random.Random(2026)
    for _ in range(150):
        db = Database(create_engine(url))

        async def write(db: Database = db) -> None:
            while True:
                async with db.session() as session:
                    await session.execute(text("INSERT INTO t VALUES (1)"))
                    await session.execute(text("SELECT count(*) FROM t"))

        tasks = [asyncio.create_task(write()) for _ in range(3)]
        await asyncio.sleep(rng.random() * 0.02)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await db.close()
        probe = sqlite3.connect(path, timeout=0.2, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")  # "database is locked" if a lock was left
            probe.execute("ROLLBACK")
        finally:
            probe.close()


async def test_closing_a_connection_sqlalchemy_terminated_returns(tmp_path: Path) -> None:
    """After a cancellation SQLAlchemy terminates an SQLite connection and may close it
    right after; with aiosqlite 0.22 as it comes, that close waits for ever."""
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'close.db'}")
    try:
        async with engine.connect() as conn:
            raw = await conn.get_raw_connection()
            driver = raw.driver_connection
            assert driver is not None
            driver.stop()  # what terminating does
            async with asyncio.timeout(5):
                await driver.close()
            await conn.invalidate()  # the pool must not hand it out again
    finally:
        await engine.dispose()


async def test_revision_0015_moves_mutes_reactions_and_holds_out_of_kv(
        blank_db_url: str) -> None:
    """Mutes and reactions move in the migration; held messages (sealed, the migration
    has no key) when the bridge starts; a downgrade puts mutes and reactions back."""
    cipher = Cipher(os.urandom(32))
    await upgrade(blank_db_url, "0013")
    held_at = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
    legacy_held = cipher.encrypt_json({"at": held_at.isoformat(), "room_id": "!p:x",
                                       "payloads": [{"type": "text", "body": "ES91"}]},
                                      aad=AAD_PAYLOAD)
    await _execute(blank_db_url, *[
        f"INSERT INTO kv (key, value) VALUES ('{k}', '{v}')" for k, v in [
            ("mute:!r:x:@cb_a:x", "50"), ("mute:!r:x:@cb_b:x", "null"),
            ("reaction:@cb_a:x:$target", "$reaction"), ("held-out:$held", legacy_held),
            ("sync", "s1")]])
    await upgrade(blank_db_url)
    db = await Database.open(blank_db_url)
    try:
        assert await db.mutes.previous_level(RoomID("!r:x"), UserID("@cb_a:x")) == 50
        assert await db.mutes.forget_user(UserID("@cb_b:x")) == 1  # muted, no level kept
        assert await db.reactions.get(UserID("@cb_a:x"), EventID("$target")) == "$reaction"
        assert await db.held.get(EventID("$held")) is None  # not yet: needs the key
        assert await adopt_legacy_holds(db, cipher) == 1
        held = await db.held.get(EventID("$held"))
        assert held is not None and (held.room_id, held.held_at) == ("!p:x", held_at)
        assert cipher.decrypt_json(held.payloads_ct, aad=held_aad("$held")) == \
            [{"type": "text", "body": "ES91"}]
        assert [k for k, _ in await db.kv.with_prefix("")] == ["sync"]
        assert await adopt_legacy_holds(db, cipher) == 0  # idempotent
    finally:
        await db.close()
    await downgrade(blank_db_url, "0013")
    engine = create_engine(blank_db_url)
    try:
        async with engine.connect() as conn:
            rows = dict((await conn.execute(text("SELECT key, value FROM kv"))).all())
    finally:
        await engine.dispose()
    assert rows == {"mute:!r:x:@cb_a:x": "50", "reaction:@cb_a:x:$target": "$reaction",
                    "sync": "s1"}
