"""Bulk access to the columns that hold sealed values, for `civic-bridge rekey`.

The repository only walks rows and writes what it is told: which columns are sealed,
with which associated data, and how to re-seal them is `bridge.rekey`'s business.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import ColumnElement, RowMapping, String, Table, select, update

from bridge.db.models import Base
from bridge.db.scope import Scope

# Given a row, the values to write back (None: leave the row alone). Must not raise:
# an exception rolls back the whole batch.
Change = Callable[[RowMapping], Mapping[str, Any] | None]
TOKEN_PREFIX = "v1."  # every privacy.Cipher token starts so
BATCH = 500


class SealedRepo:
    """Row walks over whole tables, a batch per transaction, in primary-key order."""

    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    async def rewrite(self, table: Table, change: Change,
                      where: ColumnElement[bool] | None = None) -> int:
        """Call `change` with every row of `table` (matching `where`) and write what it
        returns; returns how many rows were written."""
        [pk] = table.primary_key.columns
        written = 0
        last: Any = None
        while True:
            stmt = select(table).order_by(pk).limit(BATCH)
            if where is not None:
                stmt = stmt.where(where)
            if last is not None:
                stmt = stmt.where(pk > last)
            async with self._scope.session() as session:
                rows = (await session.execute(stmt)).mappings().all()
                for row in rows:
                    values = change(row)
                    if values:
                        await session.execute(
                            update(table).where(pk == row[pk.name]).values(**values))
                        written += 1
            if len(rows) < BATCH:
                return written
            last = rows[-1][pk.name]

    async def count_tokens(self, stale: Callable[[str], bool]) -> dict[str, int]:
        """How many values in each text column of every table look like tokens and are
        `stale`, as {"table.column": count} (columns with none are left out).

        A check that needs no list of sealed columns: a column sealed by code that
        `rekey` does not know about still shows up here."""
        found: dict[str, int] = {}
        for table in Base.metadata.sorted_tables:
            for column in table.columns:
                if not isinstance(column.type, String):
                    continue
                stmt = (select(column).where(column.like(TOKEN_PREFIX + "%"))
                        .execution_options(yield_per=BATCH))
                count = 0
                async with self._scope.session() as session:
                    async for value in await session.stream_scalars(stmt):
                        if isinstance(value, str) and stale(value):
                            count += 1
                if count:
                    found[f"{table.name}.{column.name}"] = count
        return found
