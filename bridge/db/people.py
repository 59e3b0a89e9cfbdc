"""Citizens, the ghosts that stand for them on Matrix, the rooms, and consent evidence."""

from __future__ import annotations

import builtins
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Row, Table, bindparam, delete, exists, func, or_, select, update

from bridge.db.models import CitizenRow, ConsentRecordRow, GhostRow, RoomRow, utcnow
from bridge.db.scope import Scope, rowcount
from bridge.errors import Conflict, NotFound
from bridge.model import (
    Citizen,
    CitizenIdentifiers,
    ConsentPurpose,
    ConsentRecord,
    ConsentState,
    Ghost,
    GhostKind,
    Room,
    RoomKind,
)
from bridge.types import DeviceID, Pseudonym, RoomID, UserID

# Built once (every outbox batch reads its citizens): plain rows, values bound at execution.
_CITIZENS = cast(Table, CitizenRow.__table__)
_CITIZENS_BY_ID = select(*_CITIZENS.c).where(
    _CITIZENS.c.id.in_(bindparam("ids", expanding=True)))


class CitizenRepo:
    """WhatsApp contacts, found by the keyed hash of their identifier, never by the identifier."""

    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    async def get_or_create(
        self, *, index_hash: str, identifier_ct: str, pseudonym_code: str,
        wa_id_ct: str | None = None, consent_state: ConsentState = "unknown",
    ) -> tuple[Citizen, bool]:
        """The citizen with `index_hash`, created if new; the flag says whether it was.

        Safe when two webhooks for a new contact race: one inserts, the other gets
        the stored row. Raises Conflict if only `pseudonym_code` collides (retry with
        a fresh code).
        """
        stmt = (
            self._scope.insert(CitizenRow)
            .values(
                index_hash=index_hash, identifier_ct=identifier_ct, wa_id_ct=wa_id_ct,
                pseudonym_code=pseudonym_code, consent_state=consent_state, created_at=utcnow(),
            )
            .on_conflict_do_nothing()
            .returning(CitizenRow)
        )
        async with self._scope.session() as session:
            row = await session.scalar(stmt)
            if row is not None:
                return _citizen(row), True
            stored = select(CitizenRow).where(CitizenRow.index_hash == index_hash)
            row = await session.scalar(stored)
            if row is None:
                raise Conflict("pseudonym code already in use")
            return _citizen(row), False

    async def create(
        self, *, index_hash: str, identifier_ct: str, pseudonym_code: str,
        wa_id_ct: str | None = None, consent_state: ConsentState = "unknown",
    ) -> Citizen:
        """A new citizen; raises Conflict if the index hash or pseudonym code is taken."""
        citizen, created = await self.get_or_create(
            index_hash=index_hash, identifier_ct=identifier_ct, pseudonym_code=pseudonym_code,
            wa_id_ct=wa_id_ct, consent_state=consent_state,
        )
        if not created:
            raise Conflict("citizen already exists")
        return citizen

    async def get(self, citizen_id: int) -> Citizen | None:
        async with self._scope.session() as session:
            row = await session.get(CitizenRow, citizen_id)
            return None if row is None else _citizen(row)

    async def get_many(self, citizen_ids: Collection[int]) -> dict[int, Citizen]:
        if not citizen_ids:
            return {}
        async with self._scope.session() as session:
            return {r.id: _citizen(r) for r in
                    await session.execute(_CITIZENS_BY_ID, {"ids": list(citizen_ids)})}

    async def by_index(self, index_hash: str) -> Citizen | None:
        return await self._one(CitizenRow.index_hash == index_hash)

    async def by_any_index(self, index_hashes: Sequence[str]) -> Citizen | None:
        """The citizen with the first of `index_hashes` found (the lookup values of one
        identifier under the current and the previous index keys, in that order)."""
        if not index_hashes:
            return None
        stmt = select(CitizenRow).where(CitizenRow.index_hash.in_(index_hashes))
        async with self._scope.session() as session:
            rows = {row.index_hash: row for row in await session.scalars(stmt)}
        for index_hash in index_hashes:
            if index_hash in rows:
                return _citizen(rows[index_hash])
        return None

    async def set_index_hash(self, citizen_id: int, index_hash: str) -> bool:
        """Move a citizen to a lookup value under another index key; False (nothing
        changed) if another citizen already has it."""
        taken = select(CitizenRow.id).where(CitizenRow.index_hash == index_hash,
                                            CitizenRow.id != citizen_id)
        async with self._scope.session() as session:
            if await session.scalar(taken) is not None:
                return False
            await session.execute(update(CitizenRow).where(CitizenRow.id == citizen_id)
                                  .values(index_hash=index_hash))
            return True

    async def by_ghost(self, user_id: UserID) -> Citizen | None:
        return await self._one(CitizenRow.ghost_user_id == user_id)

    async def by_pseudonym(self, pseudonym_code: str) -> Citizen | None:
        return await self._one(CitizenRow.pseudonym_code == pseudonym_code)

    async def set_consent_state(self, citizen_id: int, state: ConsentState) -> None:
        """The current state only; the evidence goes to `ConsentRepo.append`."""
        await self._update(citizen_id, consent_state=state)

    async def set_ghost(self, citizen_id: int, user_id: UserID) -> None:
        await self._update(citizen_id, ghost_user_id=user_id)

    async def touch_inbound(self, citizen_id: int, at: datetime) -> None:
        """Record a message from the citizen (opens the 24-hour reply window).

        Only moves forward: webhooks can arrive out of order.
        """
        stmt = (
            update(CitizenRow)
            .where(
                CitizenRow.id == citizen_id,
                or_(CitizenRow.last_inbound_at.is_(None), CitizenRow.last_inbound_at < at),
            )
            .values(last_inbound_at=at)
        )
        async with self._scope.session() as session:
            await session.execute(stmt)

    async def never_consented(self, last_seen_before: datetime, limit: int = 100
                              ) -> builtins.list[Citizen]:
        """Contacts who never gave consent to anything (no `granted` record for any
        purpose) and whose last message (or first contact) was before `last_seen_before`,
        the longest silent first."""
        last_seen = func.coalesce(CitizenRow.last_inbound_at, CitizenRow.created_at)
        granted = select(ConsentRecordRow.id).where(
            ConsentRecordRow.citizen_id == CitizenRow.id, ConsentRecordRow.state == "granted")
        stmt = (select(CitizenRow)
                .where(CitizenRow.consent_state != "granted", last_seen < last_seen_before,
                       ~exists(granted))
                .order_by(last_seen, CitizenRow.id).limit(limit))
        async with self._scope.session() as session:
            return [_citizen(r) for r in await session.scalars(stmt)]

    async def list_identifiers(self) -> builtins.list[CitizenIdentifiers]:
        """Every citizen's ciphertexts, for re-encryption under a new data key."""
        stmt = select(CitizenRow.id, CitizenRow.identifier_ct, CitizenRow.wa_id_ct).order_by(
            CitizenRow.id
        )
        async with self._scope.session() as session:
            rows = await session.execute(stmt)
            return [CitizenIdentifiers(id=i, identifier_ct=ct, wa_id_ct=wa) for i, ct, wa in rows]

    async def update_identifier(
        self, citizen_id: int, identifier_ct: str, wa_id_ct: str | None
    ) -> None:
        await self._update(citizen_id, identifier_ct=identifier_ct, wa_id_ct=wa_id_ct)

    async def rekey(self, citizen_id: int, *, index_hash: str, identifier_ct: str,
                    wa_id_ct: str | None) -> None:
        """Move a citizen to a new WhatsApp identity (a number or BSUID change): the
        same row, so the same pseudonym, ghost, portal and consent.

        Raises Conflict if another citizen already has `index_hash` (the person wrote
        from the new identity before WhatsApp reported the change), NotFound if the
        citizen is gone.
        """
        taken = select(CitizenRow.id).where(CitizenRow.index_hash == index_hash,
                                            CitizenRow.id != citizen_id)
        async with self._scope.session() as session:
            if await session.scalar(taken) is not None:
                raise Conflict("the new identity belongs to another citizen")
        await self._update(citizen_id, index_hash=index_hash, identifier_ct=identifier_ct,
                           wa_id_ct=wa_id_ct)

    async def delete(self, citizen_id: int) -> bool:
        """Erase a citizen. Their queued and held messages go with them (ON DELETE
        CASCADE); ghosts, portal rooms and consent evidence stay, unlinked (SET NULL).
        """
        async with self._scope.session() as session:
            result = await session.execute(delete(CitizenRow).where(CitizenRow.id == citizen_id))
            return rowcount(result) > 0

    async def _one(self, where: Any) -> Citizen | None:
        async with self._scope.session() as session:
            row = await session.scalar(select(CitizenRow).where(where))
            return None if row is None else _citizen(row)

    async def _update(self, citizen_id: int, **values: Any) -> None:
        stmt = update(CitizenRow).where(CitizenRow.id == citizen_id).values(**values)
        async with self._scope.session() as session:
            if rowcount(await session.execute(stmt)) == 0:
                raise NotFound(f"citizen {citizen_id} not found")


def _citizen(row: CitizenRow | Row[Any]) -> Citizen:
    return Citizen(
        id=row.id, index_hash=row.index_hash, identifier_ct=row.identifier_ct,
        wa_id_ct=row.wa_id_ct, pseudonym_code=row.pseudonym_code,
        ghost_user_id=None if row.ghost_user_id is None else UserID(row.ghost_user_id),
        consent_state=cast(ConsentState, row.consent_state), last_inbound_at=row.last_inbound_at,
        created_at=row.created_at,
    )


class GhostRepo:
    """Matrix users the appservice puppets, with their device and cross-signing state."""

    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    async def create(
        self, user_id: UserID, device_id: DeviceID, display_name: str, kind: GhostKind,
        *, citizen_id: int | None = None, registered: bool = False,
    ) -> Ghost:
        """Record a ghost; raises Conflict if `user_id` is already recorded."""
        stmt = (
            self._scope.insert(GhostRow)
            .values(
                user_id=user_id, device_id=device_id, display_name=display_name, kind=kind,
                citizen_id=citizen_id, registered=registered, created_at=utcnow(),
            )
            .on_conflict_do_nothing()
            .returning(GhostRow)
        )
        async with self._scope.session() as session:
            row = await session.scalar(stmt)
        if row is None:
            raise Conflict("ghost already exists")
        return _ghost(row)

    async def get(self, user_id: UserID) -> Ghost | None:
        async with self._scope.session() as session:
            row = await session.get(GhostRow, user_id)
            return None if row is None else _ghost(row)

    async def by_citizen(self, citizen_id: int) -> Ghost | None:
        """The citizen's portal ghost (their room ghosts, kind "room", are others)."""
        stmt = select(GhostRow).where(GhostRow.citizen_id == citizen_id,
                                      GhostRow.kind == "citizen").order_by(
            GhostRow.created_at
        )
        async with self._scope.session() as session:
            row = await session.scalar(stmt.limit(1))
            return None if row is None else _ghost(row)

    async def mark_registered(self, user_id: UserID) -> None:
        await self._update(user_id, registered=True)

    async def set_cross_signing(self, user_id: UserID, ciphertext: str) -> None:
        await self._update(user_id, cross_signing_ct=ciphertext)

    async def set_display_name(self, user_id: UserID, display_name: str) -> None:
        await self._update(user_id, display_name=display_name)

    async def delete(self, user_id: UserID) -> None:
        async with self._scope.session() as session:
            await session.execute(delete(GhostRow).where(GhostRow.user_id == user_id))

    async def all(self) -> builtins.list[Ghost]:
        async with self._scope.session() as session:
            rows = await session.scalars(select(GhostRow).order_by(GhostRow.user_id))
            return [_ghost(r) for r in rows]

    async def unregistered(self) -> builtins.list[Ghost]:
        """Ghosts whose registration on the homeserver was not finished (a crash or
        the homeserver down between the row and the request): the few that start-up
        completes, read without reading every ghost."""
        stmt = select(GhostRow).where(GhostRow.registered.is_(False)).order_by(GhostRow.user_id)
        async with self._scope.session() as session:
            return [_ghost(r) for r in await session.scalars(stmt)]

    async def _update(self, user_id: UserID, **values: Any) -> None:
        stmt = update(GhostRow).where(GhostRow.user_id == user_id).values(**values)
        async with self._scope.session() as session:
            if rowcount(await session.execute(stmt)) == 0:
                raise NotFound(f"ghost {user_id} not found")


def _ghost(row: GhostRow) -> Ghost:
    return Ghost(
        user_id=UserID(row.user_id), device_id=DeviceID(row.device_id),
        display_name=row.display_name, kind=cast(GhostKind, row.kind), citizen_id=row.citizen_id,
        registered=row.registered, cross_signing_ct=row.cross_signing_ct,
        created_at=row.created_at,
    )


class RoomRepo:
    """Rooms the bridge created; closing keeps the row (for audit and exports)."""

    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    async def create(
        self, room_id: RoomID, kind: RoomKind, name: str, created_by: UserID,
        *, topic: str | None = None, citizen_id: int | None = None,
    ) -> Room:
        """Record a room; raises Conflict if `room_id` is already recorded."""
        stmt = (
            self._scope.insert(RoomRow)
            .values(
                room_id=room_id, kind=kind, name=name, topic=topic, citizen_id=citizen_id,
                created_by=created_by, created_at=utcnow(),
            )
            .on_conflict_do_nothing()
            .returning(RoomRow)
        )
        async with self._scope.session() as session:
            row = await session.scalar(stmt)
        if row is None:
            raise Conflict("room already recorded")
        return _room(row)

    async def get(self, room_id: RoomID) -> Room | None:
        async with self._scope.session() as session:
            row = await session.get(RoomRow, room_id)
            return None if row is None else _room(row)

    async def list(
        self, *, include_closed: bool = False, kind: RoomKind | None = None
    ) -> builtins.list[Room]:
        """Rooms, oldest first."""
        stmt = select(RoomRow)
        if not include_closed:
            stmt = stmt.where(RoomRow.closed_at.is_(None))
        if kind is not None:
            stmt = stmt.where(RoomRow.kind == kind)
        async with self._scope.session() as session:
            rows = await session.scalars(stmt.order_by(RoomRow.created_at, RoomRow.room_id))
            return [_room(r) for r in rows]

    async def portal_for(self, citizen_id: int) -> Room | None:
        """The citizen's open portal room (the newest, should there be several)."""
        stmt = (
            select(RoomRow)
            .where(
                RoomRow.citizen_id == citizen_id,
                RoomRow.kind == "portal",
                RoomRow.closed_at.is_(None),
            )
            .order_by(RoomRow.created_at.desc())
            .limit(1)
        )
        async with self._scope.session() as session:
            row = await session.scalar(stmt)
            return None if row is None else _room(row)

    async def close(self, room_id: RoomID) -> None:
        """Mark a room closed; closing twice keeps the first time."""
        stmt = update(RoomRow).where(RoomRow.room_id == room_id, RoomRow.closed_at.is_(None))
        async with self._scope.session() as session:
            closed = rowcount(await session.execute(stmt.values(closed_at=utcnow())))
            if not closed and await session.get(RoomRow, room_id) is None:
                raise NotFound(f"room {room_id} not found")


def _room(row: RoomRow) -> Room:
    return Room(
        room_id=RoomID(row.room_id), kind=cast(RoomKind, row.kind), name=row.name,
        topic=row.topic, citizen_id=row.citizen_id, created_by=UserID(row.created_by),
        created_at=row.created_at, closed_at=row.closed_at,
    )


class ConsentRepo:
    """Consent evidence. Append-only: there is deliberately no update or delete here."""

    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    async def append(
        self, *, citizen_id: int | None, pseudonym: Pseudonym, purpose: ConsentPurpose,
        state: ConsentState, notice_version: str, notice_hash: str, channel: str,
        language: str | None = None, evidence: str | None = None,
        staff_id: UserID | None = None,
    ) -> ConsentRecord:
        row = ConsentRecordRow(
            citizen_id=citizen_id, pseudonym=pseudonym, purpose=purpose, state=state,
            notice_version=notice_version, notice_hash=notice_hash, channel=channel,
            language=language, evidence=evidence, staff_id=staff_id, created_at=utcnow(),
        )
        async with self._scope.session() as session:
            session.add(row)
            await session.flush()
            return _consent(row)

    async def for_citizen(self, citizen_id: int) -> builtins.list[ConsentRecord]:
        """A citizen's records, oldest first."""
        return await self._where(ConsentRecordRow.citizen_id == citizen_id)

    async def for_pseudonym(self, pseudonym: Pseudonym) -> builtins.list[ConsentRecord]:
        """Records by pseudonym: still answers after the citizen row was erased."""
        return await self._where(ConsentRecordRow.pseudonym == pseudonym)

    async def _where(self, where: Any) -> builtins.list[ConsentRecord]:
        stmt = select(ConsentRecordRow).where(where).order_by(ConsentRecordRow.id)
        async with self._scope.session() as session:
            return [_consent(r) for r in await session.scalars(stmt)]


def _consent(row: ConsentRecordRow) -> ConsentRecord:
    return ConsentRecord(
        id=row.id, citizen_id=row.citizen_id, pseudonym=Pseudonym(row.pseudonym),
        purpose=cast(ConsentPurpose, row.purpose), state=cast(ConsentState, row.state),
        notice_version=row.notice_version, notice_hash=row.notice_hash, channel=row.channel,
        language=row.language, evidence=row.evidence,
        staff_id=None if row.staff_id is None else UserID(row.staff_id),
        created_at=row.created_at,
    )
