"""The late-device key ledger (room keys and deliveries), on SQLite and PostgreSQL."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import text

from bridge.db import Database, RoomKeyDelivery
from bridge.matrix.keyshare import Checkpoint
from bridge.matrix.keystore import RoomKeyStore
from bridge.privacy import Cipher
from bridge.rekey import rekey_database
from bridge.types import RoomID, UserID

GHOST = UserID("@cb_ghost:agency.example")
OTHER = UserID("@cb_other:agency.example")
ROOM = RoomID("!portal:agency.example")
STAFF = "@ana:agency.example"


async def test_checkpoints_are_idempotent_and_widen_their_audience(db: Database) -> None:
    repo = db.room_keys
    await repo.add_key(GHOST, ROOM, "s1", 0, "ct0", [GHOST, STAFF])
    await repo.add_key(GHOST, ROOM, "s1", 0, "ct0", [GHOST, STAFF])  # a retried send
    await repo.add_key(GHOST, ROOM, "s1", 4, "ct4", [GHOST])
    await repo.add_key(GHOST, ROOM, "s1", 4, "ct4", [GHOST, "@luis:agency.example"])
    await repo.add_key(OTHER, ROOM, "s1", 0, "other", [OTHER])  # same ids, another owner
    kept = await repo.load(GHOST)
    assert [(k.session_id, k.message_index, k.session_key_ct, k.audience)
            for k in kept.keys] == [
        ("s1", 0, "ct0", (STAFF, GHOST)),  # sorted
        ("s1", 4, "ct4", (GHOST, "@luis:agency.example")),
    ]
    assert {k.owner for k in kept.keys} == {GHOST} and kept.keys[0].created_at.tzinfo


async def test_a_delivery_keeps_the_lowest_index(db: Database) -> None:
    repo = db.room_keys
    await repo.record_deliveries(GHOST, [RoomKeyDelivery("s1", "curveA", 5),
                                         RoomKeyDelivery("s1", "curveB", 0)])
    await repo.record_deliveries(GHOST, [RoomKeyDelivery("s1", "curveA", 3),  # lower: kept
                                         RoomKeyDelivery("s1", "curveA", 2)])  # lowest
    await repo.record_deliveries(GHOST, [])
    await repo.record_deliveries(GHOST, [RoomKeyDelivery("s1", "curveA", 9),  # higher: not
                                         RoomKeyDelivery("s1", "curveB", 3)])
    await repo.record_deliveries(OTHER, [RoomKeyDelivery("s1", "curveA", 7)])
    kept = await repo.load(GHOST)
    assert sorted((d.session_id, d.curve25519, d.message_index) for d in kept.deliveries) == [
        ("s1", "curveA", 2), ("s1", "curveB", 0)]
    assert [d.message_index for d in (await repo.load(OTHER)).deliveries] == [7]


async def test_an_owner_and_its_left_rooms_are_forgotten(db: Database) -> None:
    repo = db.room_keys
    for owner in (GHOST, OTHER):
        await repo.add_key(owner, ROOM, "s1", 0, "ct", [owner])
        await repo.add_key(owner, ROOM, "s2", 0, "ct", [owner])
        await repo.record_deliveries(owner, [RoomKeyDelivery("s1", "c", 0),
                                             RoomKeyDelivery("s2", "c", 0)])
    assert await repo.delete_sessions(GHOST, ["s1"]) == 2
    kept = await repo.load(GHOST)
    assert {k.session_id for k in kept.keys} == {d.session_id for d in kept.deliveries} == {"s2"}
    assert await repo.delete_owner(GHOST) == 2
    kept = await repo.load(GHOST)
    assert kept.keys == [] and kept.deliveries == []
    other = await repo.load(OTHER)
    assert len(other.keys) == 2 and len(other.deliveries) == 2


async def test_session_keys_are_sealed_and_a_key_that_does_not_open_is_skipped(
        db: Database, caplog: pytest.LogCaptureFixture) -> None:
    old, new = Cipher(b"\x01" * 32), Cipher(b"\x02" * 32)
    secret = "AgAAAAD-a-megolm-session-key"
    owner = RoomKeyStore(db.room_keys, old).owner(GHOST)
    await owner.add(ROOM, "s1", Checkpoint(0, secret, frozenset({GHOST, STAFF})))
    await owner.add(ROOM, "s2", Checkpoint(3, secret + "3", frozenset({STAFF})))
    await owner.delivered({("s1", "curveA"): 0})
    async with db.engine.connect() as conn:
        stored = [row[0] for row in await conn.execute(
            text("SELECT session_key_ct FROM room_keys"))]
    assert len(stored) == 2 and not any(secret in ct for ct in stored)

    records, delivered = await owner.load()
    assert {(r.session_id, c.index, c.session_key, c.audience)
            for r in records for c in r.checkpoints} == {
        ("s1", 0, secret, frozenset({GHOST, STAFF})), ("s2", 3, secret + "3", frozenset({STAFF}))}
    assert delivered == {("s1", "curveA"): 0}

    # A token copied to another owner's row does not open there.
    await db.room_keys.add_key(OTHER, ROOM, "s1", 0, stored[0], [OTHER])
    assert (await RoomKeyStore(db.room_keys, old).owner(OTHER).load())[0] == []

    # The data key rotated away: the rows are skipped with a warning, never with the key.
    with caplog.at_level(logging.WARNING, logger="bridge.matrix.keystore"):
        records, delivered = await RoomKeyStore(db.room_keys, new).owner(GHOST).load()
    assert records == [] and delivered == {("s1", "curveA"): 0}
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("bridge"))
    assert "does not decrypt" in ours
    assert secret not in ours and not any(ct in ours for ct in stored)


async def test_rekey_reseals_room_keys_under_the_current_data_key(db: Database) -> None:
    old_key, new_key = b"\x01" * 32, b"\x02" * 32
    secret = "AgAAAAD-another-session-key"
    await RoomKeyStore(db.room_keys, Cipher(old_key)).owner(GHOST).add(
        ROOM, "s1", Checkpoint(2, secret, frozenset({STAFF})))
    assert (await rekey_database(db, Cipher(new_key, [old_key]))).resealed == {"room keys": 1}
    assert (await rekey_database(db, Cipher(new_key, [old_key]))).total == 0
    records, _ = await RoomKeyStore(db.room_keys, Cipher(new_key)).owner(GHOST).load()
    assert [c.session_key for r in records for c in r.checkpoints] == [secret]
