"""The E2EE crypto state of the bridge's devices (tables of revision 0016).

A device's state is read whole when its nio client opens (`load`: a snapshot) and
written as a journal of what changed since the last write (`flush`: one transaction,
so a crash leaves the state of one flush or of the next, never half of one). The
records are plain values; bridge.matrix.crypto.store turns them into nio objects and
back. Pickles arrive already sealed (vodozemac pickles, bridge.matrix.storekey).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import InstrumentedAttribute

from bridge.db.models import (
    Base,
    CryptoAccountRow,
    CryptoDeviceRow,
    CryptoDeviceTrustRow,
    CryptoKeyRequestRow,
    CryptoMegolmInboundRow,
    CryptoMegolmOutboundRow,
    CryptoOlmSessionRow,
    CryptoTrackedUserRow,
    utcnow,
)
from bridge.db.scope import Scope, rowcount

DeviceRef = tuple[str, str]  # (user id, device id)


@dataclass(frozen=True, slots=True)
class AccountRecord:
    device_id: str
    pickle: str
    shared: bool


@dataclass(frozen=True, slots=True)
class OlmSessionRecord:
    session_id: str
    sender_key: str
    pickle: str
    created_at: datetime
    last_used_at: datetime


@dataclass(frozen=True, slots=True)
class InboundRecord:
    session_id: str
    sender_key: str
    signing_key: str
    room_id: str
    pickle: str
    forwarding_chain: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class OutboundRecord:
    room_id: str
    session_id: str
    pickle: str
    created_at: datetime
    message_count: int
    shared: bool
    shared_with: tuple[DeviceRef, ...] = ()
    ignored: tuple[DeviceRef, ...] = ()
    reserved_index: int = 0


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    user_id: str
    device_id: str
    keys: dict[str, str]
    display_name: str = ""
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class KeyRequestRecord:
    request_id: str
    session_id: str
    room_id: str
    algorithm: str


@dataclass(slots=True)
class CryptoSnapshot:
    """One device's whole state (`CryptoRepo.load`). `device_id` None: nothing stored."""

    device_id: str | None = None
    account: AccountRecord | None = None
    olm_sessions: list[OlmSessionRecord] = field(default_factory=list)
    inbound: list[InboundRecord] = field(default_factory=list)
    outbound: list[OutboundRecord] = field(default_factory=list)
    devices: list[DeviceRecord] = field(default_factory=list)
    trust: dict[DeviceRef, int] = field(default_factory=dict)
    tracked: set[str] = field(default_factory=set)
    key_requests: list[KeyRequestRecord] = field(default_factory=list)
    sync_token: str | None = None


@dataclass(slots=True)
class CryptoJournal:
    """What changed since the last flush; per key the last write wins, None deletes.

    `reset`: the stored state belongs to another device of the owner (its device id
    changed): it is deleted before the journal is written."""

    reset: bool = False
    account: AccountRecord | None = None
    olm_sessions: dict[str, OlmSessionRecord] = field(default_factory=dict)
    inbound: dict[str, InboundRecord] = field(default_factory=dict)
    outbound: dict[str, OutboundRecord | None] = field(default_factory=dict)
    devices: dict[DeviceRef, DeviceRecord] = field(default_factory=dict)
    trust: dict[DeviceRef, int] = field(default_factory=dict)
    tracked: dict[str, bool] = field(default_factory=dict)
    key_requests: dict[str, KeyRequestRecord | None] = field(default_factory=dict)
    sync_token: str | None = None

    def __len__(self) -> int:
        return (int(self.reset) + int(self.account is not None)
                + int(self.sync_token is not None) + len(self.olm_sessions)
                + len(self.inbound) + len(self.outbound) + len(self.devices)
                + len(self.trust) + len(self.tracked) + len(self.key_requests))

    def merge_under(self, newer: CryptoJournal) -> None:
        """Put back what a failed flush took, under what was journaled since."""
        self.reset = self.reset or newer.reset
        self.account = newer.account or self.account
        self.sync_token = newer.sync_token or self.sync_token
        self.olm_sessions.update(newer.olm_sessions)
        self.inbound.update(newer.inbound)
        self.outbound.update(newer.outbound)
        self.devices.update(newer.devices)
        self.trust.update(newer.trust)
        self.tracked.update(newer.tracked)
        self.key_requests.update(newer.key_requests)


# Rows per INSERT: well under SQLite's and asyncpg's bound-parameter limits.
_CHUNK = 200
# The per-owner tables (`crypto_devices` is shared), and their owner column.
_OWNED: tuple[tuple[type[Base], Any], ...] = (
    (CryptoAccountRow, CryptoAccountRow.user_id),
    (CryptoOlmSessionRow, CryptoOlmSessionRow.user_id),
    (CryptoMegolmInboundRow, CryptoMegolmInboundRow.user_id),
    (CryptoMegolmOutboundRow, CryptoMegolmOutboundRow.user_id),
    (CryptoDeviceTrustRow, CryptoDeviceTrustRow.owner),
    (CryptoTrackedUserRow, CryptoTrackedUserRow.owner),
    (CryptoKeyRequestRow, CryptoKeyRequestRow.owner),
)


def _pairs(value: str) -> tuple[DeviceRef, ...]:
    return tuple((str(u), str(d)) for u, d in json.loads(value))


class CryptoRepo:
    """Each owner's crypto state: read whole, written by journal."""

    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    async def has_account(self, owner: str) -> bool:
        stmt = select(CryptoAccountRow.user_id).where(CryptoAccountRow.user_id == owner)
        async with self._scope.session() as session:
            return await session.scalar(stmt) is not None

    async def load(self, owner: str) -> CryptoSnapshot:
        """The owner's state (empty if none); devices: those of the users it tracks.

        Read as plain rows, not ORM objects: the bot's state holds a session and a
        device per ghost it ever heard from, and it is read at every start (ORM objects
        cost about twice the CPU for them)."""
        snap = CryptoSnapshot()
        async with self._scope.session() as session:
            account = (await session.execute(select(
                CryptoAccountRow.device_id, CryptoAccountRow.pickle, CryptoAccountRow.shared,
                CryptoAccountRow.sync_token).where(CryptoAccountRow.user_id == owner))).first()
            if account is None:
                return snap
            snap.device_id = account.device_id
            snap.account = AccountRecord(account.device_id, account.pickle, account.shared)
            snap.sync_token = account.sync_token
            o = CryptoOlmSessionRow
            snap.olm_sessions = [OlmSessionRecord(*r) for r in await session.execute(select(
                o.session_id, o.sender_key, o.pickle, o.created_at, o.last_used_at
            ).where(o.user_id == owner))]
            i = CryptoMegolmInboundRow
            snap.inbound = [
                InboundRecord(r[0], r[1], r[2], r[3], r[4], tuple(json.loads(r[5])))
                for r in await session.execute(select(
                    i.session_id, i.sender_key, i.signing_key, i.room_id, i.pickle,
                    i.forwarding_chain).where(i.user_id == owner))]
            g = CryptoMegolmOutboundRow
            snap.outbound = [
                OutboundRecord(r[0], r[1], r[2], r[3], r[4], r[5], _pairs(r[6]), _pairs(r[7]),
                               r[8])
                for r in await session.execute(select(
                    g.room_id, g.session_id, g.pickle, g.created_at, g.message_count, g.shared,
                    g.shared_with, g.ignored, g.reserved_index).where(g.user_id == owner))]
            snap.tracked = set(await session.scalars(select(CryptoTrackedUserRow.user_id)
                                                     .where(CryptoTrackedUserRow.owner == owner)))
            d = CryptoDeviceRow
            snap.devices = [
                DeviceRecord(r[0], r[1], json.loads(r[2]), r[3], r[4])
                for r in await session.execute(select(
                    d.user_id, d.device_id, d.keys, d.display_name, d.deleted).join(
                    CryptoTrackedUserRow, CryptoTrackedUserRow.user_id == d.user_id
                ).where(CryptoTrackedUserRow.owner == owner))]
            t = CryptoDeviceTrustRow
            for user_id, device_id, state in await session.execute(select(
                    t.user_id, t.device_id, t.state).where(t.owner == owner)):
                snap.trust[(user_id, device_id)] = state
            k = CryptoKeyRequestRow
            snap.key_requests = [KeyRequestRecord(*r) for r in await session.execute(select(
                k.request_id, k.session_id, k.room_id, k.algorithm).where(k.owner == owner))]
        return snap

    async def flush(self, owner: str, journal: CryptoJournal,
                    migrated_from: str | None = None) -> int:
        """Write the journal in one transaction; returns how many entries it had."""
        if not len(journal):
            return 0
        now = utcnow()
        async with self._scope.session() as session:
            if journal.reset:
                for model, column in _OWNED:
                    await session.execute(delete(model).where(column == owner))
            if (a := journal.account) is not None:
                await self._upsert(session, CryptoAccountRow, ["user_id"], [{
                    "user_id": owner, "device_id": a.device_id, "pickle": a.pickle,
                    "shared": a.shared, "updated_at": now, "migrated_from": migrated_from}],
                    keep=["migrated_from"] if migrated_from is None else [])
            if journal.sync_token is not None:
                await session.execute(update(CryptoAccountRow).where(
                    CryptoAccountRow.user_id == owner).values(sync_token=journal.sync_token))
            await self._upsert(session, CryptoOlmSessionRow, ["user_id", "session_id"], [
                {"user_id": owner, "session_id": s.session_id, "sender_key": s.sender_key,
                 "pickle": s.pickle, "created_at": s.created_at,
                 "last_used_at": s.last_used_at} for s in journal.olm_sessions.values()])
            await self._upsert(session, CryptoMegolmInboundRow, ["user_id", "session_id"], [
                {"user_id": owner, "session_id": s.session_id, "sender_key": s.sender_key,
                 "signing_key": s.signing_key, "room_id": s.room_id, "pickle": s.pickle,
                 "forwarding_chain": json.dumps(list(s.forwarding_chain))}
                for s in journal.inbound.values()])
            await _forget(session, CryptoMegolmOutboundRow.user_id, owner,
                          CryptoMegolmOutboundRow.room_id,
                          [room for room, s in journal.outbound.items() if s is None])
            await self._upsert(session, CryptoMegolmOutboundRow, ["user_id", "room_id"], [
                {"user_id": owner, "room_id": s.room_id, "session_id": s.session_id,
                 "pickle": s.pickle, "created_at": s.created_at,
                 "message_count": s.message_count, "shared": s.shared,
                 "shared_with": json.dumps(sorted(map(list, s.shared_with))),
                 "ignored": json.dumps(sorted(map(list, s.ignored))),
                 "reserved_index": s.reserved_index}
                for s in journal.outbound.values() if s is not None])
            await self._upsert(session, CryptoDeviceRow, ["user_id", "device_id"], [
                {"user_id": d.user_id, "device_id": d.device_id,
                 "curve25519": d.keys.get("curve25519"),
                 "keys": json.dumps(d.keys, sort_keys=True),
                 "display_name": d.display_name, "deleted": d.deleted}
                for d in journal.devices.values()])
            await self._upsert(session, CryptoDeviceTrustRow, ["owner", "user_id", "device_id"], [
                {"owner": owner, "user_id": u, "device_id": d, "state": state}
                for (u, d), state in journal.trust.items()])
            await _forget(session, CryptoTrackedUserRow.owner, owner,
                          CryptoTrackedUserRow.user_id,
                          [u for u, on in journal.tracked.items() if not on])
            await self._upsert(session, CryptoTrackedUserRow, ["owner", "user_id"], [
                {"owner": owner, "user_id": u} for u, on in journal.tracked.items() if on])
            await _forget(session, CryptoKeyRequestRow.owner, owner,
                          CryptoKeyRequestRow.request_id,
                          [r for r, k in journal.key_requests.items() if k is None])
            await self._upsert(session, CryptoKeyRequestRow, ["owner", "request_id"], [
                {"owner": owner, "request_id": k.request_id, "session_id": k.session_id,
                 "room_id": k.room_id, "algorithm": k.algorithm}
                for k in journal.key_requests.values() if k is not None])
        return len(journal)

    async def _upsert(self, session: Any, model: type[Base], keys: Sequence[str],
                      rows: list[dict[str, Any]], keep: Iterable[str] = ()) -> None:
        """INSERT ... ON CONFLICT (keys) DO UPDATE every other column but `keep`.

        In key order: flushes of different owners write the shared device rows, and two
        that locked them in different orders would deadlock on PostgreSQL."""
        rows = sorted(rows, key=lambda row: tuple(row[k] for k in keys))
        for start in range(0, len(rows), _CHUNK):
            chunk = rows[start:start + _CHUNK]
            stmt = self._scope.insert(model).values(chunk)
            changing = [c for c in chunk[0] if c not in keys and c not in keep]
            if changing:
                stmt = stmt.on_conflict_do_update(
                    index_elements=list(keys),
                    set_={c: stmt.excluded[c] for c in changing})
            else:
                stmt = stmt.on_conflict_do_nothing()
            await session.execute(stmt)

    async def delete_owner(self, owner: str) -> int:
        """Forget the owner's device (erasure); the shared device directory stays."""
        removed = 0
        async with self._scope.session() as session:
            for model, column in _OWNED:
                removed += rowcount(await session.execute(delete(model).where(column == owner)))
        return removed

    async def owners(self) -> set[str]:
        """Every user with a stored account."""
        async with self._scope.session() as session:
            return set(await session.scalars(select(CryptoAccountRow.user_id)))


async def _forget(session: Any, owner_column: InstrumentedAttribute[str], owner: str,
                  key_column: InstrumentedAttribute[str], keys: list[str]) -> None:
    """Delete the owner's rows whose keys the journal recorded as gone (an outbound
    session replaced, a user no longer tracked, a key request answered)."""
    if keys:
        await session.execute(delete(owner_column.class_).where(
            owner_column == owner, key_column.in_(keys)))
