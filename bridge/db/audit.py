"""The audit log: a hash chain, so editing or removing an entry is detectable.

Each entry's `hash` is SHA-256 over the canonical JSON of its fields and the previous
entry's hash (`prev_hash`; the first entry links to GENESIS). `verify` recomputes the
chain. What it cannot see: the newest entries removed together (the chain is still
consistent); anchoring the head hash elsewhere (e.g. a periodic notice in the
management room) covers that.

Appends must be serialised or two writers would link to the same predecessor and fork
the chain. On PostgreSQL, `append` takes a transaction-scoped advisory lock
(`pg_advisory_xact_lock`) before reading the head: it needs no row to lock (the log may
be empty) and is released by commit or rollback, never leaked. On SQLite every
transaction begins IMMEDIATE (see `bridge.db.engine`), which already allows one writer.
"""

from __future__ import annotations

import builtins
import hashlib
from datetime import datetime
from typing import Any

from canonicaljson import encode_canonical_json
from sqlalchemy import select, text

from bridge.db.models import AuditRow, utcnow
from bridge.db.records import AuditEntry
from bridge.db.scope import Scope

GENESIS = "0" * 64
# Key of the advisory lock guarding the chain head ("cbaudit" in ASCII); other locks
# (e.g. the leader lock of the scaling path) must use other keys.
AUDIT_LOCK_KEY = 0x63_62_61_75_64_69_74
_VERIFY_BATCH = 1000


def entry_hash(
    *, at: datetime, actor: str, action: str, object: str, result: str,
    reason: str | None, prev_hash: str,
) -> str:
    """The chain hash of one entry (the id is left out: it is assigned by the database)."""
    doc = {
        "at": at.isoformat(), "actor": actor, "action": action, "object": object,
        "result": result, "reason": reason, "prev_hash": prev_hash,
    }
    return hashlib.sha256(encode_canonical_json(doc)).hexdigest()


class AuditRepo:
    """Who did what to which object, and why; append-only and tamper-evident."""

    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    async def append(
        self, actor: str, action: str, object: str, result: str, reason: str | None = None
    ) -> AuditEntry:
        async with self._scope.session() as session:
            if self._scope.dialect == "postgresql":
                await session.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": AUDIT_LOCK_KEY}
                )
            head = await session.scalar(select(AuditRow.hash).order_by(AuditRow.id.desc()).limit(1))
            prev_hash = head or GENESIS
            # Taken under the lock, so times along the chain never go backwards.
            at = utcnow()
            fields: dict[str, Any] = {
                "at": at, "actor": actor, "action": action, "object": object,
                "result": result, "reason": reason,
            }
            digest = entry_hash(**fields, prev_hash=prev_hash)
            row = AuditRow(**fields, prev_hash=prev_hash, hash=digest)
            session.add(row)
            await session.flush()
            return _entry(row)

    async def list(
        self, limit: int = 100, before_id: int | None = None
    ) -> builtins.list[AuditEntry]:
        """Entries newest first; page with `before_id` = the last id of the previous page."""
        stmt = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)
        if before_id is not None:
            stmt = stmt.where(AuditRow.id < before_id)
        async with self._scope.session() as session:
            return [_entry(r) for r in await session.scalars(stmt)]

    async def verify(self) -> tuple[bool, int | None]:
        """Recompute the chain: (True, None) if intact, else (False, id of the first bad entry).

        An edited entry fails its own hash; a removed one breaks the `prev_hash` link of
        the entry after it.
        """
        expected_prev = GENESIS
        last_id = 0
        # Plain column tuples, not entities: nothing piles up in the session's identity map.
        columns = (
            AuditRow.id, AuditRow.at, AuditRow.actor, AuditRow.action, AuditRow.object,
            AuditRow.result, AuditRow.reason, AuditRow.prev_hash, AuditRow.hash,
        )
        async with self._scope.session() as session:
            while True:
                stmt = select(*columns).where(AuditRow.id > last_id).order_by(AuditRow.id)
                rows = (await session.execute(stmt.limit(_VERIFY_BATCH))).all()
                if not rows:
                    return True, None
                for row_id, at, actor, action, obj, result, reason, prev_hash, hash_ in rows:
                    recomputed = entry_hash(
                        at=at, actor=actor, action=action, object=obj, result=result,
                        reason=reason, prev_hash=prev_hash,
                    )
                    if prev_hash != expected_prev or hash_ != recomputed:
                        return False, row_id
                    expected_prev = hash_
                    last_id = row_id


def _entry(row: AuditRow) -> AuditEntry:
    return AuditEntry(
        id=row.id, at=row.at, actor=row.actor, action=row.action, object=row.object,
        result=row.result, reason=row.reason, prev_hash=row.prev_hash, hash=row.hash,
    )
