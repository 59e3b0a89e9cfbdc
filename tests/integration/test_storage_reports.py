"""Reports (revision 0008), on SQLite and PostgreSQL: filed once per external id,
closed once, listed newest first."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta

from bridge.db import Database
from bridge.db.reports import AAD_REPORT_REASON, ERASED
from bridge.privacy import Cipher
from bridge.rekey import rekey_database
from bridge.types import EventID, RoomID, UserID

ROOM = RoomID("!plaza:agency.example")
REPORTER = UserID("@v_reporter:agency.example")
AUTHOR = UserID("@v_author:agency.example")


async def _file(db: Database, external: str, event: str = "$ev") -> tuple[int, bool]:
    report, created = await db.reports.add(
        source="matrix", external_id=external, room_id=ROOM, event_id=EventID(event),
        reporter=REPORTER, author=AUTHOR, reason_ct="v1.k.sealed", language="en")
    return report.id, created


async def test_a_report_is_filed_once_per_external_id(db: Database) -> None:
    first, created = await _file(db, "synapse:1")
    assert created
    again, created_again = await _file(db, "synapse:1", "$other")
    assert (again, created_again) == (first, False)
    # Concurrent arrivals of the same report file one row.
    results = await asyncio.gather(*(_file(db, "synapse:2") for _ in range(5)))
    assert len({r[0] for r in results}) == 1 and sum(r[1] for r in results) == 1
    assert await db.reports.known(["synapse:1", "synapse:2", "synapse:3"]) == {
        "synapse:1", "synapse:2"}
    assert await db.reports.known([]) == set()
    report = await db.reports.get(first)
    assert report is not None
    assert (report.source, report.room_id, report.event_id, report.reporter, report.author,
            report.reason_ct, report.language, report.status, report.handled_by) == (
        "matrix", ROOM, "$ev", REPORTER, AUTHOR, "v1.k.sealed", "en", "open", None)
    assert report.created_at.tzinfo is not None


async def test_a_report_is_closed_once_and_can_be_reopened(db: Database) -> None:
    report_id, _ = await _file(db, "wa:abc")
    assert await db.reports.close(report_id, "ban", "@admin:agency.example")
    assert not await db.reports.close(report_id, "kick", "@other:agency.example")
    closed = await db.reports.get(report_id)
    assert closed is not None and (closed.status, closed.handled_by) == (
        "ban", "@admin:agency.example")
    assert closed.handled_at is not None
    await db.reports.reopen(report_id)
    reopened = await db.reports.get(report_id)
    assert reopened is not None and (reopened.status, reopened.handled_at) == ("open", None)
    assert await db.reports.get(report_id + 1000) is None


async def test_listing_newest_first_and_by_status(db: Database) -> None:
    ids = [(await _file(db, f"flag:$e{i}"))[0] for i in range(4)]
    await db.reports.close(ids[1], "dismiss", "admin-api")
    assert [r.id for r in await db.reports.list()] == ids[::-1]
    assert [r.id for r in await db.reports.list(status="open")] == [ids[3], ids[2], ids[0]]
    assert [r.id for r in await db.reports.list(limit=2, before_id=ids[3])] == [ids[2], ids[1]]


async def test_reasons_are_resealed_by_rekey(db: Database) -> None:
    old_key, new_key = os.urandom(32), os.urandom(32)
    old = Cipher(old_key)
    report, _ = await db.reports.add(
        source="whatsapp", external_id="wa:rekey", room_id=ROOM, event_id=EventID("$r"),
        reporter=REPORTER, author=None, language="es",
        reason_ct=old.encrypt("me insulta", aad=AAD_REPORT_REASON))
    rotated = Cipher(new_key, [old_key])
    assert (await rekey_database(db, rotated)).resealed == {"report reasons": 1}
    assert (await rekey_database(db, rotated)).total == 0
    sealed = (await db.reports.get(report.id)).reason_ct  # type: ignore[union-attr]
    assert sealed is not None and not rotated.needs_rekey(sealed)
    assert Cipher(new_key).decrypt_str(sealed, aad=AAD_REPORT_REASON) == "me insulta"


async def test_an_erased_reporter_is_forgotten_but_the_report_stays(db: Database) -> None:
    mine, _ = await db.reports.add(
        source="whatsapp", external_id="wa:erase-1", room_id=ROOM, event_id=EventID("$a"),
        reporter=REPORTER, author=AUTHOR, language="es", reason_ct="v1.k.reason")
    other, _ = await db.reports.add(
        source="matrix", external_id="synapse:erase-2", room_id=ROOM, event_id=EventID("$b"),
        reporter=AUTHOR, author=REPORTER, language="es", reason_ct="v1.k.other")
    assert await db.reports.forget_reporter(REPORTER) == 1
    kept = await db.reports.get(mine.id)
    assert kept is not None and (kept.reporter, kept.reason_ct, kept.status) == (
        ERASED, None, "open")
    # Its external id (the keyed hash of the citizen's message) links it to nothing.
    assert kept.external_id == f"erased:{mine.id}"
    untouched = await db.reports.get(other.id)
    assert untouched is not None and (untouched.reporter, untouched.reason_ct,
                                      untouched.external_id) == (
        AUTHOR, "v1.k.other", "synapse:erase-2")


async def test_the_open_report_of_a_reporter_about_an_event(db: Database) -> None:
    report_id, _ = await _file(db, "synapse:open-for", "$same")
    found = await db.reports.open_for(EventID("$same"), REPORTER)
    assert found is not None and found.id == report_id
    assert await db.reports.open_for(EventID("$same"), AUTHOR) is None
    await db.reports.close(report_id, "dismiss", "admin-api")
    assert await db.reports.open_for(EventID("$same"), REPORTER) is None


async def test_handled_reports_are_purged_after_retention_open_ones_stay(db: Database) -> None:
    handled, _ = await _file(db, "synapse:purge-1")
    still_open, _ = await _file(db, "synapse:purge-2")
    await db.reports.close(handled, "kick", "admin-api")
    now = datetime.now(UTC)
    assert await db.reports.purge(now - timedelta(days=1)) == 0  # handled just now
    assert await db.reports.purge(now + timedelta(seconds=1)) == 1
    assert await db.reports.get(handled) is None
    assert await db.reports.get(still_open) is not None
