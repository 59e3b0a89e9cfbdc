"""Invite links and their accounts (revision 0002), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.exc import IntegrityError

from bridge.db import Database
from bridge.types import Pseudonym, RoomID, UserID

ROOM = RoomID("!vecinos:agency.example")
CITIZEN = UserID("@v_abcdefghijklmnop:agency.example")


async def _link(db: Database, uses: int = 1, hours: float = 1) -> int:
    link = await db.invites.create(
        token_hash=secrets.token_hex(32), room_id=ROOM, max_uses=uses,
        expires_at=datetime.now(UTC) + timedelta(hours=hours), created_by="admin-api")
    return link.id


async def test_create_and_find_by_hash(db: Database) -> None:
    link = await db.invites.create(token_hash="ab" * 32, room_id=ROOM, max_uses=2,
                                   expires_at=datetime.now(UTC) + timedelta(hours=1),
                                   created_by="@admin:agency.example")
    found = await db.invites.by_hash("ab" * 32)
    assert found == link
    assert (found.uses, found.max_uses, found.revoked_at) == (0, 2, None)
    assert found.usable(datetime.now(UTC))
    assert not found.usable(found.expires_at)
    assert await db.invites.by_hash("cd" * 32) is None
    with pytest.raises(IntegrityError):
        await db.invites.create(token_hash="ab" * 32, room_id=ROOM, max_uses=1,
                                expires_at=datetime.now(UTC), created_by="x")


async def test_claim_counts_uses_and_respects_expiry_and_revocation(db: Database) -> None:
    now = datetime.now(UTC)
    two = await _link(db, uses=2)
    assert await db.invites.claim(two, now)
    assert await db.invites.claim(two, now)
    assert not await db.invites.claim(two, now)  # used up
    await db.invites.release(two)
    assert await db.invites.claim(two, now)  # a released use can be taken again
    link = await db.invites.get(two)
    assert link is not None and link.uses == 2

    expiring = await _link(db, hours=1)
    assert not await db.invites.claim(expiring, now + timedelta(hours=2))
    revoked = await _link(db)
    assert await db.invites.revoke_room(ROOM) == 3
    assert not await db.invites.claim(revoked, now)
    assert await db.invites.revoke_room(ROOM) == 0
    await db.invites.release(revoked)  # never below zero
    link = await db.invites.get(revoked)
    assert link is not None and link.uses == 0


async def test_concurrent_claims_of_a_single_use_link(db: Database) -> None:
    link = await _link(db)
    now = datetime.now(UTC)
    results = await asyncio.gather(*(db.invites.claim(link, now) for _ in range(8)))
    assert sorted(results) == [False] * 7 + [True]


async def test_accounts_and_membership_consent(db: Database) -> None:
    link = await _link(db)
    account = await db.invites.add_account(user_id=CITIZEN, link_id=link, room_id=ROOM,
                                           display_name="Vecina")
    assert await db.invites.account(CITIZEN) == account
    assert [a.user_id for a in await db.invites.accounts([CITIZEN, "@staff:x"])] == [CITIZEN]
    assert await db.invites.accounts([]) == []
    # Consent for membership has no WhatsApp citizen behind it: citizen_id is None.
    record = await db.consent.append(
        citizen_id=None, pseudonym=Pseudonym(CITIZEN), purpose="membership", state="granted",
        notice_version="1", notice_hash="0" * 64, channel="invite-link", language="es",
        evidence=f"invite-link:{link}")
    assert record.citizen_id is None
    assert await db.consent.for_pseudonym(Pseudonym(CITIZEN)) == [record]
