"""What every repository is built from: a way to get a session, and the SQL dialect."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, Result, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from bridge.db.models import Base

SessionProvider = Callable[[], AbstractAsyncContextManager[AsyncSession]]
Insert = postgresql.Insert | sqlite.Insert


@dataclass(frozen=True, slots=True)
class Scope:
    """How a repository reaches the database.

    Standalone repositories (`db.citizens`) open one session, and so one transaction,
    per call. Repositories from `db.transaction()` share the caller's session, so
    several calls commit or roll back together.
    """

    session: SessionProvider
    dialect: str

    def insert(self, model: type[Base]) -> Insert:
        """An INSERT that supports ON CONFLICT on both backends.

        Duplicates are expected (retried transactions, redelivered webhooks), so
        inserts skip them with ON CONFLICT DO NOTHING instead of raising
        IntegrityError: the transaction stays usable, no savepoint is needed, and on
        PostgreSQL a concurrent duplicate waits for the first writer to commit and
        is then skipped, which is exactly the dedupe semantics we want.
        """
        if self.dialect == "postgresql":
            return postgresql.insert(model)
        if self.dialect == "sqlite":
            return sqlite.insert(model)
        raise NotImplementedError(f"unsupported database dialect {self.dialect!r}")

    async def insert_many(self, model: type[Base], rows: Sequence[Mapping[str, Any]]) -> None:
        """INSERT many rows with ON CONFLICT DO NOTHING, in one executemany of one cached
        statement: a multi-row VALUES is compiled anew for every size, which cost more
        than the rows themselves (a fan-out batch, a batch of outcomes)."""
        if not rows:
            return
        stmt = self.insert(model.__table__).on_conflict_do_nothing()  # type: ignore[arg-type]
        async with self.session() as session:
            await session.execute(stmt, list(rows))


def shared(session: AsyncSession, dialect: str) -> Scope:
    """A scope whose every call uses `session` and leaves committing to its owner."""

    @asynccontextmanager
    async def provide() -> AsyncIterator[AsyncSession]:
        yield session

    return Scope(provide, dialect)


def rowcount(result: Result[Any]) -> int:
    """Rows touched by an UPDATE or DELETE (the typed API hides it on `Result`)."""
    return cast(CursorResult[Any], result).rowcount


async def purge_rows(scope: Scope, model: type[Base], *where: ColumnElement[bool],
                     dry_run: bool = False) -> int:
    """Delete the rows of `model` matching `where`, or with `dry_run` only count them:
    one condition for both, so a dry run counts exactly what a purge deletes."""
    async with scope.session() as session:
        if dry_run:
            count = select(func.count()).select_from(model).where(*where)
            return int(await session.scalar(count) or 0)
        return rowcount(await session.execute(delete(model).where(*where)))
