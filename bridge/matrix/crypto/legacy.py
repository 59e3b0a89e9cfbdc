"""Moving the per-device nio file stores of `appservice.store_dir` into the database
(design §8). Versions before revision 0016 kept each device's crypto state in
`<store_dir>/<localpart>/<user_id>_<device_id>.db` (nio's DefaultStore: peewee SQLite)
plus three trust files next to it (`.trusted_devices`, `.blacklisted_devices`,
`.ignored_devices`, one `user device matrix-ed25519 key` per line).

The pickles are copied as they are (same store key, bridge.matrix.storekey): the
device keeps its identity, its Olm sessions with staff and the room keys it received,
so staff see no new device and no warning. Only the outbound Megolm sessions are new
(nio never stored them), as after any restart of an earlier version.

The leader moves every store at start, before any device opens (`migrate_all`); a
device that opens while its store is still a file (it failed at start, or the files
were put back) is moved first (`migrate_one`), so it is never given a new account
under its old device id. A moved directory goes to `<store_dir>/.migrated/`, kept
for an operator to delete; a store whose state the database already has (moved
before a crash, or newer) is only moved aside.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from bridge.db import Database
from bridge.db.crypto import (
    AccountRecord,
    CryptoJournal,
    DeviceRecord,
    InboundRecord,
    KeyRequestRecord,
    OlmSessionRecord,
)
from bridge.types import UserID

log = logging.getLogger(__name__)

MIGRATED = ".migrated"
NIO_STORE_VERSION = 2
# nio's DateField format (naive local time).
_NIO_TIME = "%Y-%m-%d %H:%M:%S.%f"
# Trust files of nio's DefaultStore, and the TrustState value each one means.
_TRUST_FILES = (("trusted_devices", 1), ("blacklisted_devices", 2), ("ignored_devices", 3))
PARALLEL = 4  # stores read at once


class LegacyStoreError(RuntimeError):
    """A file store that cannot be read; the message names no key material."""


def _nio_time(value: str) -> datetime:
    try:
        naive = datetime.strptime(value, _NIO_TIME)
    except ValueError:
        naive = datetime.strptime(value.split(".")[0], "%Y-%m-%d %H:%M:%S")
    return naive.astimezone(UTC)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_store(path: Path) -> tuple[str, str, CryptoJournal]:
    """(user id, device id, everything in the store as a journal). Blocking: run it
    in a thread."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        version = conn.execute("SELECT version FROM storeversion").fetchone()
        if version is None or version[0] != NIO_STORE_VERSION:
            raise LegacyStoreError(f"{path.name}: nio store version "
                                   f"{version[0] if version else None}, expected 2")
        row = conn.execute("SELECT id, account, user_id, device_id, shared "
                           "FROM accounts").fetchone()
        if row is None:
            raise LegacyStoreError(f"{path.name}: no Olm account in the store")
        account_id, pickle, user_id, device_id, shared = row
        journal = CryptoJournal()
        journal.account = AccountRecord(device_id, _text(pickle), bool(shared))
        for session_id, sender_key, pickled, created, used in conn.execute(
                "SELECT session_id, sender_key, session, creation_time, last_usage_date "
                "FROM olmsessions WHERE account_id = ?", (account_id,)):
            journal.olm_sessions[session_id] = OlmSessionRecord(
                session_id, sender_key, _text(pickled), _nio_time(created), _nio_time(used))
        chains: dict[str, list[str]] = {}
        for sender_key, session_id in conn.execute(
                "SELECT sender_key, session_id FROM forwardedchains ORDER BY id"):
            chains.setdefault(session_id, []).append(sender_key)
        for session_id, sender_key, fp_key, room_id, pickled in conn.execute(
                "SELECT session_id, sender_key, fp_key, room_id, session "
                "FROM megolminboundsessions WHERE account_id = ?", (account_id,)):
            journal.inbound[session_id] = InboundRecord(
                session_id, sender_key, fp_key, room_id, _text(pickled),
                tuple(chains.get(session_id, ())))
        keys: dict[int, dict[str, str]] = {}
        for device_row, key_type, key in conn.execute(
                "SELECT device_id, key_type, key FROM keys"):
            keys.setdefault(device_row, {})[key_type] = key
        for row_id, dev_id, dev_user, display_name, deleted in conn.execute(
                "SELECT id, device_id, user_id, display_name, deleted FROM devicekeys "
                "WHERE account_id = ?", (account_id,)):
            journal.devices[(dev_user, dev_id)] = DeviceRecord(
                dev_user, dev_id, keys.get(row_id, {}), display_name or "", bool(deleted))
            journal.tracked[dev_user] = True  # nio queried it: it followed the user
        for request_id, session_id, room_id, algorithm in conn.execute(
                "SELECT request_id, session_id, room_id, algorithm "
                "FROM outgoingkeyrequests WHERE account_id = ?", (account_id,)):
            journal.key_requests[request_id] = KeyRequestRecord(
                request_id, session_id, room_id, algorithm)
        token = conn.execute("SELECT token FROM synctokens WHERE account_id = ?",
                             (account_id,)).fetchone()
        journal.sync_token = token[0] if token else None
    for suffix, state in _TRUST_FILES:
        trust_file = path.parent / f"{user_id}_{device_id}.{suffix}"
        if trust_file.exists():
            for line in trust_file.read_text(encoding="utf-8").splitlines():
                fields = line.split(" ")
                if len(fields) == 4 and (fields[0], fields[1]) in journal.devices:
                    journal.trust[(fields[0], fields[1])] = state
    return user_id, device_id, journal


def _stores(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.db") if p.is_file())


def _move_aside(store_dir: Path, directory: Path) -> None:
    target = store_dir / MIGRATED / directory.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # moved before and put back: keep the newest aside
        shutil.rmtree(target)
    directory.rename(target)


class LegacyStores:
    """The file stores under `store_dir` that are still to be moved."""

    def __init__(self, db: Database, store_dir: Path) -> None:
        self._db = db
        self._store_dir = store_dir
        self._locks: dict[str, asyncio.Lock] = {}

    def _directory(self, user_id: str) -> Path:
        return self._store_dir / user_id[1:].split(":", 1)[0]

    async def migrate_all(self) -> int:
        """Move every store; how many devices' state went into the database. A store
        that cannot be read is logged and left in place (its device does not open)."""
        if not await asyncio.to_thread(self._store_dir.is_dir):
            return 0
        directories = await asyncio.to_thread(lambda: sorted(
            p for p in self._store_dir.iterdir() if p.is_dir() and not p.name.startswith(".")))
        if not directories:
            return 0
        log.info("moving %d E2EE file store(s) from %s into the database",
                 len(directories), self._store_dir)
        gate = asyncio.Semaphore(PARALLEL)
        done = 0

        async def one(directory: Path) -> None:
            nonlocal done
            async with gate:
                try:
                    done += await self._migrate(directory)
                except (LegacyStoreError, sqlite3.Error, OSError) as exc:
                    log.error("E2EE file store %s not moved: %s", directory.name, exc)

        await asyncio.gather(*(one(d) for d in directories))
        log.info("%d E2EE device(s) moved into the database", done)
        return done

    async def migrate_one(self, user_id: str) -> bool:
        """Move the user's store if it is still a file; True if state was moved."""
        directory = self._directory(user_id)
        if not await asyncio.to_thread(directory.is_dir):
            return False
        return await self._migrate(directory) > 0

    async def _migrate(self, directory: Path) -> int:
        # One move per directory at a time (start-up and a device opening may race).
        lock = self._locks.setdefault(directory.name, asyncio.Lock())
        async with lock:
            if not await asyncio.to_thread(directory.is_dir):
                return 0  # moved meanwhile
            moved = 0
            for path in await asyncio.to_thread(_stores, directory):
                user_id, device_id, journal = await asyncio.to_thread(read_store, path)
                ghost = await self._db.ghosts.get(UserID(user_id))
                if ghost is None or ghost.device_id != device_id:
                    log.warning("E2EE file store %s is of a device the bridge no longer "
                                "uses: moved aside, not imported", directory.name)
                    continue
                if await self._db.crypto.has_account(user_id):
                    continue  # moved before (then a crash), or newer state: keep it
                await self._db.crypto.flush(user_id, journal, migrated_from=str(path))
                moved += 1
            await asyncio.to_thread(_move_aside, self._store_dir, directory)
        self._locks.pop(directory.name, None)
        return moved
