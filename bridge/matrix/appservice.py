"""An appservice transaction (`PUT /_matrix/app/v1/transactions/{txnId}`), read.

Sans-I/O: the route is bridge.web.appservice, the storing bridge.ingest. A transaction
is answered 200 only after its events, and the to-device events addressed to the
bridge's devices (bridge.matrix.crypto_feed), are durably stored, each sealed
(bridge.matrix.queued); a repeated txnId is a no-op (the stored id survives restarts).
Synapse retries refused transactions with backoff, so refusing on a storage error is
safe; answering 200 and dropping would lose messages.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bridge.errors import BadRequest
from bridge.jsonbody import MAX_DEPTH, BodyError, clean, load_body
from bridge.matrix.crypto_parts import CryptoParts, parse_crypto, to_device_key


@dataclass(frozen=True)
class Transaction:
    events: list[dict[str, Any]]
    # MSC3202: users whose device lists changed (a hint for our ghosts' devices).
    changed_users: set[str]
    # Receipts, typing, presence (`receive_ephemeral`; MSC2409's unstable key too).
    ephemeral: list[dict[str, Any]] = field(default_factory=list)
    # Events dropped as unusable (nested deeper than any real event): counted, since
    # refusing the transaction would only make Synapse send it again forever.
    ignored: int = 0
    # To-device events, device lists and key counts (MSC2409/MSC3202).
    crypto: CryptoParts = field(default_factory=CryptoParts)


def parse_transaction(raw: bytes) -> Transaction:
    """The transaction's room events; BadRequest for anything malformed.

    Lone surrogates in strings are replaced (bridge.jsonbody), so every event stores.
    """
    try:
        body = load_body(raw, max_depth=_MAX_BODY_DEPTH)
    except BodyError:
        raise BadRequest("body is not JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("events", []), list):
        raise BadRequest("expected an object with an `events` list")
    events: list[dict[str, Any]] = body.get("events", [])
    for ev in events:
        if not (isinstance(ev, dict) and isinstance(ev.get("event_id"), str)
                and isinstance(ev.get("room_id"), str) and isinstance(ev.get("type"), str)):
            raise BadRequest("every event needs event_id, room_id and type")
    usable = [ev for ev in events if _shallow_enough(ev)]
    crypto = parse_crypto(body)
    return Transaction(usable, crypto.changed | crypto.left, ephemeral_events(body),
                       len(events) - len(usable), crypto)


def ephemeral_events(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The ephemeral events, under the stable key or MSC2409's (Synapse may send both
    with the same events: the stable key wins)."""
    for key in ("ephemeral", "de.sorunome.msc2409.ephemeral"):
        events = body.get(key)
        if isinstance(events, list):
            return [e for e in events if isinstance(e, dict)]
    return []


# json.loads itself stops near Python's recursion limit; an event deeper than
# MAX_DEPTH is dropped alone rather than refusing the whole transaction.
_MAX_BODY_DEPTH = 900


def _shallow_enough(event: dict[str, Any]) -> bool:
    try:
        clean(event, MAX_DEPTH)
    except BodyError:
        return False
    return True


def transaction_key(txn_id: str, events: list[dict[str, Any]],
                    to_device: Sequence[Mapping[str, Any]] = ()) -> str:
    """The id under which a transaction is remembered.

    Synapse on SQLite restarts its transaction counter after a restart (it seeds it from
    its table of pending transactions), so a bare txnId can repeat with new events;
    binding the id to its event ids keeps real retries no-ops without dropping those.
    Events themselves are deduplicated by event id as well.
    """
    ids = "\n".join([*(str(ev["event_id"]) for ev in events),
                     *(to_device_key(item) for item in to_device)])
    return f"{txn_id}:{hashlib.sha256(ids.encode()).hexdigest()[:16]}"
