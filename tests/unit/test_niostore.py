"""The crypto store's journal follows `appservice.store_journal`."""

import sqlite3
from pathlib import Path

import pytest

from bridge.matrix.niostore import store_class


@pytest.mark.parametrize(("journal", "mode"), [("wal", "wal"), ("delete", "delete")])
def test_the_store_opens_in_the_configured_journal_mode(tmp_path: Path, journal: str,
                                                        mode: str) -> None:
    store = store_class(journal)("@cb_x:localhost", "DEVICE", str(tmp_path), "passphrase")
    store.database.close()
    with sqlite3.connect(next(tmp_path.glob("*.db"))) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == mode
