"""The leader's records as a leader on a node that failed leaves them (bridge.leader),
for the tests and bench/scale.py, which start bridges after one."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from bridge.leader import HELD, PROOF_KEY, STATE_KEY, ProcessMark


def mark_elsewhere() -> ProcessMark:
    """The mark of a process on another boot of a host (so not one this host can check)."""
    here = ProcessMark.of()
    return ProcessMark("0" * 8 + (here.boot[8:] if here else "-other-boot"),
                       here.pid_namespace if here else "pid:[1]", 2**22 + 1, 1)


async def as_left_by_a_failed_node(url: str, proved_ago: float | None) -> None:
    """In the database at `url` (PostgreSQL): the lock held by a process of another
    boot, which last proved it `proved_ago` seconds ago by the server's clock (None:
    never)."""
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(
                "INSERT INTO kv (key, value) VALUES (:key, :value) "
                "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"),
                {"key": STATE_KEY, "value": f"{HELD} {mark_elsewhere()}"})
            if proved_ago is None:
                await conn.execute(text("DELETE FROM kv WHERE key = :key"), {"key": PROOF_KEY})
            else:
                await conn.execute(text(
                    "INSERT INTO kv (key, value) VALUES "
                    "(:key, (extract(epoch FROM clock_timestamp()) - CAST(:ago AS float8))::text) "
                    "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"),
                    {"key": PROOF_KEY, "ago": float(proved_ago)})
    finally:
        await engine.dispose()
