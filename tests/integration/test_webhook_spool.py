"""The webhook spool (bridge.db.spool) and the way its rows reach the queue, on SQLite
and PostgreSQL (the spool is a file; the queue it feeds is either backend): one row
per key, moved once, oldest first, nothing lost to a crash between spool and queue,
and the worker not idle before spooled rows are done. Also SQLite's session turns
shared with a second event loop on another thread (the ingest thread's database)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import event, select

from bridge.db import Database, InboundItem
from bridge.db.engine import is_private
from bridge.db.models import InboundRow
from bridge.db.spool import Spool, spool_path
from bridge.webhook_ingest import SPOOL_BATCH, take_spooled
from bridge.worker import InboundWorker


def test_the_spool_sits_next_to_an_sqlite_file_and_nowhere_else() -> None:
    assert spool_path("sqlite+aiosqlite:////var/lib/cb/bridge.db") == Path(
        "/var/lib/cb/bridge.db-ingest")
    assert spool_path("postgresql+asyncpg://cb@db/cb") is None
    assert spool_path("sqlite+aiosqlite:///:memory:") is None
    assert is_private("sqlite+aiosqlite:///:memory:")
    assert not is_private("sqlite+aiosqlite:////var/lib/cb/bridge.db")


def test_the_spool_keeps_one_row_per_key_oldest_first(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "bridge.db-ingest")
    try:
        spool.put([("whatsapp", "k1", "p1", "a"), ("whatsapp", "k2", "p2", "b")])
        spool.put([("whatsapp", "k1", "p1 again", "a"), ("whatsapp", "k3", "p3", "a")])
        rows = spool.head(10)
        assert [(r.dedupe_key, r.payload, r.lane) for r in rows] == [
            ("k1", "p1", "a"), ("k2", "p2", "b"), ("k3", "p3", "a")]
        spool.remove([rows[0].id])
        assert [r.dedupe_key for r in spool.head(10)] == ["k2", "k3"]
    finally:
        spool.close()
    reopened = Spool(tmp_path / "bridge.db-ingest")  # committed: survives the process
    try:
        assert len(reopened) == 2
    finally:
        reopened.close()


def test_a_large_delivery_is_spooled_in_its_order_and_removed_at_once(tmp_path: Path) -> None:
    """A delivery's rows keep its order, not their keys', however many there are; a
    take removes them all in one call."""
    keys = [f"{(i * 7919) % 1000:03d}-{i}" for i in range(1000)]
    spool = Spool(tmp_path / "bridge.db-ingest")
    try:
        spool.put([("whatsapp", key, f"payload {key}", f"lane {i % 3}")
                   for i, key in enumerate(keys)])
        rows = spool.head(2000)
        assert [r.dedupe_key for r in rows] == keys
        assert all(r.payload == f"payload {r.dedupe_key}" for r in rows)
        assert [r.id for r in rows] == sorted(r.id for r in rows)
        spool.remove([r.id for r in rows[:999]])
        assert [r.dedupe_key for r in spool.head(10)] == keys[999:]
    finally:
        spool.close()


async def _queued(db: Database) -> list[tuple[str, str, str]]:
    async with db.session() as session:
        rows = (await session.scalars(select(InboundRow).order_by(InboundRow.id))).all()
    return [(r.dedupe_key, r.payload, r.lane) for r in rows]


async def test_a_batch_of_spooled_rows_goes_into_the_queue_in_one_statement(
        db: Database, tmp_path: Path) -> None:
    """While spooled rows move, the queue's one SQLite writer is held and every lane
    waits: a burst of webhooks (200 rows a batch) took one INSERT per row, each a hop
    to the database's thread and back. One statement for the batch, order kept, rows
    queued before (a crash between queue and spool) skipped."""
    spool = Spool(tmp_path / "spool")
    inserts: list[int] = []

    def count(_conn: object, _cursor: object, statement: str, parameters: object,
              _context: object, executemany: bool) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO INBOUND"):
            inserts.append(1)

    try:
        assert await db.inbound.enqueue("whatsapp", "k7", "p7", lane="b") is not None
        spool.put([("whatsapp", f"k{i}", f"p{i}", "ab"[i % 2]) for i in range(200)])
        event.listen(db.engine.sync_engine, "before_cursor_execute", count)
        try:
            assert await take_spooled(db, spool) == {"a", "b"}
        finally:
            event.remove(db.engine.sync_engine, "before_cursor_execute", count)
        assert len(inserts) == 1
        queued = await _queued(db)
        assert queued[0] == ("k7", "p7", "b")
        assert queued[1:] == [(f"k{i}", f"p{i}", "ab"[i % 2]) for i in range(200) if i != 7]
        assert len(spool) == 0
    finally:
        spool.close()


async def test_spooled_rows_are_queued_once_and_leave_the_spool(
        db: Database, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    try:
        # k0 was queued, and the process died before it left the spool.
        assert await db.inbound.enqueue("whatsapp", "k0", "p0", lane="a") is not None
        spool.put([("whatsapp", "k0", "p0", "a"), ("whatsapp", "k1", "p1", "b"),
                   ("whatsapp", "k2", "p2", "a")])
        assert await take_spooled(db, spool) == {"a", "b"}
        assert await _queued(db) == [("k0", "p0", "a"), ("k1", "p1", "b"), ("k2", "p2", "a")]
        assert len(spool) == 0
        assert await take_spooled(db, spool) == set()
    finally:
        spool.close()


class _Burst(Spool):
    """A spool that another webhook lands in each time a take removes rows, as during
    a burst the ingest thread keeps committing while the worker takes."""

    def __init__(self, path: Path, arrivals: int) -> None:
        super().__init__(path)
        self.arrivals = arrivals

    def remove(self, ids: Sequence[int]) -> None:
        super().remove(ids)
        if self.arrivals:
            self.put([("whatsapp", f"late{self.arrivals}", "x", "late")])
            self.arrivals -= 1


async def test_a_take_ends_with_what_it_found_and_leaves_a_burst_to_later_rounds(
        db: Database, tmp_path: Path) -> None:
    """Taking the spool until it is empty meant that no lane started before a burst of
    webhooks ended (70-135 ms of 50 back-to-back deliveries, issue 16). Each row
    spooled meanwhile wakes the worker on its own, so the next round takes it."""
    spool = _Burst(tmp_path / "spool", arrivals=50)
    try:
        spool.put([("whatsapp", "k1", "p1", "a"), ("whatsapp", "k2", "p2", "b")])
        assert await take_spooled(db, spool) == {"a", "b"}
        assert [r.dedupe_key for r in spool.head(10)] == ["late50"]
        assert await take_spooled(db, spool) == {"late"}
        assert [k for k, _p, _l in await _queued(db)] == ["k1", "k2", "late50"]
    finally:
        spool.close()


async def test_a_backlog_larger_than_a_batch_is_taken_in_one_round(
        db: Database, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")  # what a crash left: more than SPOOL_BATCH rows
    try:
        spool.put([("whatsapp", f"k{i}", "p", f"lane{i % 3}") for i in range(SPOOL_BATCH * 2 + 1)])
        assert await take_spooled(db, spool) == {"lane0", "lane1", "lane2"}
        assert len(spool) == 0
        assert len(await _queued(db)) == SPOOL_BATCH * 2 + 1
    finally:
        spool.close()


async def test_the_worker_takes_what_a_crash_left_in_the_spool_before_it_is_idle(
        db: Database, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    seen: list[str] = []

    async def handler(item: InboundItem) -> None:
        seen.append(item.payload)

    # Committed (and answered) by a process that was killed before its worker ran.
    spool.put([("whatsapp", "k1", "a1", "a"), ("whatsapp", "k2", "b1", "b"),
               ("whatsapp", "k3", "a2", "a")])
    worker = InboundWorker(db, {"whatsapp": handler},
                           intake={"whatsapp": lambda: take_spooled(db, spool)})
    worker.start()
    try:
        await asyncio.sleep(0)
        await asyncio.wait_for(worker.idle["whatsapp"].wait(), 30)
        assert sorted(seen) == ["a1", "a2", "b1"]
        assert seen.index("a1") < seen.index("a2")  # in order within the lane
        # More rows, as the ingest thread spools them: a wake brings them in.
        spool.put([("whatsapp", "k4", "b2", "b")])
        worker.wake("whatsapp", "b")
        await asyncio.sleep(0)
        await asyncio.wait_for(worker.idle["whatsapp"].wait(), 30)
        assert seen[-1] == "b2"
        assert len(spool) == 0
    finally:
        await worker.stop()
        spool.close()


async def test_sessions_from_a_second_thread_and_loop_take_turns(db: Database) -> None:
    """The ingest thread has a Database of its own on the same file: its writes and
    the bridge's run side by side without "database is locked" (SQLite) or loss."""
    url = db.engine.url.render_as_string(hide_password=False)
    per_side = 40

    async def other_side() -> None:
        other = await Database.open(url, check=False)
        try:
            for i in range(per_side):
                with other.urgent():
                    await other.inbound.enqueue("whatsapp", f"t{i}", "x", lane="t")
        finally:
            await other.close()

    failure: list[BaseException] = []

    def thread_main() -> None:
        try:
            asyncio.run(other_side())
        except BaseException as exc:  # reported below
            failure.append(exc)

    thread = threading.Thread(target=thread_main)
    thread.start()
    for i in range(per_side):
        async with db.transaction() as tx:
            await tx.inbound.enqueue("whatsapp", f"m{i}", "x", lane="m")
            await asyncio.sleep(0)  # hold the session across a turn of the loop
    await asyncio.to_thread(thread.join)
    assert failure == []
    keys = {key for key, _, _ in await _queued(db)}
    assert keys == {f"t{i}" for i in range(per_side)} | {f"m{i}" for i in range(per_side)}
