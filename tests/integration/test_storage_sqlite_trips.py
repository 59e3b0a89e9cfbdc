"""SQLite through aiosqlite: each statement is one trip to the connection's thread.

aiosqlite's own cursor takes four (create the cursor, execute, fetch, close), each a
wait for the event loop's next turn; on a busy loop (the inbound lanes, the Matrix
sends) a one-row read took several milliseconds. The bridge's cursor executes, fetches
and closes in one trip, and must behave as the driver's did for everything SQLAlchemy
asks of it: rows, row counts, last row ids, RETURNING, many rows, errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from bridge.db import engine as engine_module
from bridge.db.engine import create_engine

pytestmark = pytest.mark.integration


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'trips.db'}")
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT UNIQUE)"))
    yield engine
    await engine.dispose()


@pytest.fixture
def trips(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every function sent to an SQLite connection's thread, from now on."""
    sent: list[object] = []
    original = engine_module._SQLiteConnection._execute

    async def counted(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        sent.append(fn)
        return await original(self, fn, *args, **kwargs)

    monkeypatch.setattr(engine_module._SQLiteConnection, "_execute", counted)
    return sent


async def test_a_statement_is_one_trip_to_the_connection_thread(
        engine: AsyncEngine, trips: list[object]) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("INSERT INTO t (v) VALUES ('a')"))
        await conn.commit()
        trips.clear()
        assert (await conn.execute(text("SELECT v FROM t WHERE id = 1"))).scalar() == "a"
        # The transaction's BEGIN (bridge.db.engine) goes with its first statement.
        assert len(trips) == 1, trips
        trips.clear()
        await conn.execute(text("UPDATE t SET v = 'b' WHERE id = 1"))
        assert len(trips) == 1, trips


async def test_rows_counts_ids_and_returning_are_as_the_driver_gives_them(
        engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        inserted = await conn.execute(text("INSERT INTO t (v) VALUES ('x')"))
        assert inserted.lastrowid == 1
        many = await conn.execute(text("INSERT INTO t (v) VALUES (:v)"),
                                  [{"v": f"m{i}"} for i in range(5)])
        assert many.rowcount == 5
        updated = await conn.execute(text("UPDATE t SET v = v || '!' WHERE v LIKE 'm%'"))
        assert updated.rowcount == 5
        returned = await conn.execute(text("DELETE FROM t WHERE v LIKE 'm%' RETURNING id"))
        assert sorted(returned.scalars()) == [2, 3, 4, 5, 6]
        none = await conn.execute(text("SELECT v FROM t WHERE id = 99"))
        assert none.first() is None


async def test_more_rows_than_one_trip_brings_are_all_read(engine: AsyncEngine) -> None:
    n = engine_module.PREFETCH_ROWS * 2 + 7
    async with engine.begin() as conn:
        await conn.execute(text("INSERT INTO t (v) VALUES (:v)"),
                           [{"v": f"r{i:05}"} for i in range(n)])
    async with engine.connect() as conn:
        rows = (await conn.execute(text("SELECT v FROM t ORDER BY id"))).scalars().all()
        assert rows == [f"r{i:05}" for i in range(n)]
        streamed = await conn.stream(text("SELECT v FROM t ORDER BY id"))
        seen = [v async for v in streamed.scalars()]
        assert seen == rows
        # A result left half read, then another statement on the same connection.
        partial = await conn.stream(text("SELECT v FROM t ORDER BY id"))
        assert (await partial.fetchmany(3)) == [(f"r{i:05}",) for i in range(3)]
        await partial.close()
        assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar() == n


async def test_an_error_is_the_driver_error_and_the_connection_goes_on(
        engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("INSERT INTO t (v) VALUES ('dup')"))
        with pytest.raises(IntegrityError):
            await conn.execute(text("INSERT INTO t (v) VALUES ('dup')"))
        await conn.rollback()
        await conn.execute(text("INSERT INTO t (v) VALUES ('ok')"))
        await conn.commit()
        assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar() == 1


async def test_a_transaction_begins_with_its_first_statement_and_takes_the_lock(
        tmp_path: Path) -> None:
    """BEGIN IMMEDIATE travels with the first statement, a read included: the write lock
    is taken before the read (a read-then-write transaction cannot lose the lock in
    between), and a transaction with no statement leaves nothing open."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'lock.db'}"
    first, second = create_engine(url), create_engine(url)
    try:
        async with first.begin() as conn:
            await conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
        async with first.connect() as holder, second.connect() as other:
            await holder.execute(text("SELECT count(*) FROM t"))  # BEGIN IMMEDIATE + read
            raw = await other.get_raw_connection()
            driver = raw.driver_connection
            assert driver is not None
            await driver.execute("PRAGMA busy_timeout = 0")
            with pytest.raises(OperationalError, match="locked"):
                await other.execute(text("INSERT INTO t DEFAULT VALUES"))
            await other.rollback()
            await holder.commit()
            await other.execute(text("INSERT INTO t DEFAULT VALUES"))
            await other.commit()
        async with first.connect() as conn:
            await conn.begin()
            await conn.commit()  # nothing was executed: nothing to commit, no error
            assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar() == 1
            await conn.rollback()
    finally:
        await first.dispose()
        await second.dispose()
