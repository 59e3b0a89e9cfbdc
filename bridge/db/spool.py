"""The webhook spool of an SQLite deployment: a small SQLite file of its own, next to
the bridge's database (`bridge.db` -> `bridge.db-ingest`), where a WhatsApp delivery's
rows are committed before the webhook is answered.

Why a file of its own: SQLite has one writer per file, and the bridge's sessions run on
its event loop, holding the write lock between their statements while the loop runs
other work (nio's crypto store, encryption, the relay). A webhook committing to the
bridge's database waited for that: 5 ms at the median and up to 80 ms at p99 on a
2-core machine (issue 16). The spool has a single writer, the ingest thread
(bridge.web.ingest_thread), so its commit waits for the disk only.

The inbound worker takes the rows into the `inbound` queue before each round of
WhatsApp work (bridge.ingest.take_spooled: the thread wakes it, as it would for rows
it had queued) and removes them from the spool once they are there. The move is
idempotent (the queue keeps one row per (source, dedupe key)), so a crash between the
two commits moves a row twice and changes nothing; rows a crash left in the spool move
at the worker's first round after the start. The rows are the queue's rows: their
payload sealed, their key a keyed hash (nothing readable at rest), and they stay here
for milliseconds. Not migrated by Alembic: the file holds one table, created when
missing, and is empty whenever the worker is idle. PostgreSQL needs none: its writers
do not wait for each other.

Synchronous: the ingest thread commits from its own loop (a commit is that thread's
whole job; sqlite3 releases the GIL while it waits for the disk), the worker calls it
through `asyncio.to_thread`; each has a connection of its own (see `Spool`).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import make_url

from bridge.db.engine import SQLITE_BUSY_TIMEOUT_MS
from bridge.model import InboundSource

SUFFIX = "-ingest"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,
    dedupe_key TEXT NOT NULL,
    lane TEXT NOT NULL,
    payload TEXT NOT NULL,
    UNIQUE (source, dedupe_key)
)
"""


@dataclass(frozen=True)
class Spooled:
    """One queue row waiting in the spool."""

    id: int
    source: InboundSource
    dedupe_key: str
    lane: str
    payload: str


def spool_path(database_url: str) -> Path | None:
    """Where the spool of the database at `database_url` lives; None when it needs
    none (PostgreSQL) or cannot have one (an in-memory SQLite database)."""
    url = make_url(database_url)
    name = url.database
    if url.get_backend_name() != "sqlite" or not name or name == ":memory:" \
            or name.startswith("file:"):
        return None
    return Path(name + SUFFIX)


class Spool:
    def __init__(self, path: Path) -> None:
        self.path = path
        # Two connections. The ingest thread's puts sync to the disk before the webhook
        # is answered (FULL: the answer promises the rows survive a power cut, as the
        # database's do). The worker's reads and removes do not: a remove lost to a power
        # cut moves its rows again, which the queue's dedupe key makes a no-op. Synced,
        # a take held the next put behind the disk: up to 12 ms, 4.3 at p99, on a 2-core
        # machine with every core busy (bench/README.md, session 22).
        self._puts = _connect(path, synchronous="FULL")
        self._puts.execute(_SCHEMA)
        self._takes = _connect(path, synchronous="NORMAL")
        # One writer at a time, queued here rather than in SQLite's busy handler, whose
        # sleeps are 1 ms and longer; the worker's connection is used by one thread at a
        # time (`asyncio.to_thread`, one call after another).
        self._write_turn = threading.Lock()
        self._take_turn = threading.Lock()

    def put(self, rows: Iterable[tuple[InboundSource, str, str, str]]) -> None:
        """Commit (source, dedupe_key, payload, lane) rows; a key spooled already is
        kept as it is. One statement, so the ingest thread hands the interpreter lock
        over once, not once per row and again for BEGIN and COMMIT."""
        batch = json.dumps(list(rows))
        with self._write_turn:
            self._puts.execute(_PUT, (batch,))

    def head(self, limit: int) -> list[Spooled]:
        """The oldest rows, oldest first (a read: puts go on meanwhile)."""
        with self._take_turn:
            cursor = self._takes.execute(
                "SELECT id, source, dedupe_key, lane, payload FROM spool ORDER BY id "
                "LIMIT ?", (limit,))
            return [Spooled(*row) for row in cursor.fetchall()]

    def remove(self, ids: Sequence[int]) -> None:
        with self._take_turn, self._write_turn:
            self._takes.execute(_REMOVE, (json.dumps(list(ids)),))

    def __len__(self) -> int:
        with self._take_turn:
            return int(self._takes.execute("SELECT count(*) FROM spool").fetchone()[0])

    def close(self) -> None:
        with self._take_turn, self._write_turn:
            self._takes.close()
            self._puts.close()


# The rows as one JSON array (one parameter, one cached statement), in their order.
_PUT = """
INSERT OR IGNORE INTO spool (source, dedupe_key, payload, lane)
SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'),
       json_extract(value, '$[3]')
FROM json_each(?) ORDER BY key
"""
_REMOVE = "DELETE FROM spool WHERE id IN (SELECT value FROM json_each(?))"


def _connect(path: Path, *, synchronous: str) -> sqlite3.Connection:
    # isolation_level=None: each statement commits by itself (autocommit).
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                           timeout=SQLITE_BUSY_TIMEOUT_MS / 1000)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA secure_delete=ON")  # removed rows are zeroed
    return conn
