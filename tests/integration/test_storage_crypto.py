"""The E2EE crypto store's tables (revision 0016): a journal flushed and loaded back,
on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from bridge.db import Database
from bridge.db.crypto import (
    AccountRecord,
    CryptoJournal,
    DeviceRecord,
    InboundRecord,
    KeyRequestRecord,
    OlmSessionRecord,
    OutboundRecord,
)
from bridge.db.models import CryptoAccountRow, CryptoDeviceRow

GHOST = "@cb_ghost:agency.example"
OTHER = "@cb_other:agency.example"
STAFF = "@ana:agency.example"
LUIS = "@luis:agency.example"
T0 = datetime(2026, 12, 2, 8, 0, tzinfo=UTC)


def _journal(device_id: str = "GHOSTDEV") -> CryptoJournal:
    j = CryptoJournal()
    j.account = AccountRecord(device_id, "acct-pickle", shared=True)
    j.olm_sessions["o1"] = OlmSessionRecord("o1", "curveA", "olm-1", T0, T0)
    j.inbound["m1"] = InboundRecord("m1", "curveA", "edA", "!room:x", "in-1", ("curveF",))
    j.outbound["!room:x"] = OutboundRecord("!room:x", "g1", "out-1", T0, 3, True,
                                           ((STAFF, "ANA1"), (GHOST, device_id)),
                                           ((LUIS, "L1"),))
    j.devices[(STAFF, "ANA1")] = DeviceRecord(STAFF, "ANA1", {"curve25519": "curveA",
                                                              "ed25519": "edA"}, "Ana")
    j.devices[(LUIS, "L1")] = DeviceRecord(LUIS, "L1", {"curve25519": "curveL",
                                                        "ed25519": "edL"})
    j.trust[(LUIS, "L1")] = 3
    j.tracked.update({STAFF: True, LUIS: True})
    j.key_requests["r1"] = KeyRequestRecord("r1", "m0", "!room:x", "m.megolm.v1.aes-sha2")
    return j


async def test_a_flushed_journal_loads_back_whole(db: Database) -> None:
    assert (await db.crypto.load(GHOST)).device_id is None
    journal = _journal()
    assert await db.crypto.flush(GHOST, journal) == len(journal) == 10
    snap = await db.crypto.load(GHOST)
    assert snap.device_id == "GHOSTDEV"
    assert snap.account == AccountRecord("GHOSTDEV", "acct-pickle", True)
    assert snap.olm_sessions == [OlmSessionRecord("o1", "curveA", "olm-1", T0, T0)]
    assert snap.inbound == [InboundRecord("m1", "curveA", "edA", "!room:x", "in-1",
                                          ("curveF",))]
    [out] = snap.outbound
    assert (out.session_id, out.message_count, out.shared, out.created_at) == ("g1", 3, True, T0)
    assert set(out.shared_with) == {(STAFF, "ANA1"), (GHOST, "GHOSTDEV")}
    assert out.ignored == ((LUIS, "L1"),)
    assert sorted((d.user_id, d.device_id, d.display_name) for d in snap.devices) == [
        (STAFF, "ANA1", "Ana"), (LUIS, "L1", "")]
    assert snap.trust == {(LUIS, "L1"): 3}
    assert snap.tracked == {STAFF, LUIS}
    assert snap.key_requests == [KeyRequestRecord("r1", "m0", "!room:x",
                                                  "m.megolm.v1.aes-sha2")]
    assert await db.crypto.has_account(GHOST) and not await db.crypto.has_account(OTHER)


async def test_later_writes_replace_and_deletes_remove(db: Database) -> None:
    await db.crypto.flush(GHOST, _journal())
    later = CryptoJournal()
    later.account = AccountRecord("GHOSTDEV", "acct-pickle-2", shared=True)
    t1 = T0 + timedelta(minutes=5)
    later.olm_sessions["o1"] = OlmSessionRecord("o1", "curveA", "olm-1b", T0, t1)
    later.outbound["!room:x"] = None  # the session ended (a member left)
    later.tracked[LUIS] = False
    later.sync_token = "s72_1"
    later.key_requests["r1"] = None  # the key came
    later.devices[(STAFF, "ANA1")] = DeviceRecord(STAFF, "ANA1", {"curve25519": "curveA",
                                                                  "ed25519": "edA"},
                                                  "Ana", deleted=True)
    await db.crypto.flush(GHOST, later)
    snap = await db.crypto.load(GHOST)
    assert snap.account is not None and snap.account.pickle == "acct-pickle-2"
    assert snap.sync_token == "s72_1"
    assert [(s.pickle, s.last_used_at) for s in snap.olm_sessions] == [("olm-1b", t1)]
    assert snap.outbound == [] and snap.key_requests == []
    assert snap.tracked == {STAFF}
    # Only the devices of tracked users come with the machine.
    assert [(d.user_id, d.deleted) for d in snap.devices] == [(STAFF, True)]


async def test_owners_share_the_device_directory_not_the_rest(db: Database) -> None:
    await db.crypto.flush(GHOST, _journal())
    other = CryptoJournal()
    other.account = AccountRecord("OTHERDEV", "other-acct", shared=False)
    other.tracked[STAFF] = True
    await db.crypto.flush(OTHER, other)
    snap = await db.crypto.load(OTHER)
    assert snap.account == AccountRecord("OTHERDEV", "other-acct", False)
    assert snap.olm_sessions == snap.inbound == snap.outbound == []
    assert snap.trust == {} and snap.key_requests == []
    # The staff device GHOST's query stored is known to OTHER, which tracks Ana too.
    assert [(d.user_id, d.keys["ed25519"]) for d in snap.devices] == [(STAFF, "edA")]
    assert await db.crypto.owners() == {GHOST, OTHER}


async def test_a_reset_replaces_the_state_of_a_previous_device(db: Database) -> None:
    await db.crypto.flush(GHOST, _journal())
    fresh = CryptoJournal(reset=True)
    fresh.account = AccountRecord("NEWDEV", "new-acct", shared=False)
    await db.crypto.flush(GHOST, fresh)
    snap = await db.crypto.load(GHOST)
    assert snap.device_id == "NEWDEV"
    assert snap.olm_sessions == snap.inbound == snap.outbound == snap.devices == []
    assert snap.tracked == set()


async def test_erasure_deletes_the_owner_and_keeps_shared_devices(db: Database) -> None:
    await db.crypto.flush(GHOST, _journal())
    assert await db.crypto.delete_owner(GHOST) == 8  # every row but the 2 devices
    assert (await db.crypto.load(GHOST)).device_id is None
    async with db.session() as session:
        assert await session.scalar(select(func.count()).select_from(CryptoDeviceRow)) == 2


async def test_a_failed_flush_writes_nothing(db: Database) -> None:
    await db.crypto.flush(GHOST, _journal())
    bad = CryptoJournal()
    bad.account = AccountRecord("GHOSTDEV", "acct-pickle-2", shared=True)
    # A NOT NULL column left empty: the statement after the account's fails.
    bad.olm_sessions["o2"] = OlmSessionRecord("o2", "curveB", None, T0, T0)  # type: ignore[arg-type]
    with pytest.raises(Exception):  # noqa: B017 - IntegrityError, wrapped per driver
        await db.crypto.flush(GHOST, bad)
    async with db.session() as session:
        row = await session.get(CryptoAccountRow, GHOST)
        assert row is not None and row.pickle == "acct-pickle"


async def test_a_big_journal_is_written_in_chunks(db: Database) -> None:
    journal = _journal()
    for n in range(450):
        journal.inbound[f"s{n}"] = InboundRecord(f"s{n}", "curveA", "edA", "!r:x", f"p{n}")
    await db.crypto.flush(GHOST, journal)
    assert len((await db.crypto.load(GHOST)).inbound) == 451


def test_a_journal_put_back_under_newer_writes_keeps_the_newer() -> None:
    failed = _journal()
    newer = CryptoJournal()
    newer.account = AccountRecord("GHOSTDEV", "newer", shared=True)
    newer.outbound["!room:x"] = None
    failed.merge_under(newer)
    assert failed.account is not None and failed.account.pickle == "newer"
    assert failed.outbound == {"!room:x": None}
    assert "o1" in failed.olm_sessions
