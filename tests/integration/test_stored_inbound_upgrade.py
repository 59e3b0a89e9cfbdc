"""WhatsApp rows an earlier version queued (the webhook's value for one item) are
rewritten to hold the parsed item before the worker starts, on SQLite and PostgreSQL:
every unfinished row (pending, held, a dead letter), none that is finished, none that
does not decrypt; a second run finds nothing. The end-to-end path (a restart relays such
a row) is test_whatsapp.py::test_stored_items_are_parsed_messages_and_old_rows_still_run.
"""

from __future__ import annotations

import os
from typing import Any

from bridge.db import Database
from bridge.ingest import normalise_legacy_rows
from bridge.privacy import AAD_PAYLOAD, Cipher, KeyedIndex, Privacy
from bridge.whatsapp import stored
from bridge.whatsapp.webhook_parse import InboundMessage
from tests.unit.test_webhook_parse import PHONE_ID, msg, value

PRIVACY = Privacy(cipher=Cipher(os.urandom(32)), index=KeyedIndex(os.urandom(32)))


def old_value(n: int) -> dict[str, Any]:
    return value([msg("text", {"body": f"mensaje {n}"}, id=f"wamid.OLD{n}")])


async def test_unfinished_old_rows_are_rewritten_once(db: Database) -> None:
    seal = PRIVACY.cipher.encrypt_json
    ids = {}
    for n, status in enumerate(("pending", "held", "dead", "done")):
        ids[status] = await db.inbound.enqueue(
            "whatsapp", f"msg:{n}", seal(old_value(n), aad=AAD_PAYLOAD), lane="citizen:x",
            status=status)  # type: ignore[arg-type]
    foreign = Cipher(os.urandom(32)).encrypt_json(old_value(9), aad=AAD_PAYLOAD)
    ids["foreign"] = await db.inbound.enqueue("whatsapp", "msg:9", foreign, lane="citizen:x")
    matrix = seal({"type": "m.room.message"}, aad=AAD_PAYLOAD)
    await db.inbound.enqueue("matrix", "$e", matrix, lane="!r")

    assert await normalise_legacy_rows(db, PRIVACY, PHONE_ID) == 3
    assert await normalise_legacy_rows(db, PRIVACY, PHONE_ID) == 0
    for n, status in enumerate(("pending", "held", "dead")):
        item = await db.inbound.get(int(ids[status] or 0))
        assert item is not None and item.status == status
        value_now = PRIVACY.cipher.decrypt_json(item.payload, aad=AAD_PAYLOAD)
        assert not stored.is_legacy(value_now)
        parsed = stored.load(value_now, PHONE_ID)
        assert isinstance(parsed, InboundMessage) and parsed.text == f"mensaje {n}"
    done = await db.inbound.get(int(ids["done"] or 0))
    assert done is not None
    assert stored.is_legacy(PRIVACY.cipher.decrypt_json(done.payload, aad=AAD_PAYLOAD))
    left = await db.inbound.get(int(ids["foreign"] or 0))
    assert left is not None and left.payload == foreign  # left for the worker to set aside
