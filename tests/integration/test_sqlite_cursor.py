"""SQLite statements run in one turn of aiosqlite's thread (bridge.db.sqlite_cursor),
and every way SQLAlchemy reads results still gets every row."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.db.engine import create_engine
from bridge.db.sqlite_cursor import EAGER_ROWS

MANY = 3 * EAGER_ROWS + 7  # more than one eager read, not a multiple of it


@pytest.fixture
async def conn(tmp_path: Path) -> AsyncIterator[AsyncConnection]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'cursor.db'}")
    async with engine.connect() as connection:
        await connection.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT UNIQUE)"))
        await connection.execute(text("INSERT INTO t (id, v) VALUES (:id, :v)"),
                                 [{"id": i, "v": f"v{i}"} for i in range(MANY)])
        await connection.commit()
        yield connection
    await engine.dispose()


async def _turns(conn: AsyncConnection) -> list[str]:
    """Count the hand-offs to the connection's thread from now on."""
    raw = await conn.get_raw_connection()
    driver: Any = raw.driver_connection
    turns: list[str] = []
    handoff = driver._execute

    async def counted(fn: Any, *args: Any, **kwargs: Any) -> Any:
        turns.append(getattr(fn, "__name__", repr(fn)))
        return await handoff(fn, *args, **kwargs)
    driver._execute = counted
    return turns


async def test_a_small_select_and_an_update_take_one_turn_each(conn: AsyncConnection) -> None:
    await conn.execute(text("SELECT 1"))  # the transaction's BEGIN is a turn of its own
    turns = await _turns(conn)
    assert (await conn.execute(text("SELECT v FROM t WHERE id = 3"))).scalar_one() == "v3"
    assert len(turns) == 1  # aiosqlite's own cursor: cursor, execute, fetchall, close
    result = await conn.execute(text("UPDATE t SET v = 'x3' WHERE id = 3"))
    assert result.rowcount == 1
    assert len(turns) == 2


async def test_a_large_select_returns_every_row_in_order(conn: AsyncConnection) -> None:
    rows = (await conn.execute(text("SELECT id FROM t ORDER BY id"))).scalars().all()
    assert rows == list(range(MANY))


async def test_a_streamed_select_returns_every_row_in_order(conn: AsyncConnection) -> None:
    seen: list[int] = []
    result = await conn.stream(text("SELECT id FROM t ORDER BY id"))
    async for partition in result.scalars().partitions(100):
        seen += partition
    assert seen == list(range(MANY))


async def test_a_stream_closed_early_leaves_the_connection_usable(
        conn: AsyncConnection) -> None:
    result = await conn.stream(text("SELECT id FROM t ORDER BY id"))
    assert (await result.fetchmany(5))[-1][0] == 4
    await result.close()
    assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar_one() == MANY


async def test_update_returning_returns_every_row_and_counts_them(
        conn: AsyncConnection) -> None:
    result = await conn.execute(text("UPDATE t SET v = 'u' || id WHERE id % 2 = 0 RETURNING id"))
    ids = sorted(result.scalars().all())
    assert ids == list(range(0, MANY, 2))
    assert (await conn.execute(text("SELECT count(*) FROM t WHERE v LIKE 'u%'"))
            ).scalar_one() == len(ids)


async def test_executemany_counts_rows_and_an_error_leaves_the_connection_usable(
        conn: AsyncConnection) -> None:
    result = await conn.execute(text("UPDATE t SET v = :v WHERE id = :id"),
                                [{"id": 1, "v": "a"}, {"id": 2, "v": "b"}])
    assert result.rowcount == 2
    with pytest.raises(IntegrityError):
        await conn.execute(text("INSERT INTO t (id, v) VALUES (:id, 'a')"), {"id": MANY})
    await conn.rollback()
    assert (await conn.execute(text("SELECT v FROM t WHERE id = 1"))).scalar_one() == "v1"
