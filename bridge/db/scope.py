"""What every repository is built from: a way to get a session, and the SQL dialect."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import CursorResult, Result
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


def shared(session: AsyncSession, dialect: str) -> Scope:
    """A scope whose every call uses `session` and leaves committing to its owner."""

    @asynccontextmanager
    async def provide() -> AsyncIterator[AsyncSession]:
        yield session

    return Scope(provide, dialect)


def rowcount(result: Result[Any]) -> int:
    """Rows touched by an UPDATE or DELETE (the typed API hides it on `Result`)."""
    return cast(CursorResult[Any], result).rowcount
