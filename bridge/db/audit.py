"""The audit log: a keyed hash chain, so editing, removing or reordering an entry is
detectable, also by someone who can write the table but does not hold `audit.key`.

The chain's maths (schemes, key rotation, what counts as bad) is in `bridge.auditchain`.
What the chain alone cannot see: the newest entries removed together, or a rewrite by
someone holding the key; the daily anchor (the head exported elsewhere,
`bridge.auditanchor`) covers both up to the last anchor.

Appends must be serialised or two writers would link to the same predecessor and fork
the chain. On PostgreSQL, `append` takes a transaction-scoped advisory lock
(`pg_advisory_xact_lock`) before reading the head: it needs no row to lock (the log may
be empty) and is released by commit or rollback, never leaked. On SQLite every
transaction begins IMMEDIATE (see `bridge.db.engine`), which already allows one writer.
"""

from __future__ import annotations

import builtins
from typing import Any

from sqlalchemy import select, text

from bridge.auditchain import GENESIS, KEYED, LEGACY, AuditKeys, ChainCheck, ChainRow, entry_mac
from bridge.auditchain import legacy_hash as entry_hash
from bridge.db.models import AuditRow, utcnow
from bridge.db.scope import Scope
from bridge.model import AuditEntry

__all__ = ["AUDIT_LOCK_KEY", "GENESIS", "AuditKeyMissing", "AuditRepo", "entry_hash"]

# Key of the advisory lock guarding the chain head ("cbaudit" in ASCII); other locks
# (e.g. the leader lock of the scaling path) must use other keys.
AUDIT_LOCK_KEY = 0x63_62_61_75_64_69_74
_VERIFY_BATCH = 1000


class AuditKeyMissing(RuntimeError):
    """An audit entry was to be written by a database opened without `audit.key`."""


class AuditRepo:
    """Who did what to which object, and why; append-only and tamper-evident.

    `keys` is None only for tools that never write or check the trail (e.g. `rekey`);
    then `append` and `verify` raise AuditKeyMissing instead of writing an unkeyed entry.
    """

    def __init__(self, scope: Scope, keys: AuditKeys | None = None) -> None:
        self._scope = scope
        self._keys = keys

    def _require_keys(self) -> AuditKeys:
        if self._keys is None:
            raise AuditKeyMissing("audit.key is not configured for this database handle")
        return self._keys

    async def append(
        self, actor: str, action: str, object: str, result: str, reason: str | None = None
    ) -> AuditEntry:
        keys = self._require_keys()
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
            # The MAC covers the id, which the database assigns: insert, then seal.
            row = AuditRow(**fields, prev_hash=prev_hash, hash=GENESIS, scheme=KEYED,
                           key_id=keys.current_id)
            session.add(row)
            await session.flush()
            row.hash = entry_mac(keys.current, kid=keys.current_id, id=row.id,
                                 prev_hash=prev_hash, **fields)
            await session.flush()
            return _entry(row)

    async def seal(self) -> AuditEntry | None:
        """At start-up: make the newest entry one keyed with the current key.

        After an upgrade the head is a legacy (unkeyed) entry; after a key rotation it is
        keyed with a retired key. Either way a new entry, chained to it, says so: the
        chain check requires the newest run of entries to use the current key.
        """
        keys = self._require_keys()
        async with self._scope.session() as session:
            head = (await session.execute(
                select(AuditRow.id, AuditRow.scheme, AuditRow.key_id)
                .order_by(AuditRow.id.desc()).limit(1))).first()
        if head is None:
            return None
        head_id, scheme, kid = head
        if scheme == LEGACY:
            return await self.append(
                "bridge", "audit.chain.keyed", "audit_log", "ok",
                f"entries up to {head_id} were chained with plain SHA-256 (before "
                f"audit.key); from here on with key {keys.current_id}")
        if kid != keys.current_id:
            return await self.append("bridge", "audit.key.rotated", "audit_log", "ok",
                                     f"key {kid} -> {keys.current_id}")
        return None

    async def head(self) -> AuditEntry | None:
        """The newest entry (what an anchor exports)."""
        entries = await self.list(limit=1)
        return entries[0] if entries else None

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

        An edited entry fails its own MAC; a removed one breaks the `prev_hash` link of
        the entry after it; so do reordered ones. See `bridge.auditchain.ChainCheck`.
        """
        check = ChainCheck(self._require_keys())
        last_id = 0
        # Plain column tuples, not entities: nothing piles up in the session's identity map.
        columns = (
            AuditRow.id, AuditRow.at, AuditRow.actor, AuditRow.action, AuditRow.object,
            AuditRow.result, AuditRow.reason, AuditRow.scheme, AuditRow.key_id,
            AuditRow.prev_hash, AuditRow.hash,
        )
        async with self._scope.session() as session:
            while True:
                stmt = select(*columns).where(AuditRow.id > last_id).order_by(AuditRow.id)
                rows = (await session.execute(stmt.limit(_VERIFY_BATCH))).all()
                if not rows:
                    return check.finish()
                for row in rows:
                    if not check.feed(ChainRow(*row)):
                        return check.finish()
                    last_id = row[0]


def _entry(row: AuditRow) -> AuditEntry:
    return AuditEntry(
        id=row.id, at=row.at, actor=row.actor, action=row.action, object=row.object,
        result=row.result, reason=row.reason, prev_hash=row.prev_hash, hash=row.hash,
        scheme=row.scheme, key_id=row.key_id,
    )
