"""Writes that land with a queue item's outcome, in the worker's one transaction.

A lane of the inbound worker (bridge.worker) relays a citizen's messages one after
another, and on SQLite every database session waits for the one writer: bookkeeping
that only has to be durable by the time the item is done (the message map of a sent
event) is cheaper in the transaction that records the outcome than in one of its own.

That is safe because an item whose outcome was not recorded runs again (after a crash,
say), redoing its sends idempotently (transaction ids derived from the item) and with
them these writes. Outside a worker's item, or once its outcome is recorded (a task the
handler started may outlive it), `with_outcome` writes at once.

An item whose only effect on what its lane reads next is these writes (a relayed
message: its message map) says so with `may_overlap`, as soon as it knows: the lane then
prepares its next item meanwhile (a read-only look-up, `prepared`), runs it once this
one is handled, while this one's outcome is recorded; and that item calls `settled`
before it reads what the previous one may have written (a reply finds its event).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from bridge.db.engine import Database
from bridge.db.repos import Repositories

Write = Callable[[Repositories], Awaitable[object]]


class OutcomeWrites:
    """What the handler of one item deferred; closed once the outcome is recorded."""

    def __init__(self, previous: asyncio.Future[None] | None = None,
                 prepared: object = None, on_overlap: Callable[[], None] | None = None
                 ) -> None:
        self.writes: list[Write] = []
        self.open = True
        self.on_overlap = on_overlap  # what `may_overlap` tells the lane
        # Done once the previous item of the lane has its outcome recorded (None: it
        # had, before this item started).
        self.previous = previous
        self.prepared = prepared  # what the lane's preparer read for this item, if any

    async def apply(self, repos: Repositories) -> None:
        """In the transaction that records the outcome."""
        self.open = False
        for write in self.writes:
            await write(repos)


_COLLECTING: ContextVar[OutcomeWrites | None] = ContextVar("outcome_writes", default=None)


@contextmanager
def collecting(previous: asyncio.Future[None] | None = None, prepared: object = None,
               on_overlap: Callable[[], None] | None = None) -> Iterator[OutcomeWrites]:
    """Around an item's handler: `with_outcome` calls inside defer to the result
    (OutcomeWrites holds the rest of what the lane tells the handler)."""
    writes = OutcomeWrites(previous, prepared, on_overlap)
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


def may_overlap() -> None:
    """The current item changes nothing its lane's next item reads but through its
    deferred writes (if it is handled without an error): the next item may be prepared
    now and handled while they are recorded."""
    writes = _COLLECTING.get()
    if writes is not None and writes.on_overlap is not None:
        writes.on_overlap()


def prepared() -> object:
    """What the lane's preparer read for the current item, before its turn (None: not
    prepared; the handler reads for itself)."""
    writes = _COLLECTING.get()
    return None if writes is None else writes.prepared


async def settled() -> None:
    """Wait until the lane's previous item has its outcome recorded (at once if it had):
    before reading what its deferred writes hold."""
    writes = _COLLECTING.get()
    if writes is not None and writes.previous is not None:
        await asyncio.wait([writes.previous])  # not cancelled with the caller
