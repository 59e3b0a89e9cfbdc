"""EXPLAIN of the bridge's hot look-ups, for bench/scale.py (not a benchmark itself).

The SQL is not copied here: the bridge's own repository methods are called and the
statements they send are captured from the engine (`before_cursor_execute`), then run
again under `EXPLAIN (ANALYZE, BUFFERS)` with the same parameters, in a transaction that
is rolled back (the outbox claim is an UPDATE). So a change to a repository's query
shows up here without touching the bench.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from sqlalchemy import event, text

from bridge.config import Config
from bridge.db import Database
from bridge.privacy import Privacy
from bridge.types import EventID, WamidHash

INDEX_NODES = ("Index Scan", "Index Only Scan", "Bitmap Index Scan")


async def explain_hot_lookups(config: Config, citizen_key: str) -> list[dict[str, Any]]:
    """[{name, sql, index (bool), node (the plan's scan lines), ms, rows_in_table}]."""
    db = await Database.open(config.database.url)
    captured: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        captured.append((statement, parameters))

    try:
        async with db.engine.connect() as conn:
            row = (await conn.execute(text(
                "SELECT wamid_hash, event_id FROM message_map ORDER BY id DESC LIMIT 1"))).first()
            counts = {t: (await conn.execute(text(f"SELECT COUNT(*) FROM {t}"))).scalar_one()
                      for t in ("citizens", "outbox", "message_map")}
        wamid_hash, event_id = (row[0], row[1]) if row else ("0" * 64, "$none")
        index = Privacy.from_config(config.privacy).index
        now = datetime.now(UTC)
        calls: list[tuple[str, str, Any]] = [
            ("citizen by keyed hash", "citizens",
             lambda: db.citizens.by_index(index.digest(citizen_key))),
            ("outbox poll (lane heads)", "outbox", lambda: db.outbox.lane_heads(now, 16)),
            ("outbox claim (begin attempts)", "outbox",
             lambda: db.outbox.begin_attempts([-1, -2, -3], now + timedelta(minutes=5))),
            ("message map by wamid hash", "message_map",
             lambda: db.messages.by_wamid(WamidHash(wamid_hash))),
            ("message map by event id", "message_map",
             lambda: db.messages.by_event(EventID(event_id))),
        ]
        statements: list[tuple[str, str, str, Any]] = []
        sync_engine = db.engine.sync_engine
        event.listen(sync_engine, "before_cursor_execute", capture)
        try:
            for name, table, call in calls:
                captured.clear()
                await call()
                # The one statement that reads the table (not BEGIN / SAVEPOINT noise).
                sql, params = next((s, p) for s, p in captured if table in s)
                statements.append((name, table, sql, params))
        finally:
            event.remove(sync_engine, "before_cursor_execute", capture)
    finally:
        await db.close()
    return await _explain(config.database.url, statements, counts)


async def _explain(url: str, statements: list[tuple[str, str, str, Any]],
                   counts: dict[str, int]) -> list[dict[str, Any]]:
    dsn = url.replace("postgresql+asyncpg://", "postgresql://", 1)
    conn = await asyncpg.connect(dsn)
    out = []
    try:
        # A restored dump has no planner statistics yet; production's autovacuum has them.
        await conn.execute("ANALYZE")
        for name, table, sql, params in statements:
            plan = await _plan(conn, sql, params)
            entry = {"name": name, "sql": " ".join(sql.split()), "plan": plan,
                     **_summary(plan), "rows_in_table": counts[table]}
            if not entry["index"]:
                # A small table is read whole because that is cheaper: say whether an
                # index could serve the query once the table grows.
                forced = _summary(await _plan(conn, sql, params, seqscan=False))
                entry["index_available"] = forced["node"] if forced["index"] else None
            out.append(entry)
    finally:
        await conn.close()
    return out


async def _plan(conn: Any, sql: str, params: Any, seqscan: bool = True) -> list[str]:
    tx = conn.transaction()
    await tx.start()
    try:
        if not seqscan:
            await conn.execute("SET LOCAL enable_seqscan = off")
        rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", *(params or ()))
    finally:
        await tx.rollback()  # the claim is an UPDATE
    return [r[0] for r in rows]


def _summary(plan: list[str]) -> dict[str, Any]:
    scans = [line.strip().lstrip("-> ").strip() for line in plan if "Scan" in line]
    took = next((line for line in plan if line.startswith("Execution Time")), "")
    return {"index": any(node in line for line in scans for node in INDEX_NODES),
            "node": "; ".join(s.split("  (")[0] for s in scans) or plan[0],
            "ms": float(took.split(":")[1].split()[0]) if took else float("nan")}
