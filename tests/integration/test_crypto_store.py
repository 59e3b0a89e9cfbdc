"""nio's Olm machine on the database store (bridge.matrix.crypto): what one machine
wrote, the next one built from the database has, on SQLite and PostgreSQL.

Two real machines talk to each other (no homeserver needed): a staff-like device and
a ghost's device on the bridge's store exchange an Olm session and a Megolm room key,
as /keys/claim and to-device messages would carry them.
"""

from __future__ import annotations

import asyncio

import pytest
from nio import ToDeviceEvent
from nio.crypto import InboundGroupSession, Olm, OlmDevice, OutboundGroupSession, TrustState
from nio.store import SqliteMemoryStore
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import create_async_engine

from bridge.db import Database
from bridge.db.crypto import CryptoJournal, CryptoRepo, DeviceRecord
from bridge.db.models import CryptoDeviceRow
from bridge.db.scope import Scope
from bridge.matrix.crypto.journal import DeviceCrypto, session_fits
from bridge.matrix.crypto.store import OUTBOUND_RESERVE
from bridge.retry import is_transient

GHOST, GHOST_DEV = "@cb_ghost:localhost", "GHOSTDEV"
STAFF, STAFF_DEV = "@ana:localhost", "ANADEV"
ROOM = "!portal:localhost"
PICKLE = "0f" * 32


async def _open(db: Database, device_id: str = GHOST_DEV) -> DeviceCrypto:
    crypto = DeviceCrypto(db.crypto, GHOST, device_id, PICKLE, await db.crypto.load(GHOST))
    crypto.machine()
    return crypto


def _staff() -> Olm:
    return Olm(STAFF, STAFF_DEV, SqliteMemoryStore(STAFF, STAFF_DEV, ""))


def _device(olm: Olm, user_id: str, device_id: str) -> OlmDevice:
    return OlmDevice(user_id, device_id, dict(olm.account.identity_keys))


async def test_a_new_account_is_written_once_and_comes_back(db: Database) -> None:
    first = await _open(db)
    assert first.olm is not None
    keys = first.olm.account.identity_keys
    assert await first.flush() == 1  # the new account
    assert await first.flush() == 0  # nothing changed since
    again = await _open(db)
    assert again.olm is not None and again.olm.account.identity_keys == keys
    assert await again.flush() == 0  # loading writes nothing


async def test_sessions_room_keys_devices_and_trust_survive_a_reopen(db: Database) -> None:
    ghost = await _open(db)
    staff = _staff()
    assert ghost.olm is not None
    # Staff claims a one-time key of the ghost and sends it a room key over Olm.
    ghost.olm.account.generate_one_time_keys(1)
    otk = next(iter(ghost.olm.account.one_time_keys["curve25519"].values()))
    ghost.olm.account.mark_keys_as_published()
    ghost.olm.save_account()
    ghost_device = _device(ghost.olm, GHOST, GHOST_DEV)
    staff_device = _device(staff, STAFF, STAFF_DEV)
    staff.create_session(otk, ghost_device.curve25519)
    outbound = OutboundGroupSession()
    payload = staff._olm_encrypt(staff.session_store.get(ghost_device.curve25519),
                                 ghost_device, "m.room_key", {
                                     "algorithm": "m.megolm.v1.aes-sha2", "room_id": ROOM,
                                     "session_id": outbound.id,
                                     "session_key": outbound.session_key})
    ghost.olm.device_store.add(staff_device)
    ghost.olm.tracked_users.add(STAFF)
    ghost.olm.store.save_device_keys({STAFF: {STAFF_DEV: staff_device}})
    ghost.olm.ignore_device(staff_device)
    event = ToDeviceEvent.parse_event({"sender": STAFF, "type": "m.room.encrypted",
                                       "content": payload})
    ghost.olm.handle_to_device_event(event)
    assert ghost.olm.inbound_group_store.get(
        ROOM, staff_device.curve25519, outbound.id) is not None
    written = await ghost.flush()
    assert written >= 5  # account, Olm session, room key, device, trust, tracked user

    again = await _open(db)
    olm = again.olm
    assert olm is not None
    assert olm.session_store.get(staff_device.curve25519) is not None
    assert olm.inbound_group_store.get(ROOM, staff_device.curve25519, outbound.id)
    [device] = list(olm.device_store)
    assert (device.user_id, device.id, device.trust_state) == (STAFF, STAFF_DEV,
                                                               TrustState.ignored)
    assert olm.is_device_ignored(device) and olm.tracked_users == {STAFF}
    # A staff message encrypted after the reopen decrypts with the stored room key.
    outbound.shared = True
    ciphertext = outbound.encrypt("after the reopen")
    session = olm.inbound_group_store.get(ROOM, staff_device.curve25519, outbound.id)
    assert session.decrypt(ciphertext)[0] == "after the reopen"


async def test_the_outbound_session_goes_on_where_it_was(db: Database) -> None:
    ghost = await _open(db)
    assert ghost.olm is not None
    ghost.olm.create_outbound_group_session(ROOM)
    session = ghost.olm.outbound_group_sessions[ROOM]
    receiver = InboundGroupSession(session.session_key, "ed", "curve", ROOM)
    session.shared = True
    session.users_shared_with.add((STAFF, STAFF_DEV))
    session.encrypt("one")
    assert await ghost.flush() == 3  # account, own inbound copy, outbound (reserved)
    session.encrypt("two")
    assert await ghost.flush() == 0  # within the reserved indices: no write
    again = await _open(db)
    assert again.olm is not None
    restored = again.olm.outbound_group_sessions[ROOM]
    # Past every index the first device may have used before it was lost.
    assert restored.id == session.id and restored.message_index == 1 + OUTBOUND_RESERVE
    assert restored.shared and restored.users_shared_with == {(STAFF, STAFF_DEV)}
    assert not again.olm.should_share_group_session(ROOM)
    # Staff, who got the key at index 0, read what comes next: no new key needed.
    text, index = receiver.decrypt(restored.encrypt("after the reopen"))
    assert (text, index) == ("after the reopen", 1 + OUTBOUND_RESERVE)
    assert await again.flush() == 1  # it used the first reserved index: reserve anew
    for _ in range(OUTBOUND_RESERVE - 1):
        restored.encrypt("more")
        assert await again.flush() == 0
    restored.encrypt("the reserve is used up")
    assert await again.flush() == 1  # written again, with the next indices reserved
    # The session ended (a member left): the next open has none.
    again.olm.outbound_group_sessions.pop(ROOM)
    assert await again.flush() == 1
    last = await _open(db)
    assert last.olm is not None and ROOM not in last.olm.outbound_group_sessions


class _Unreachable(CryptoRepo):
    """The database refusing writes for a moment (a fault, injected)."""

    down = True

    async def flush(self, owner: str, journal: CryptoJournal,
                    migrated_from: str | None = None) -> int:
        if self.down:
            raise ConnectionError("database unreachable")
        return await super().flush(owner, journal, migrated_from)


async def test_a_failed_flush_keeps_its_entries_for_the_next(db: Database) -> None:
    repo = _Unreachable(Scope(db.session, db.dialect))
    ghost = DeviceCrypto(repo, GHOST, GHOST_DEV, PICKLE, await repo.load(GHOST))
    olm = ghost.machine()
    olm.tracked_users.add(STAFF)
    with pytest.raises(ConnectionError):
        await ghost.flush()
    olm.tracked_users.add("@luis:localhost")  # written meanwhile: kept too
    repo.down = False
    assert await ghost.flush() == 3  # the account and both tracked users
    snap = await db.crypto.load(GHOST)
    assert snap.account is not None and snap.tracked == {STAFF, "@luis:localhost"}


async def test_a_new_device_id_replaces_what_the_old_one_stored(db: Database) -> None:
    old = await _open(db)
    assert old.olm is not None
    old.olm.tracked_users.add(STAFF)
    await old.flush()
    new = await _open(db, "NEWDEV")
    assert new.olm is not None and new.olm.tracked_users == set()
    assert new.olm.account.identity_keys != old.olm.account.identity_keys
    await new.flush()
    snap = await db.crypto.load(GHOST)
    assert snap.device_id == "NEWDEV" and snap.tracked == set()


async def test_a_restored_session_goes_on_only_for_the_same_readers(db: Database) -> None:
    ghost = await _open(db)
    olm = ghost.olm
    assert olm is not None
    staff = _staff()
    olm.device_store.add(_device(staff, STAFF, STAFF_DEV))
    assert not session_fits(olm, ROOM, {GHOST, STAFF})  # no session at all
    olm.create_outbound_group_session(ROOM)
    session = olm.outbound_group_sessions[ROOM]
    assert not session_fits(olm, ROOM, {GHOST, STAFF})  # never shared
    session.shared = True
    session.users_shared_with.add((STAFF, STAFF_DEV))
    assert session_fits(olm, ROOM, {GHOST, STAFF})
    assert session_fits(olm, ROOM, {GHOST, STAFF, "@nodevices:localhost"})  # queried later
    assert not session_fits(olm, ROOM, {GHOST})  # staff left meanwhile
    olm.device_store.add(_device(_staff(), STAFF, "ANA2"))  # a device it never reached
    assert not session_fits(olm, ROOM, {GHOST, STAFF})


async def test_devices_shared_by_many_owners_are_written_without_deadlock(db: Database) -> None:
    # Every ghost's journal carries the same staff and bot devices, each in the order
    # its machine met them. Two flushes that locked the shared rows in opposite orders
    # deadlocked on PostgreSQL (bench/scale.py, 500 citizens: two messages set aside).
    devices = [DeviceRecord(STAFF, f"DEV{i:03d}", {"curve25519": f"k{i}"}) for i in range(60)]

    def journal(order: list[DeviceRecord], round_: int) -> CryptoJournal:
        j = CryptoJournal()
        for d in order:
            j.devices[(d.user_id, d.device_id)] = DeviceRecord(
                d.user_id, d.device_id, {"curve25519": f"{d.keys['curve25519']}-{round_}"})
        return j

    await db.crypto.flush(GHOST, journal(devices, 0))
    for round_ in range(1, 16):
        await asyncio.gather(
            db.crypto.flush(GHOST, journal(devices, round_)),
            db.crypto.flush("@cb_other:localhost", journal(devices[::-1], round_)))
    async with db.session() as session:
        keys = list(await session.scalars(select(CryptoDeviceRow.curve25519)))
    assert len(keys) == 60 and all(k.endswith("-15") for k in keys)


async def test_a_deadlock_on_postgresql_is_retried_not_set_aside(pg_migrated_url: str) -> None:
    # PostgreSQL breaks a deadlock by failing one of the two transactions; run again,
    # it succeeds. A queue item that met one was set aside as a dead letter.
    engine = create_async_engine(pg_migrated_url)
    try:
        async with engine.begin() as setup:
            await setup.execute(text("INSERT INTO kv (key, value) VALUES ('a', ''), ('b', '')"))
        both_hold_one = asyncio.Barrier(2)

        async def lock(first: str, then: str) -> None:
            async with engine.begin() as conn:
                await conn.execute(text("UPDATE kv SET value = 'x' WHERE key = :k"), {"k": first})
                await both_hold_one.wait()
                await conn.execute(text("UPDATE kv SET value = 'y' WHERE key = :k"), {"k": then})

        outcomes = await asyncio.gather(lock("a", "b"), lock("b", "a"), return_exceptions=True)
    finally:
        await engine.dispose()
    [failure] = [o for o in outcomes if isinstance(o, BaseException)]
    assert "deadlock detected" in str(failure)
    assert is_transient(failure)
