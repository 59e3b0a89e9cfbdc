"""matrix-nio's crypto store with SQLite in WAL mode.

Since revision 0016 the bridge's own devices keep their state in its database
(bridge.matrix.crypto) and `appservice.store_journal` is no longer used; this store
remains for other nio clients run next to the bridge (the tests' staff clients).

nio writes its store synchronously from the event loop: every new Olm session, Megolm
session and ratchet step is a commit. In SQLite's default rollback-journal mode each
commit waits for fsync, and on a busy 2-core machine that blocked the loop for 100-350 ms
(seen by the `loop_watch` fixture), delaying every webhook acknowledgement behind it. In
WAL mode with synchronous=NORMAL a commit is an append to the log: it survives the
process being killed, and only a power cut can lose the last commits (a ratchet step
lost that way makes the peer ask for a new Olm session, which nio answers).

WAL needs every process that opens the file on one host (its index is shared memory), so
a store on a network volume shared with a standby keeps the rollback journal
(`appservice.store_journal: delete`), and its commits wait for the disk.
"""

from __future__ import annotations

from typing import Literal

from nio.store import DefaultStore
from peewee import SqliteDatabase


def store_class(journal: Literal["wal", "delete"]) -> type[DefaultStore]:
    """The nio store for `appservice.store_journal`."""
    return WalStore if journal == "wal" else DefaultStore


class WalStore(DefaultStore):  # type: ignore[misc]
    def _create_database(self) -> SqliteDatabase:
        return SqliteDatabase(self.database_path, pragmas={
            "foreign_keys": 1,
            "secure_delete": 1,
            "journal_mode": "wal",
            "synchronous": 1,  # NORMAL
        })
