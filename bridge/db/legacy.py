"""Rows written before revision 0010 that may still hold a wamid in clear.

`bridge.legacy_wamids` reads each column below in batches (by id) and rewrites the
values that are not keyed yet. Every rewrite is guarded by the old value, so two
processes starting together (a standby) never rewrite a row twice.
"""

from __future__ import annotations

from typing import Any, Literal

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import InstrumentedAttribute

from bridge.db.models import ConsentRecordRow, InboundRow, MessageMapRow, NoticeRow, OutboxRow
from bridge.db.scope import Scope, rowcount

LegacyColumn = Literal["message_map", "outbox_wamid", "notices_wamid", "inbound_key",
                       "outbox_key", "consent_evidence"]
Rewrite = Literal["rewritten", "gone", "duplicate"]

# (id column, value column, which rows can hold a wamid at all)
_COLUMNS: dict[LegacyColumn, tuple[InstrumentedAttribute[int], InstrumentedAttribute[Any],
                                   tuple[Any, ...]]] = {
    "message_map": (MessageMapRow.id, MessageMapRow.wamid_hash, ()),
    "outbox_wamid": (OutboxRow.id, OutboxRow.wamid_hash, (OutboxRow.wamid_hash.is_not(None),)),
    "notices_wamid": (NoticeRow.id, NoticeRow.wamid_hash, (NoticeRow.wamid_hash.is_not(None),)),
    "inbound_key": (InboundRow.id, InboundRow.dedupe_key, (InboundRow.source == "whatsapp",)),
    "outbox_key": (OutboxRow.id, OutboxRow.idempotency_key, ()),
    # A citizen's own message is the evidence of a change made over WhatsApp.
    "consent_evidence": (ConsentRecordRow.id, ConsentRecordRow.evidence,
                         (ConsentRecordRow.channel == "whatsapp",
                          ConsentRecordRow.evidence.is_not(None))),
}
LEGACY_COLUMNS: tuple[LegacyColumn, ...] = tuple(_COLUMNS)


class LegacyRepo:
    """Batches of (id, value) and guarded rewrites, for one column at a time."""

    def __init__(self, scope: Scope) -> None:
        self._scope = scope

    async def batch(self, column: LegacyColumn, after_id: int, limit: int = 500
                    ) -> list[tuple[int, str]]:
        """(id, value) of the next `limit` rows with an id above `after_id`, by id."""
        id_col, value_col, where = _COLUMNS[column]
        stmt = (select(id_col, value_col).where(id_col > after_id, *where)
                .order_by(id_col).limit(limit))
        async with self._scope.session() as session:
            return [(int(i), str(v)) for i, v in (await session.execute(stmt)).all()]

    async def rewrite(self, column: LegacyColumn, row_id: int, old: str, new: str,
                      wamid_ct: str | None = None) -> Rewrite:
        """Set the value (and, for the message map, the ciphertext) if it is still `old`.

        "gone": the row changed or went meanwhile. "duplicate": a row with the new value
        exists already (the same message stored again since), so this one is deleted."""
        id_col, value_col, _ = _COLUMNS[column]
        table = id_col.class_
        values: dict[str, Any] = {value_col.key: new}
        if wamid_ct is not None:
            values["wamid_ct"] = wamid_ct
        guard = (id_col == row_id, value_col == old)
        try:
            async with self._scope.session() as session:
                done = rowcount(await session.execute(update(table).where(*guard)
                                                      .values(**values)))
        except IntegrityError:
            async with self._scope.session() as session:
                await session.execute(delete(table).where(*guard))
            return "duplicate"
        return "rewritten" if done else "gone"
