"""The late-device key ledger of the bridge's devices (see bridge.matrix.keyshare).

Rows are per owner, the bridge user whose device created the sessions; erasure of that
user deletes them all. Session keys arrive here already sealed (bridge.matrix.keystore).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, cast

from sqlalchemy import Row, Table, delete, select

from bridge.db.models import RoomKeyDeliveryRow, RoomKeyRow, utcnow
from bridge.db.scope import Scope, rowcount
from bridge.model import OwnerRoomKeys, RoomKeyDelivery, StoredRoomKey
from bridge.types import RoomID, UserID


class RoomKeyRepo:
    """Checkpoints (a session key from an index on) and deliveries (who has what)."""

    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    async def add_key(self, owner: UserID, room_id: RoomID, session_id: str, message_index: int,
                      session_key_ct: str, audience: Iterable[str]) -> None:
        """Keep a checkpoint; again for the same (owner, session, index) only its
        audience is replaced (the ledger widens it, never narrows it)."""
        members = json.dumps(sorted(audience))
        stmt = self._scope.insert(RoomKeyRow).values(
            owner=owner, room_id=room_id, session_id=session_id, message_index=message_index,
            session_key_ct=session_key_ct, audience=members, created_at=utcnow())
        stmt = stmt.on_conflict_do_update(
            index_elements=["owner", "session_id", "message_index"],
            set_={"audience": stmt.excluded.audience})
        async with self._scope.session() as session:
            await session.execute(stmt)

    async def record_deliveries(self, owner: UserID,
                                deliveries: Iterable[RoomKeyDelivery]) -> None:
        """Note what devices have (one statement); a stored index only ever goes down."""
        lowest: dict[tuple[str, str], int] = {}
        for item in deliveries:
            key = (item.session_id, item.curve25519)
            lowest[key] = min(item.message_index, lowest.get(key, item.message_index))
        if not lowest:
            return
        # One row per key: PostgreSQL refuses to update a row twice in one statement.
        stmt = self._scope.insert(RoomKeyDeliveryRow).values([
            {"owner": owner, "session_id": session_id, "curve25519": curve25519,
             "message_index": index}
            for (session_id, curve25519), index in sorted(lowest.items())])
        stmt = stmt.on_conflict_do_update(
            index_elements=["owner", "session_id", "curve25519"],
            set_={"message_index": stmt.excluded.message_index},
            where=stmt.excluded.message_index < RoomKeyDeliveryRow.message_index,
        )
        async with self._scope.session() as session:
            await session.execute(stmt)

    async def load(self, owner: UserID) -> OwnerRoomKeys:
        """Every checkpoint (by session, then index) and delivery of the owner.

        Plain rows, not ORM objects: the bot's device reads these at every start, one
        per portal it ever spoke in and one per device it gave a key to."""
        k, d = RoomKeyRow, RoomKeyDeliveryRow
        keys = (select(*cast(Table, k.__table__).c).where(k.owner == owner)
                .order_by(k.session_id, k.message_index))
        deliveries = select(d.session_id, d.curve25519, d.message_index).where(d.owner == owner)
        async with self._scope.session() as session:
            return OwnerRoomKeys(
                keys=[_key(row) for row in await session.execute(keys)],
                deliveries=[RoomKeyDelivery(*r) for r in await session.execute(deliveries)],
            )

    async def owners_in(self, room_id: RoomID) -> set[UserID]:
        """The bridge users that kept keys of the room."""
        stmt = select(RoomKeyRow.owner).where(RoomKeyRow.room_id == room_id).distinct()
        async with self._scope.session() as session:
            return {UserID(owner) for owner in await session.scalars(stmt)}

    async def delete_sessions(self, owner: UserID, session_ids: Iterable[str]) -> int:
        """Forget sessions of rooms the owner left; returns how many rows went."""
        ids = sorted(set(session_ids))
        if not ids:
            return 0
        async with self._scope.session() as session:
            return (rowcount(await session.execute(delete(RoomKeyRow).where(
                        RoomKeyRow.owner == owner, RoomKeyRow.session_id.in_(ids))))
                    + rowcount(await session.execute(delete(RoomKeyDeliveryRow).where(
                        RoomKeyDeliveryRow.owner == owner,
                        RoomKeyDeliveryRow.session_id.in_(ids)))))

    async def delete_owner(self, owner: UserID) -> int:
        """Everything kept for the owner (erasure); returns how many rows went."""
        async with self._scope.session() as session:
            return (rowcount(await session.execute(
                        delete(RoomKeyRow).where(RoomKeyRow.owner == owner)))
                    + rowcount(await session.execute(
                        delete(RoomKeyDeliveryRow).where(RoomKeyDeliveryRow.owner == owner))))

    async def sealed(self) -> list[StoredRoomKey]:
        """Every checkpoint of every owner (for re-encryption under a new data key)."""
        async with self._scope.session() as session:
            return [_key(row) for row in await session.scalars(
                select(RoomKeyRow).order_by(RoomKeyRow.id))]

    async def reseal(self, key_id: int, session_key_ct: str) -> None:
        async with self._scope.session() as session:
            row = await session.get(RoomKeyRow, key_id)
            if row is not None:
                row.session_key_ct = session_key_ct


def _key(row: RoomKeyRow | Row[Any]) -> StoredRoomKey:
    return StoredRoomKey(
        id=row.id, owner=UserID(row.owner), room_id=RoomID(row.room_id),
        session_id=row.session_id, message_index=row.message_index,
        session_key_ct=row.session_key_ct, audience=tuple(json.loads(row.audience)),
        created_at=row.created_at,
    )
