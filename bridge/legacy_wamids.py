"""One-off: the wamids a database stored in clear before revision 0010 become keyed.

Revision 0010 renamed the wamid columns in place (a migration has no keys). At every
start (`build_bridge`) and after `civic-bridge migrate`, until it has once looked at
every row, this pass rewrites what is not keyed yet: message map entries get their
keyed hash and ciphertext; outbox and notice log wamids, WhatsApp dedupe keys
(`msg:`/`status:`), system-reply keys (`optin:` …) and consent evidence get the keyed
hash. Then it records in `kv` that it is done, and later starts skip it. Idempotent:
values already keyed are left alone, and each rewrite is guarded by the old value.

On SQLite the write-ahead log is then truncated (the file keeps no old copies: it runs
with secure_delete). PostgreSQL keeps old row versions until (auto)vacuum reuses
their space; `VACUUM FULL` once after the upgrade removes them at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

from bridge.db import Database
from bridge.db.legacy import LEGACY_COLUMNS, LegacyColumn
from bridge.privacy import Privacy, is_keyed_hash
from bridge.whatsapp.consent import EVIDENCE_PREFIX, message_evidence
from bridge.whatsapp.outbox import REPLY_KINDS
from bridge.whatsapp.webhook_parse import dedupe_key

log = logging.getLogger(__name__)

DONE_KEY = "legacy_wamids:done"  # revision 0010 deletes it, so an upgrade runs the pass
_BOUNDED = "sha256:"  # an overlong old dedupe key, hashed (unkeyed) before 0010: no wamid


def _new_value(privacy: Privacy, column: LegacyColumn, value: str) -> str | None:
    """What `value` becomes, or None if it holds no clear wamid."""
    index = privacy.index
    if column in ("message_map", "outbox_wamid", "notices_wamid"):
        return None if is_keyed_hash(value) else index.wamid(value)
    if column == "consent_evidence":
        return None if value.startswith(EVIDENCE_PREFIX) else \
            message_evidence(index.wamid(value))
    kind, _, rest = value.partition(":")
    if column == "outbox_key":
        return f"{kind}:{index.wamid(rest)}" if kind in REPLY_KINDS and rest and \
            not is_keyed_hash(rest) else None
    if rest.startswith(_BOUNDED):
        return None
    if kind == "msg":
        return None if is_keyed_hash(rest) else dedupe_key(index, rest)
    if kind == "status":
        wamid, _, status = rest.rpartition(":")
        return None if not wamid or is_keyed_hash(wamid) else dedupe_key(index, wamid, status)
    return None


async def key_legacy_wamids(db: Database, privacy: Privacy,
                            now: Callable[[], datetime] = lambda: datetime.now(UTC)
                            ) -> dict[str, int]:
    """Run the pass unless it is done; {column: values rewritten} (logged if any)."""
    if await db.kv.get(DONE_KEY) is not None:
        return {}
    counts: dict[str, int] = {}
    for column in LEGACY_COLUMNS:
        counts[column] = await _column(db, privacy, column)
    if any(counts.values()):
        await db.drop_old_pages()
        log.info("wamids stored in clear before revision 0010 are now keyed: %s",
                 ", ".join(f"{c} {n}" for c, n in counts.items() if n))
    await db.kv.set(DONE_KEY, now().isoformat())
    return counts


async def _column(db: Database, privacy: Privacy, column: LegacyColumn) -> int:
    rewritten = 0
    after = 0
    while batch := await db.legacy.batch(column, after):
        for row_id, value in batch:
            after = row_id
            new = _new_value(privacy, column, value)
            if new is None:
                continue
            sealed = None
            if column == "message_map":  # also kept sealed: it goes back to Graph
                new, sealed = privacy.seal_wamid(value)
            if await db.legacy.rewrite(column, row_id, value, new, sealed) != "gone":
                rewritten += 1
    return rewritten
