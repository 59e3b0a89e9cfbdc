"""Appservice events in the inbound queue, sealed at rest.

A Matrix event waits in the `inbound` table (source "matrix") from its transaction until
the worker has handled it, and the row stays for the dedupe retention after that. Such
events carry what must not lie in clear in a database: message bodies from unencrypted
rooms, kick and ban reasons, display names. So each is stored as AES-256-GCM ciphertext
(`privacy.data_key`), as WhatsApp payloads are, with associated data that names its row
(source and dedupe key): a payload copied into another row does not open there.

Rows queued in clear by earlier versions are still read, and `seal_unsealed` encrypts
them when the bridge starts. A payload that does not open (key gone, row altered) raises
`DecryptError`, which the worker turns into a dead letter: its lane goes on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, Final

from bridge.db import Database, InboundItem, InboundSource
from bridge.privacy import AAD_PAYLOAD, Cipher

log = logging.getLogger(__name__)

SOURCE: Final[InboundSource] = "matrix"
_BATCH: Final = 500


def row_aad(dedupe_key: str) -> bytes:
    """The associated data of a queued Matrix event: its purpose and its row."""
    return AAD_PAYLOAD + f"\0{SOURCE}\0{dedupe_key}".encode()


def is_clear(payload: str) -> bool:
    """A payload queued in clear by a version that did not encrypt Matrix events
    (a JSON object; a sealed one starts with the token's version, `v1.`)."""
    return payload.startswith("{")


def seal_event(cipher: Cipher, dedupe_key: str, event: Mapping[str, Any]) -> str:
    """The payload stored for `event` under `dedupe_key`."""
    return cipher.encrypt_json(event, aad=row_aad(dedupe_key))


def open_event(cipher: Cipher, item: InboundItem) -> dict[str, Any]:
    """The event a queued row holds. DecryptError if it does not open; ValueError if
    what it holds is not an event object."""
    if is_clear(item.payload):
        event = json.loads(item.payload)
    else:
        event = cipher.decrypt_json(item.payload, aad=row_aad(item.dedupe_key))
    if not isinstance(event, dict):
        raise ValueError("queued Matrix payload is not an object")
    return event


async def seal_unsealed(db: Database, cipher: Cipher) -> int:
    """Encrypt every Matrix row still queued in clear, whatever its status; returns how
    many. Runs before the worker starts, so nothing else reads these rows meanwhile; a
    row that changed in between (purged) is left alone."""
    total = 0
    while batch := await db.inbound.unsealed(SOURCE, limit=_BATCH):
        sealed = [(item.id, item.payload,
                   cipher.encrypt(item.payload, aad=row_aad(item.dedupe_key)))
                  for item in batch]
        done = await db.inbound.reseal(sealed)
        total += done
        if done == 0:
            break  # nothing could be written: do not spin on the same rows
    if total:
        log.info("sealed %d Matrix event(s) queued in clear by an earlier version", total)
    return total
