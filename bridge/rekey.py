"""Re-encrypt stored identifiers and keys with the current `privacy.data_key`.

After rotation (old key moved to `privacy.previous_data_keys`) new writes already use
the new key and old rows still decrypt; this makes the old key removable. Queue
payloads are short-lived (held messages expire after `consent.hold_hours`) and are
left to expire rather than rewritten.
"""

from __future__ import annotations

from bridge.db import Database
from bridge.db.reports import AAD_REPORT_REASON
from bridge.matrix.keystore import room_key_aad
from bridge.privacy import AAD_IDENTIFIER, AAD_WA_ID, Cipher, wamid_aad
from bridge.types import UserID


async def rekey_database(db: Database, cipher: Cipher) -> int:
    """Returns how many values were re-encrypted."""
    count = 0
    for row in await db.citizens.list_identifiers():
        ident, wa_id = row.identifier_ct, row.wa_id_ct
        if cipher.needs_rekey(ident) or (wa_id and cipher.needs_rekey(wa_id)):
            new_wa = cipher.rekey(wa_id, aad=AAD_WA_ID) if wa_id else None
            await db.citizens.update_identifier(row.id, cipher.rekey(ident, aad=AAD_IDENTIFIER),
                                                new_wa)
            count += 1
    for ghost in await db.ghosts.all():
        ct = ghost.cross_signing_ct
        if ct and cipher.needs_rekey(ct):
            aad = ghost.user_id.encode()
            await db.ghosts.set_cross_signing(UserID(ghost.user_id), cipher.rekey(ct, aad=aad))
            count += 1
    for key in await db.room_keys.sealed():
        if cipher.needs_rekey(key.session_key_ct):
            aad = room_key_aad(key.owner, key.session_id, key.message_index)
            await db.room_keys.reseal(key.id, cipher.rekey(key.session_key_ct, aad=aad))
            count += 1
    for link_id, wamid_hash, wamid_ct in await db.messages.sealed():
        if wamid_ct and cipher.needs_rekey(wamid_ct):
            await db.messages.reseal(link_id, cipher.rekey(wamid_ct, aad=wamid_aad(wamid_hash)))
            count += 1
    for report_id, reason_ct in await db.reports.sealed():
        if cipher.needs_rekey(reason_ct):
            await db.reports.reseal(report_id, cipher.rekey(reason_ct, aad=AAD_REPORT_REASON))
            count += 1
    return count
