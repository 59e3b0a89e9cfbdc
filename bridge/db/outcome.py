"""Writes that land with a queue item's outcome, in the worker's one transaction.

A lane of the inbound worker (bridge.worker) relays a citizen's messages one after
another, and on SQLite every database session waits for the one writer: bookkeeping
that only has to be durable by the time the item is done (the message map of a sent
event) is cheaper in the transaction that records the outcome than in one of its own.

That is safe because an item whose outcome was not recorded runs again (after a crash,
say), redoing its sends idempotently (transaction ids derived from the item) and with
them these writes. Outside a worker's item, or once its outcome is recorded (a task the
handler started may outlive it), `with_outcome` writes at once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from bridge.db.engine import Database
from bridge.db.repos import Repositories

Write = Callable[[Repositories], Awaitable[object]]


class OutcomeWrites:
    """What the handler of one item deferred; closed once the outcome is recorded."""

    def __init__(self) -> None:
        self.writes: list[Write] = []
        self.open = True

    async def apply(self, repos: Repositories) -> None:
        """In the transaction that records the outcome."""
        self.open = False
        for write in self.writes:
            await write(repos)


_COLLECTING: ContextVar[OutcomeWrites | None] = ContextVar("outcome_writes", default=None)


@contextmanager
def collecting() -> Iterator[OutcomeWrites]:
    """Around an item's handler: `with_outcome` calls inside defer to the result."""
    writes = OutcomeWrites()
    token = _COLLECTING.set(writes)
    try:
        yield writes
    finally:
        _COLLECTING.reset(token)


async def with_outcome(db: Database, write: Write) -> None:
    """`write` with the current item's outcome, or now if there is none (or it was
    recorded already)."""
    writes = _COLLECTING.get()
    if writes is not None and writes.open:
        writes.writes.append(write)
        return
    async with db.transaction() as tx:
        await write(tx)
