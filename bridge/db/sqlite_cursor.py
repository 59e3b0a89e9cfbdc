"""An aiosqlite cursor that runs a statement in one turn of the connection's thread.

aiosqlite runs every sqlite3 call on the connection's own thread, and SQLAlchemy's
adaptor makes four calls per statement: create the cursor, execute, fetch the rows,
close. Each is a hand-off to that thread and back to the event loop (a queue, a
wake-up, a future): about 0.1 ms of CPU each, more than a small statement itself. This
cursor does all four in one turn: it executes, reads the rows (up to `EAGER_ROWS`; the
rest of a larger SELECT is read as asked, on the same sqlite3 cursor) and closes.

Installed by `bridge.db.engine` for every SQLite connection (`_SQLiteConnection.cursor`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import aiosqlite

EAGER_ROWS = 512  # read with the statement; a SELECT with more keeps its cursor open


class OneTurnCursor:
    """What SQLAlchemy's aiosqlite adaptor uses of an aiosqlite cursor, one turn per
    statement (module docstring)."""

    arraysize = 1

    def __init__(self, connection: aiosqlite.Connection) -> None:
        self._connection = connection
        self._open: sqlite3.Cursor | None = None  # a SELECT with rows still unread
        self._rows: list[Any] = []
        self.description: Any = None
        self.rowcount = -1
        self.lastrowid: int | None = None

    # `async with connection.cursor()` and `await connection.cursor()`: no turn needed.
    async def __aenter__(self) -> OneTurnCursor:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    def __await__(self) -> Any:
        yield from []
        return self

    async def execute(self, sql: str, parameters: Sequence[Any] | dict[str, Any] = ()
                      ) -> OneTurnCursor:
        await self.close()
        self._take(await _turn(self._connection, _execute, self._connection._conn, sql,
                                                   parameters))
        return self

    async def executemany(self, sql: str, parameters: Iterable[Any]) -> OneTurnCursor:
        await self.close()
        self._take(await _turn(self._connection, _executemany, self._connection._conn,
                                                   sql, parameters))
        return self

    def _take(self, result: tuple[Any, int, int | None, list[Any], sqlite3.Cursor | None]
              ) -> None:
        self.description, self.rowcount, self.lastrowid, self._rows, self._open = result

    async def fetchone(self) -> Any:
        rows = await self.fetchmany(1)
        return rows[0] if rows else None

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        size = size or self.arraysize
        if len(self._rows) < size and self._open is not None:
            more = await _turn(self._connection, self._open.fetchmany, size - len(self._rows))
            if len(more) < size - len(self._rows):
                await self._close_open()
            self._rows += more
        taken, self._rows = self._rows[:size], self._rows[size:]
        return taken

    async def fetchall(self) -> list[Any]:
        rows, self._rows = self._rows, []
        if self._open is not None:
            rows += await _turn(self._connection, self._open.fetchall)
            await self._close_open()
        return rows

    async def close(self) -> None:
        self._rows = []
        await self._close_open()

    async def _close_open(self) -> None:
        cursor, self._open = self._open, None
        if cursor is not None:
            await _turn(self._connection, cursor.close)


async def _turn(connection: aiosqlite.Connection, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` on the connection's thread: one hand-off there and back."""
    return await connection._execute(fn, *args)  # type: ignore[no-untyped-call]


def _execute(conn: sqlite3.Connection, sql: str, parameters: Any
             ) -> tuple[Any, int, int | None, list[Any], sqlite3.Cursor | None]:
    """On the connection's thread: execute, read, close (module docstring)."""
    cursor = conn.cursor()
    try:
        cursor.execute(sql, parameters)
        if cursor.description is None:
            cursor.close()
            return None, cursor.rowcount, cursor.lastrowid, [], None
        # RETURNING rows are read whole: the changes and rowcount are complete only then.
        returning = sql.lstrip()[:6].upper() not in ("SELECT", "WITH", "PRAGMA")
        rows = cursor.fetchall() if returning else cursor.fetchmany(EAGER_ROWS + 1)
        if len(rows) <= EAGER_ROWS or returning:
            cursor.close()
            return cursor.description, cursor.rowcount, cursor.lastrowid, rows, None
        # A large SELECT: the rest is read as asked, on this cursor.
        return cursor.description, cursor.rowcount, cursor.lastrowid, rows, cursor
    except BaseException:
        cursor.close()
        raise


def _executemany(conn: sqlite3.Connection, sql: str, parameters: Iterable[Any]
                 ) -> tuple[Any, int, int | None, list[Any], sqlite3.Cursor | None]:
    cursor = conn.cursor()
    try:
        cursor.executemany(sql, parameters)
        return None, cursor.rowcount, cursor.lastrowid, [], None
    finally:
        cursor.close()
