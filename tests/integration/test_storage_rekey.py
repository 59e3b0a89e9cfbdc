"""`rekey` over every kind of sealed value, and the E2EE store key, on SQLite and PostgreSQL.

Each value is written the way its writer writes it (same function or same associated
data), under the old keys; after the rotation and `rekey`, the old keys are dropped and
everything must still open, be found and be routed.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nio
import pytest

from bridge.db import Database
from bridge.db.reports import AAD_REPORT_REASON
from bridge.devtools.simulator import CloudAPISimulator, SimulatedUser
from bridge.matrix.keyshare import Checkpoint
from bridge.matrix.keystore import RoomKeyStore
from bridge.matrix.storekey import (
    STORE_KEY,
    StoreKeyError,
    legacy_store_key,
    load_store_key,
    pickle_passphrase,
)
from bridge.matrix.trust import Trust
from bridge.matrix.undecryptable import UndecryptableStore
from bridge.privacy import (
    AAD_IDENTIFIER,
    AAD_PAYLOAD,
    AAD_WA_ID,
    Cipher,
    KeyedIndex,
    wamid_aad,
)
from bridge.rekey import rekey_database
from bridge.types import EventID, RoomID, UserID
from bridge.whatsapp.outbound import held_aad
from bridge.whatsapp.webhook import prepare_delivery
from bridge.whatsapp.webhook_parse import citizen_lane

PHONE_ID = "109876543210"
GHOST = UserID("@cb_rekey:agency.example")
BOT = UserID("@cb_bot:agency.example")
ROOM = RoomID("!portal:agency.example")
AGENCY_ROOM = RoomID("!vecinos:agency.example")
ROOM_WAMID = "wamid.HBgLMzQ2MDAxMTEyMjIVAgARGBJBQkNERUYwMTIzNDU2Nzg5AA=="
USER = SimulatedUser(wa_id="34600111222", user_id="ES.rekeyUser0001", name="Ana")


class Keys:
    """Old and new data and index keys, and the ciphers/indexes of each phase."""

    def __init__(self) -> None:
        self.old_data, self.new_data = os.urandom(32), os.urandom(32)
        self.old_index, self.new_index = os.urandom(32), os.urandom(32)
        self.before = Cipher(self.old_data)
        self.during = Cipher(self.new_data, [self.old_data])
        self.after = Cipher(self.new_data)
        self.index_before = KeyedIndex(self.old_index)
        self.index_during = KeyedIndex(self.new_index, [self.old_index])
        self.index_after = KeyedIndex(self.new_index)


def _webhook_rows(cipher: Cipher, index: KeyedIndex, body: str) -> list[tuple[str, str, str]]:
    sim = CloudAPISimulator("t", "s", PHONE_ID, "+34 900 000 000")
    raw = json.dumps(sim.envelope(sim.text_message(USER, body))).encode()
    return prepare_delivery(raw, PHONE_ID, index, cipher).rows


async def _write_everything(db: Database, k: Keys, tmp_path: Path) -> dict[str, Any]:
    """One value of every sealed kind, under the old keys; what they hold."""
    old = k.before
    citizen, _ = await db.citizens.get_or_create(
        index_hash=k.index_before.digest(USER.user_id),
        identifier_ct=old.encrypt(USER.user_id, aad=AAD_IDENTIFIER),
        wa_id_ct=old.encrypt(str(USER.wa_id), aad=AAD_WA_ID), pseudonym_code="BCDF-GHJK")
    await db.ghosts.create(GHOST, "DEV1", "Ciudadano/a BCDF-GHJK", "citizen",
                           citizen_id=citizen.id)
    seeds = await Trust(db, None, "", "", old).seeds(GHOST)  # type: ignore[arg-type]
    await RoomKeyStore(db.room_keys, old).owner(GHOST).add(
        ROOM, "s1", Checkpoint(0, "megolm-session-key", frozenset({"@ana:agency.example"})))
    report, _ = await db.reports.add(
        source="whatsapp", external_id="wa:x", room_id=ROOM, event_id="$r",  # type: ignore[arg-type]
        reporter=GHOST, author=None, language="es",
        reason_ct=old.encrypt("me insulta", aad=AAD_REPORT_REASON))
    # Inbound: one pending, one dead letter, one done; and a Matrix event kept in clear.
    ids = []
    for n, status in enumerate(("pending", "dead", "done")):
        [(key, payload, lane)] = _webhook_rows(old, k.index_before, f"mensaje {n}")
        ids.append(await db.inbound.enqueue("whatsapp", key, payload, lane=lane,
                                            status=status))  # type: ignore[arg-type]
    await db.inbound.enqueue("matrix", "txn/0", json.dumps({"type": "m.room.message"}))
    # A Matrix event sealed as its writer seals it: bound to its source and dedupe key.
    ids.append(await db.inbound.enqueue("matrix", "txn/1", old.encrypt_json(
        {"type": "m.room.message", "content": {"body": "mensaje 3"}},
        aad=AAD_PAYLOAD + b"\0matrix\0txn/1")))
    # Outbox: one pending, one dead letter.
    sends = []
    for n in range(2):
        sends.append(await db.outbox.add(f"out{n}", citizen.id, ROOM,
                                         old.encrypt_json({"type": "text", "body": f"r{n}"},
                                                          aad=AAD_PAYLOAD)))
    await db.outbox.set_aside(sends[1], "permanent", "131026")  # type: ignore[arg-type]
    await db.held.add(EventID("$held"), ROOM, datetime.now(UTC), old.encrypt_json(
        [{"type": "text", "body": "ES91..."}], aad=held_aad("$held")))
    await UndecryptableStore(db, old, [60.0]).park(
        {"event_id": "$parked", "type": "m.room.encrypted"}, datetime.now(UTC))
    # A WhatsApp room member's wamid pair and a room message kept for them (issue 17).
    room_hash = k.index_before.wamid(ROOM_WAMID)
    await db.wa_rooms.link((room_hash, old.encrypt(ROOM_WAMID, aad=wamid_aad(room_hash))),
                           citizen.id, AGENCY_ROOM, EventID("$agency"))
    await db.wa_rooms.keep(citizen.id, AGENCY_ROOM, "wr:$agency2:1", old.encrypt_json(
        {"type": "text", "body": "aviso", "wa_room": AGENCY_ROOM}, aad=AAD_PAYLOAD))
    store_key = await load_store_key(db.kv, old, tmp_path, installed=False,
                                     data_keys=[k.old_data])
    return {"citizen": citizen, "seeds": seeds, "report": report, "inbound": ids,
            "outbox": sends, "store_key": store_key}


async def test_rekey_covers_every_kind_and_the_old_keys_can_go(
        db: Database, tmp_path: Path) -> None:
    k = Keys()
    stored = await _write_everything(db, k, tmp_path)

    report = await rekey_database(db, k.during, k.index_during)
    assert report.complete, report.lines()
    assert dict(report.resealed) == {
        "citizen identifiers": 2, "cross-signing seeds": 1, "room keys": 1,
        "report reasons": 1, "outbox": 1, "dead letters": 2, "inbound queue": 3,
        "held staff messages": 1, "parked undecryptable events": 1, "E2EE store key": 1,
        "room backlog": 1}
    # The citizen and the lanes of the rows still to run (not the finished one), and
    # the room member's wamid (re-hashed, re-sealed to its new hash).
    assert dict(report.rehashed) == {"citizen index hashes": 1, "queue lanes": 2,
                                     "room member wamids": 1}
    again = await rekey_database(db, k.during, k.index_during)
    assert again.total == 0 and not again.rehashed and again.complete

    # The old keys are gone: everything opens, is found and routed with the new ones.
    new, index = k.after, k.index_after
    citizen = await db.citizens.by_index(index.digest(USER.user_id))
    assert citizen is not None and citizen.id == stored["citizen"].id
    assert new.decrypt_str(citizen.identifier_ct, aad=AAD_IDENTIFIER) == USER.user_id
    assert new.decrypt_str(str(citizen.wa_id_ct), aad=AAD_WA_ID) == USER.wa_id
    assert await Trust(db, None, "", "", new).seeds(GHOST) == stored["seeds"]  # type: ignore[arg-type]
    records, _ = await RoomKeyStore(db.room_keys, new).owner(GHOST).load()
    assert [c.session_key for r in records for c in r.checkpoints] == ["megolm-session-key"]
    reason = (await db.reports.get(stored["report"].id)).reason_ct  # type: ignore[union-attr]
    assert new.decrypt_str(str(reason), aad=AAD_REPORT_REASON) == "me insulta"
    for n, item_id in enumerate(stored["inbound"]):
        item = await db.inbound.get(item_id)
        assert item is not None
        if item.source == "matrix":
            value = new.decrypt_json(item.payload, aad=AAD_PAYLOAD + b"\0matrix\0txn/1")
            assert value["content"]["body"] == f"mensaje {n}"
            continue
        value = new.decrypt_json(item.payload, aad=AAD_PAYLOAD)
        assert value["message"]["text"] == f"mensaje {n}"  # the parsed message
        if item.status != "done":
            assert item.lane == citizen_lane(citizen.index_hash)
    for n, send_id in enumerate(stored["outbox"]):
        send = await db.outbox.get(send_id)
        assert send is not None
        assert new.decrypt_json(send.payload, aad=AAD_PAYLOAD)["body"] == f"r{n}"
    held = await db.held.get(EventID("$held"))
    assert held is not None
    assert new.decrypt_json(held.payloads_ct, aad=held_aad("$held"))[0]["body"] == "ES91..."
    assert [p.event["event_id"] for p in await UndecryptableStore(db, new, [60.0]).all()] \
        == ["$parked"]
    assert await load_store_key(db.kv, new, tmp_path, installed=True,
                                data_keys=[k.new_data]) == stored["store_key"]
    room_hash = index.wamid(ROOM_WAMID)
    assert await db.wa_rooms.by_wamid(room_hash) == (AGENCY_ROOM, "$agency", citizen.id)
    pair = await db.wa_rooms.wamid_for("$agency", citizen.id)
    assert pair is not None
    assert new.decrypt_str(pair[1], aad=wamid_aad(pair[0])) == ROOM_WAMID
    [kept] = await db.wa_rooms.backlog(citizen.id)
    assert new.decrypt_json(kept.payload, aad=AAD_PAYLOAD)["body"] == "aviso"


async def test_rekey_counts_what_it_cannot_open_and_says_the_old_key_is_needed(
        db: Database) -> None:
    """A value sealed with associated data rekey does not know (e.g. a new writer) or
    under a key no longer configured is kept, counted, and found by the final sweep."""
    k = Keys()
    odd = k.before.encrypt_json({"type": "m.room.message"}, aad=b"inbound.matrix\0txn/1")
    odd_id = await db.inbound.enqueue("matrix", "txn/1", odd)
    await db.kv.set("someone-else:1", k.before.encrypt("x", aad=b"unknown"))
    lost = Cipher(os.urandom(32)).encrypt("y", aad=AAD_REPORT_REASON)
    await db.reports.add(source="flag", external_id="flag:1", room_id=ROOM,
                         event_id="$f", reporter=BOT, author=None,  # type: ignore[arg-type]
                         language="es", reason_ct=lost)

    report = await rekey_database(db, k.during, k.index_during)
    assert not report.complete
    assert dict(report.unreadable) == {"inbound queue": 1, "other kv values": 1,
                                       "report reasons": 1}
    assert report.stale == {"inbound.payload": 1, "kv.value": 1, "reports.reason_ct": 1}
    assert "inbound.payload: 1 value(s) still under a previous key" in report.lines()
    kept = await db.inbound.get(odd_id)  # type: ignore[arg-type]
    assert kept is not None and kept.payload == odd


async def test_look_ups_find_citizens_hashed_with_a_previous_index_key(db: Database) -> None:
    k = Keys()
    citizen, _ = await db.citizens.get_or_create(
        index_hash=k.index_before.digest(USER.user_id),
        identifier_ct=k.before.encrypt(USER.user_id, aad=AAD_IDENTIFIER),
        pseudonym_code="BCDF-GHJK")
    found = await db.citizens.by_any_index(k.index_during.digests(USER.user_id))
    assert found is not None and found.id == citizen.id
    assert await db.citizens.by_any_index(k.index_after.digests(USER.user_id)) is None
    # Moving it to the current key; a value another citizen holds is refused.
    other, _ = await db.citizens.get_or_create(
        index_hash="f" * 64, identifier_ct="x", pseudonym_code="LMNP-QRST")
    assert not await db.citizens.set_index_hash(citizen.id, other.index_hash)
    assert await db.citizens.set_index_hash(citizen.id, k.index_after.digest(USER.user_id))
    assert (await db.citizens.by_any_index(k.index_after.digests(USER.user_id))) is not None


# --------------------------------------------------------------------------- store key


def _nio_store(store_dir: Path, localpart: str, passphrase: str) -> dict[str, str]:
    """A crypto store as nio writes it (what `Devices` makes per user); its identity keys."""
    path = store_dir / localpart
    path.mkdir(parents=True, exist_ok=True)
    client = nio.AsyncClient("http://127.0.0.1:9", f"@{localpart}:agency.example", "DEV1",
                             store_path=str(path),
                             config=nio.AsyncClientConfig(encryption_enabled=True,
                                                          store_sync_tokens=False,
                                                          pickle_key=passphrase))
    client.restore_login(f"@{localpart}:agency.example", "DEV1", "token")
    keys = dict(client.olm.account.identity_keys)
    client.store.database.close()
    return keys


async def test_a_new_installation_draws_a_random_store_key(db: Database, tmp_path: Path) -> None:
    key = os.urandom(32)
    first = await load_store_key(db.kv, Cipher(key), tmp_path, installed=False, data_keys=[key])
    assert len(first) == 32 and first != legacy_store_key(key)
    assert await load_store_key(db.kv, Cipher(key), tmp_path, installed=False,
                                data_keys=[key]) == first
    sealed = await db.kv.get(STORE_KEY)
    assert sealed is not None and first.hex() not in sealed and Cipher.is_token(sealed)


async def test_an_upgraded_installation_keeps_opening_its_stores(
        db: Database, tmp_path: Path) -> None:
    """Stores written by the previous version (passphrase derived from the data key)
    open with the store key of the first start, also after the data key rotates."""
    data_key = os.urandom(32)
    legacy = legacy_store_key(data_key)
    keys = _nio_store(tmp_path, "cb_ghost", pickle_passphrase(legacy))
    store_key = await load_store_key(db.kv, Cipher(data_key), tmp_path, installed=True,
                                     data_keys=[data_key])
    assert store_key == legacy
    assert _nio_store(tmp_path, "cb_ghost", pickle_passphrase(store_key)) == keys

    new_key = os.urandom(32)
    assert (await rekey_database(db, Cipher(new_key, [data_key]))).resealed == {
        "E2EE store key": 1}
    reloaded = await load_store_key(db.kv, Cipher(new_key), tmp_path, installed=True,
                                    data_keys=[new_key])
    assert reloaded == legacy
    assert _nio_store(tmp_path, "cb_ghost", pickle_passphrase(reloaded)) == keys


async def test_an_installation_bricked_by_an_earlier_rotation_is_recovered(
        db: Database, tmp_path: Path) -> None:
    """The data key was rotated under the previous version (its stores stopped opening):
    the old key, still in previous_data_keys, is found to open them and is kept."""
    old, new = os.urandom(32), os.urandom(32)
    keys = _nio_store(tmp_path, "cb_ghost", pickle_passphrase(legacy_store_key(old)))
    store_key = await load_store_key(db.kv, Cipher(new, [old]), tmp_path, installed=True,
                                     data_keys=[new, old])
    assert store_key == legacy_store_key(old)
    assert _nio_store(tmp_path, "cb_ghost", pickle_passphrase(store_key)) == keys


async def test_a_store_key_that_cannot_be_had_stops_the_start_with_the_fix(
        db: Database, tmp_path: Path) -> None:
    old, new = os.urandom(32), os.urandom(32)
    _nio_store(tmp_path, "cb_ghost", pickle_passphrase(legacy_store_key(old)))
    with pytest.raises(StoreKeyError, match="previous_data_keys"):
        await load_store_key(db.kv, Cipher(new), tmp_path, installed=True, data_keys=[new])
    assert await db.kv.get(STORE_KEY) is None  # nothing wrong was stored
    await load_store_key(db.kv, Cipher(old), tmp_path, installed=True, data_keys=[old])
    # The data key rotated and the old one removed before `rekey` re-wrapped the store
    # key: refused, with the fix.
    with pytest.raises(StoreKeyError, match="rekey") as raised:
        await load_store_key(db.kv, Cipher(new), tmp_path, installed=True, data_keys=[new])
    assert legacy_store_key(old).hex() not in str(raised.value)
