"""Engines, migrations, and the check that a database is ours and up to date.

Migrations live in the checkout's top-level `migrations/` directory and are driven
programmatically (no alembic.ini): `upgrade` runs them on the async engine through
`connection.run_sync`, inside one transaction.

Alembic reads its scripts with blocking file I/O, so it never runs on the caller's
event loop: migrations run on a worker thread with a loop of their own, and the schema
check loads the script directory on a worker thread before it touches the database.

Alembic is imported where it is used: a process that only reads and writes rows (the
ingest process, bridge.web.ingest_child) never loads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import sqlite3
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, TypeVar, cast

import aiosqlite
from sqlalchemy import URL, Connection, event, inspect, make_url, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from bridge.auditchain import AuditKeys
from bridge.db.repos import Repositories
from bridge.db.scope import Scope, shared
from bridge.errors import SchemaError

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# We run from a checkout (bridge/db/engine.py -> repo root), where `migrations/` sits.
MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
# Our own name, not alembic_version: its presence is what tells our database from another's.
VERSION_TABLE = "civic_bridge_schema"
FIX_COMMAND = "civic-bridge migrate -c CONFIG"
# How long an SQLite connection waits for another writer before "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 15_000

SchemaStatus = Literal["current", "behind", "empty", "foreign", "ahead"]


def safe_url(url: str) -> str:
    """The URL for logs and messages, password masked."""
    return make_url(url).render_as_string(hide_password=True)


def create_engine(url: str) -> AsyncEngine:
    """An async engine with our per-backend settings.

    hide_parameters: a database error's text (logged, and shown in tracebacks) would
    otherwise end with `[parameters: ...]`: message bodies, ciphertexts, hashes.
    """
    if make_url(url).get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    # pre_ping: a PostgreSQL restart or failover must not surface as errors on stale connections.
    return create_async_engine(url, pool_pre_ping=True, hide_parameters=True)


class _RollbackOnClose(sqlite3.Connection):
    """An SQLite connection that ends its transaction before it closes.

    A task cancelled in the middle of a session leaves a statement of its cursor
    unfinished; SQLAlchemy then closes the connection, and SQLite keeps a connection
    with unfinished statements alive as a "zombie" until they are finalized, which
    can be never: with the write lock of BEGIN IMMEDIATE still held, every later
    writer (a restarted bridge, `civic-bridge migrate`) gets "database is locked".
    ROLLBACK resets the statements and releases the lock first.
    """

    def close(self) -> None:
        if self.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self.rollback()
        super().close()


class _SQLiteConnection(aiosqlite.Connection):
    """aiosqlite's connection, safe to close after SQLAlchemy has terminated it.

    When a task is cancelled mid-session, SQLAlchemy terminates the connection
    (aiosqlite `stop()`: the connection closes on its thread, which then ends) and may
    close it again right after. aiosqlite 0.22's `close()` then queues a second stop
    behind the first, for a thread that has ended, and waits for it for ever
    (omnilib/aiosqlite#369): a bridge stopping or restarting hung.
    """

    # The transaction's BEGIN, sent with its first statement (one trip fewer).
    begin_pending: str | None = None

    async def close(self) -> None:
        if not self._running:  # stopped: its thread closes the connection already
            return
        await super().close()

    async def commit(self) -> None:
        self.begin_pending = None  # a transaction with no statement: nothing to commit
        await super().commit()

    async def rollback(self) -> None:
        self.begin_pending = None
        await super().rollback()

    def cursor(self) -> _OneTripCursor:  # type: ignore[override]
        return _OneTripCursor(self)

    async def trip(self, fn: Callable[[], _T]) -> _T:
        """`fn()` on the connection's thread."""
        return cast(_T, await self._execute(fn))  # type: ignore[no-untyped-call]


# Rows a statement brings back with it; a larger result is read on in further trips.
PREFETCH_ROWS = 256


class _OneTripCursor:
    """The cursor SQLAlchemy's aiosqlite adapter gets: one trip to the connection's
    thread per statement (executed, its first rows fetched, closed; a transaction's
    BEGIN goes with its first statement), where aiosqlite's cursor takes four (create,
    execute, fetch, close) and BEGIN three more. Each trip waits for the event
    loop's next turn: on a busy loop (the inbound lanes' Matrix sends) a one-row read
    took several milliseconds, and a relayed message makes a dozen statements."""

    arraysize = 1

    def __init__(self, connection: _SQLiteConnection) -> None:
        self._connection = connection
        self._open: sqlite3.Cursor | None = None  # rows left beyond the first trip's
        self._rows: deque[Any] = deque()
        self.description: Any = None
        self.rowcount = -1
        self.lastrowid: int | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def execute(self, sql: str, parameters: Any = None) -> Self:
        await self.close()
        await self._trip(lambda cursor: cursor.execute(sql, () if parameters is None
                                                       else parameters))
        return self

    async def executemany(self, sql: str, parameters: Any) -> Self:
        await self.close()
        await self._trip(lambda cursor: cursor.executemany(sql, parameters))
        return self

    async def _trip(self, run: Callable[[sqlite3.Cursor], object]) -> None:
        begin, self._connection.begin_pending = self._connection.begin_pending, None

        def on_thread() -> tuple[Any, int, int | None, list[Any], sqlite3.Cursor | None]:
            cursor = self._connection._conn.cursor()
            try:
                if begin is not None:
                    cursor.execute(begin)
                run(cursor)
                rows = cursor.fetchmany(PREFETCH_ROWS) if cursor.description else []
            except BaseException:
                cursor.close()
                raise
            more = len(rows) == PREFETCH_ROWS
            if not more:
                cursor.close()
            return (cursor.description, cursor.rowcount, cursor.lastrowid, rows,
                    cursor if more else None)

        (self.description, self.rowcount, self.lastrowid, rows,
         self._open) = await self._connection.trip(on_thread)
        self._rows = deque(rows)

    async def fetchone(self) -> Any:
        if not self._rows and self._open is not None:
            await self._more(PREFETCH_ROWS)
        return self._rows.popleft() if self._rows else None

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        size = size or self.arraysize
        if len(self._rows) < size and self._open is not None:
            await self._more(max(size - len(self._rows), PREFETCH_ROWS))
        return [self._rows.popleft() for _ in range(min(size, len(self._rows)))]

    async def fetchall(self) -> list[Any]:
        if self._open is not None:
            await self._more(None)
        rows, self._rows = list(self._rows), deque()
        return rows

    async def _more(self, size: int | None) -> None:
        cursor = self._open
        assert cursor is not None

        def on_thread() -> tuple[list[Any], bool]:
            rows = cursor.fetchall() if size is None else cursor.fetchmany(size)
            done = size is None or len(rows) < size
            if done:
                cursor.close()
            return rows, done

        rows, done = await self._connection.trip(on_thread)
        self._rows.extend(rows)
        if done:
            self._open = None

    async def close(self) -> None:
        cursor, self._open = self._open, None
        self._rows.clear()
        if cursor is not None:
            await self._connection.trip(cursor.close)


def _connect_sqlite(database: str, **kwargs: Any) -> aiosqlite.Connection:
    """aiosqlite.connect with the two fixes above (the sqlite3 factory, the close)."""
    def connector() -> sqlite3.Connection:
        return sqlite3.connect(database, factory=_RollbackOnClose, **kwargs)

    connection = _SQLiteConnection(connector, iter_chunk_size=64)
    connection._thread.daemon = True  # as SQLAlchemy does: never hold up the exit
    return connection


def is_private(database_url: str | URL) -> bool:
    """An in-memory SQLite database: each engine has its own, none can share it."""
    url = make_url(database_url)
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def _sqlite_engine(url: str | URL, *, read_only: bool = False) -> AsyncEngine:
    """The bridge's SQLite engine; `read_only` for `Database.reading`: connections that
    refuse writes and begin deferred (a snapshot, taken without the write lock)."""
    engine = create_async_engine(url, hide_parameters=True,
                                 connect_args={"async_creator_fn": _connect_sqlite})

    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN away from the driver (it would defer it and break SAVEPOINT);
        # `_begin` below emits our own.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            if read_only:
                cursor.execute("PRAGMA query_only=ON")  # a write in a read is an error
                return
            cursor.execute("PRAGMA foreign_keys=ON")  # off by default, per connection
            # WAL: readers do not block the writer; the mode persists in the file.
            cursor.execute("PRAGMA journal_mode=WAL")
            # Deleted and overwritten content is zeroed, not left in free space: an
            # erased citizen's rows must not live on in the file.
            cursor.execute("PRAGMA secure_delete=ON")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Connection) -> None:
        # IMMEDIATE takes the write lock up front. A deferred transaction that reads and
        # then writes (the audit chain head, get-or-create) fails with SQLITE_BUSY when
        # another writer got in between, without waiting; IMMEDIATE waits (busy_timeout)
        # instead, so SQLite writers queue up safely. One writer at a time is fine at
        # the volumes SQLite deployments see; PostgreSQL is for more.
        # Sent with the transaction's first statement (`_OneTripCursor`), a read too.
        driver = conn.connection.driver_connection
        assert isinstance(driver, _SQLiteConnection)
        driver.begin_pending = "BEGIN" if read_only else "BEGIN IMMEDIATE"

    return engine


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, built in code; `connection` is what env.py migrates."""
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise SchemaError(
            f"migrations not found at {MIGRATIONS_DIR}; run civic-bridge from its source checkout"
        )
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("path_separator", "os")
    cfg.attributes["connection"] = connection
    return cfg


def load_scripts() -> ScriptDirectory:
    """The migration scripts, read from disk (blocking: call it on a worker thread)."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config())
    script.get_heads()  # parses every revision file now, so later lookups do no I/O
    return script


def head_revision(script: ScriptDirectory | None = None) -> str:
    """The revision the code expects."""
    head = (load_scripts() if script is None else script).get_current_head()
    assert head is not None, "migrations/versions is empty"
    return head


async def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at `url` up to `revision` (default: the newest).

    Refuses a database that is not ours or is newer than the code, rather than
    creating our tables next to someone else's or guessing at an unknown revision.
    """
    await asyncio.to_thread(asyncio.run, _migrate(url, "upgrade", revision))
    log.info("database %s migrated to %s", safe_url(url), revision)


async def downgrade(url: str, revision: str) -> None:
    """Migrate the database at `url` down to `revision` ("base" drops everything)."""
    await asyncio.to_thread(asyncio.run, _migrate(url, "downgrade", revision))


async def _migrate(url: str, direction: Literal["upgrade", "downgrade"], revision: str) -> None:
    # Runs on a worker thread's own event loop (see the module docstring).
    script = load_scripts()
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            if direction == "upgrade":
                status, current = await conn.run_sync(_status_sync, script)
                if status in ("foreign", "ahead"):
                    raise SchemaError(_explain(status, current, url, script))
            from alembic import command

            run = command.upgrade if direction == "upgrade" else command.downgrade
            await conn.run_sync(lambda sync: run(alembic_config(sync), revision))
    finally:
        await engine.dispose()


async def schema_status(url: str) -> SchemaStatus:
    """Whether the database at `url` is ours and at the code's schema.

    empty: no tables; foreign: tables but no civic_bridge_schema; behind: ours, older
    than the code; ahead: at a revision this code does not know; current: ready.
    """
    script = await asyncio.to_thread(load_scripts)
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            status, _ = await conn.run_sync(_status_sync, script)
            return status
    finally:
        await engine.dispose()


def _status_sync(
    conn: Connection, script: ScriptDirectory
) -> tuple[SchemaStatus, tuple[str, ...]]:
    from alembic.runtime.migration import MigrationContext
    from alembic.util import CommandError

    tables = set(inspect(conn).get_table_names())
    if VERSION_TABLE not in tables:
        return ("foreign" if tables else "empty"), ()
    context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
    current = tuple(context.get_current_heads())
    if set(current) == set(script.get_heads()):
        return "current", current
    for rev in current:
        try:
            script.get_revision(rev)
        except CommandError:
            return "ahead", current
    return "behind", current


def _explain(
    status: SchemaStatus, current: tuple[str, ...], url: str, script: ScriptDirectory
) -> str:
    at = ", ".join(current) or "no revision"
    if status == "empty":
        return f"database is empty; run: {FIX_COMMAND}"
    if status == "foreign":
        return (
            f"database {safe_url(url)} is not civic-bridge's (it has tables but no "
            f"{VERSION_TABLE}); point database.url at an empty database"
        )
    if status == "behind":
        return (
            f"database is behind the code's schema (at {at}, need {head_revision(script)}); "
            f"run: {FIX_COMMAND}"
        )
    return (
        f"database is ahead of the code's schema (at {at}, this civic-bridge knows up to "
        f"{head_revision(script)}); run the civic-bridge version that migrated it"
    )


_IN_SQLITE_SESSION: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "civic_bridge_in_sqlite_session", default=False)
_URGENT: contextvars.ContextVar[bool] = contextvars.ContextVar("civic_bridge_urgent",
                                                               default=False)


class _Turns:
    """One SQLite session at a time, first come first served, urgent ones first.

    Urgent sessions store what a request must persist before it is acknowledged
    (webhooks, appservice transactions): they wait for the session in progress only,
    not behind the worker's backlog.

    Shared by every `Database` of one SQLite file in this process (`_turns_for`), also
    across threads: the WhatsApp webhook commits from a thread with its own event loop
    (bridge.web.ingest_thread). A turn is handed to a waiter on its own loop; without
    this queue the two would meet in SQLite's busy handler, which sleeps up to 100 ms.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy = False
        self._waiting: dict[bool, deque[asyncio.Future[None]]] = {True: deque(),
                                                                  False: deque()}
        self._granted: set[asyncio.Future[None]] = set()  # handed the turn, not yet woken

    @asynccontextmanager
    async def take(self, urgent: bool) -> AsyncIterator[None]:
        with self._lock:
            turn = None
            if self._busy:
                turn = asyncio.get_running_loop().create_future()
                self._waiting[urgent].append(turn)
            else:
                self._busy = True
        if turn is not None:
            try:
                await turn
            except asyncio.CancelledError:
                with self._lock:
                    if turn in self._granted:  # handed the turn just as we were cancelled
                        self._granted.discard(turn)
                        self._release_locked()
                    else:
                        self._waiting[urgent].remove(turn)
                raise
            with self._lock:
                self._granted.discard(turn)
        try:
            yield
        finally:
            with self._lock:
                self._release_locked()

    def _release_locked(self) -> None:
        for lane in (True, False):
            while self._waiting[lane]:
                turn = self._waiting[lane].popleft()
                if turn.done():  # cancelled: its task removes nothing more
                    continue
                self._granted.add(turn)  # stays busy: the turn passes straight on
                try:
                    turn.get_loop().call_soon_threadsafe(_grant, turn)
                except RuntimeError:  # its loop is closed: nobody will take it
                    self._granted.discard(turn)
                    continue
                return
        self._busy = False


def _grant(turn: asyncio.Future[None]) -> None:
    if not turn.done():
        turn.set_result(None)


# The turns of each SQLite file open in this process (see _Turns).
_SQLITE_TURNS: weakref.WeakValueDictionary[str, _Turns] = weakref.WeakValueDictionary()
_SQLITE_TURNS_LOCK = threading.Lock()


def _turns_for(engine: AsyncEngine) -> _Turns:
    database = engine.url.database or ""
    # ":memory:" and "" are private to each connection: nothing to share.
    key = (str(Path(database).resolve()) if database and database != ":memory:"
           else f"private:{id(engine)}")
    with _SQLITE_TURNS_LOCK:
        turns = _SQLITE_TURNS.get(key)
        if turns is None:
            turns = _SQLITE_TURNS[key] = _Turns()
        return turns


class Database(Repositories):
    """The engine plus every repository (`db.citizens`, `db.outbox`, ...).

    Each repository call runs in its own transaction. To make several calls atomic,
    use `async with db.transaction() as tx:` and call `tx.<repo>` only; on SQLite a
    standalone call made inside it would wait for the open transaction's write lock.
    """

    def __init__(self, engine: AsyncEngine, audit_keys: AuditKeys | None = None) -> None:
        self.engine = engine
        self._audit_keys = audit_keys
        self.dialect = engine.dialect.name
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        # SQLite has one writer and every session begins IMMEDIATE: queue sessions in
        # this process (FIFO) instead of letting them poll SQLite's busy handler, whose
        # sleeps of up to 100 ms made webhook acknowledgements wait behind the worker.
        self._sqlite_turns = _turns_for(engine) if self.dialect == "sqlite" else None
        # `reading` on SQLite: connections of their own, opened when first needed.
        self._reader: AsyncEngine | None = None
        self._read_sessions: async_sessionmaker[AsyncSession] | None = None
        super().__init__(Scope(self.session, self.dialect), audit_keys)

    @classmethod
    async def open(cls, url: str, *, check: bool = True,
                   audit_keys: AuditKeys | None = None) -> Database:
        """Connect; with `check`, raise SchemaError unless the schema is ours and current.

        `audit_keys` (from `audit.key`) are needed to write or check the audit trail."""
        script = await asyncio.to_thread(load_scripts) if check else None
        engine = create_engine(url)
        if script is not None:
            try:
                async with engine.connect() as conn:
                    status, current = await conn.run_sync(_status_sync, script)
            except BaseException:
                await engine.dispose()
                raise
            if status != "current":
                await engine.dispose()
                raise SchemaError(_explain(status, current, url, script))
        log.info("database %s opened", safe_url(url))
        return cls(engine, audit_keys)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session in a transaction: committed if the block succeeds, else rolled back."""
        if self._sqlite_turns is None:
            async with self._sessions() as session, session.begin():
                yield session
            return
        if _IN_SQLITE_SESSION.get():
            # Would wait for itself: inside db.transaction(), use the `tx.` repositories.
            raise RuntimeError("nested database session on SQLite; use the transaction's "
                               "repositories")
        async with self._sqlite_turns.take(_URGENT.get()):
            token = _IN_SQLITE_SESSION.set(True)
            try:
                async with self._sessions() as session, session.begin():
                    yield session
            finally:
                _IN_SQLITE_SESSION.reset(token)

    @staticmethod
    @contextmanager
    def urgent() -> Iterator[None]:
        """Sessions opened inside go before queued background work (SQLite only).

        For what a request stores before it is acknowledged, so acknowledgements stay
        fast while the worker drains a backlog.
        """
        token = _URGENT.set(True)
        try:
            yield
        finally:
            _URGENT.reset(token)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Repositories]:
        """Repositories sharing one transaction, for changes that must land together."""
        async with self.session() as session:
            yield Repositories(shared(session, self.dialect), self._audit_keys)

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[Repositories]:
        """Repositories over one consistent snapshot, for reads only.

        On SQLite it waits for no writer turn: in WAL mode a reader never waits for the
        writer, so a hot path's reads do not queue behind the worker's writes (a write
        in it fails: its connections are `query_only`). On PostgreSQL, a READ ONLY
        transaction. An in-memory SQLite database has no snapshot beside its one
        connection: there it is a transaction."""
        sessions = self._read_sessions
        if sessions is None:
            if self._sqlite_turns is None:  # PostgreSQL: BEGIN READ ONLY
                bind = self.engine.execution_options(postgresql_readonly=True)
            elif not is_private(self.engine.url):
                bind = self._reader = _sqlite_engine(self.engine.url, read_only=True)
            else:  # in memory: one connection's database; no snapshot beside the writer
                async with self.transaction() as tx:
                    yield tx
                return
            sessions = self._read_sessions = async_sessionmaker(bind, expire_on_commit=False)
        async with sessions() as session, session.begin():
            yield Repositories(shared(session, self.dialect), self._audit_keys)

    async def drop_old_pages(self) -> None:
        """SQLite: copy the write-ahead log into the file and truncate it, so old versions
        of rewritten rows do not live on there (with secure_delete, the file itself
        keeps none). PostgreSQL keeps old row versions until (auto)vacuum reuses their
        space; nothing is done there."""
        if self.dialect != "sqlite":
            return
        async with self.engine.connect() as conn:
            # On the driver's connection: SQLAlchemy would wrap it in BEGIN, and a
            # checkpoint cannot run inside a transaction.
            driver = (await conn.get_raw_connection()).driver_connection
            assert driver is not None
            await driver.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    async def ping(self) -> None:
        """Raise if the database cannot be reached (for /ready)."""
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def close(self) -> None:
        if self._reader is not None:
            await self._reader.dispose()
        await self.engine.dispose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
