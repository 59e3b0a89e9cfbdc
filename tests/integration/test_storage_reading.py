"""`Database.reading`: reads from one snapshot of the last commit. On SQLite they take no
writer turn, so the inbound lanes' reads do not queue behind the worker's writes (one
writer; every write session waits its turn); a write in one is refused on either
backend."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.exc import DBAPIError, OperationalError

from bridge.db import Database


async def _citizen(db: Database) -> int:
    citizen = await db.citizens.create(index_hash="a" * 64, identifier_ct="x",
                                       pseudonym_code="R001")
    return citizen.id


async def test_a_read_does_not_wait_for_a_write_in_progress(db: Database) -> None:
    citizen_id = await _citizen(db)
    before = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    await db.citizens.touch_inbound(citizen_id, before)
    writing, read = asyncio.Event(), asyncio.Event()
    seen: list[datetime | None] = []

    async def reader() -> None:
        await writing.wait()
        async with db.reading() as tx:
            citizen = await tx.citizens.get(citizen_id)
            assert citizen is not None
            seen.append(citizen.last_inbound_at)
        read.set()

    task = asyncio.create_task(reader())
    async with db.transaction() as tx:  # holds SQLite's one writer until it ends
        await tx.citizens.touch_inbound(citizen_id, before + timedelta(hours=1))
        writing.set()
        async with asyncio.timeout(5):
            await read.wait()  # a read that waited for this writer never gets here
    await task
    assert seen == [before]  # the last commit, not the write in progress
    async with db.reading() as tx:
        citizen = await tx.citizens.get(citizen_id)
    assert citizen is not None and citizen.last_inbound_at == before + timedelta(hours=1)


async def test_a_write_in_a_read_is_refused(db: Database) -> None:
    citizen_id = await _citizen(db)
    with pytest.raises((OperationalError, DBAPIError)):
        async with db.reading() as tx:
            await tx.citizens.touch_inbound(citizen_id, datetime.now(UTC))
    citizen = await db.citizens.get(citizen_id)
    assert citizen is not None and citizen.last_inbound_at is None
