"""The application-service API the homeserver calls (`/_matrix/app/v1`).

A transaction is answered 200 only after its events, and the to-device events addressed
to the bridge's devices (bridge.matrix.crypto_feed), are durably stored, each sealed
(bridge.matrix.queued); a repeated txnId is a no-op (the stored id survives restarts).
Synapse retries refused transactions with backoff, so refusing on a storage error is
safe; answering 200 and dropping would lose messages.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from aiohttp import web

from bridge.db.queues import event_lane
from bridge.errors import BadRequest, NotFound
from bridge.jsonbody import MAX_DEPTH, BodyError, clean, load_body
from bridge.matrix.as_recovery import watched
from bridge.matrix.crypto_parts import CryptoParts, parse_crypto, to_device_key, wrap
from bridge.matrix.queued import seal_event
from bridge.types import UserID
from bridge.web.middleware import require_bearer
from bridge.web.state import BRIDGE

log = logging.getLogger(__name__)
routes = web.RouteTableDef()


def _auth(request: web.Request) -> None:
    require_bearer(request, request.app[BRIDGE].config.appservice.hs_token)


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


@routes.put("/_matrix/app/v1/transactions/{txn_id}")
@watched  # an error answer makes the bridge ping Synapse (bridge.matrix.as_recovery)
async def put_transaction(request: web.Request) -> web.Response:
    _auth(request)
    bridge = request.app[BRIDGE]
    with bridge.metrics.transaction_latency.time():
        txn = parse_transaction(await request.read())
        if txn.ignored:
            log.warning("transaction: %d event(s) nested too deeply, ignored", txn.ignored)
            bridge.metrics.ignored_parts.labels("matrix").inc(txn.ignored)
        # Our own messages come back as echoes; only membership matters from those.
        events = [e for e in txn.events if e["type"] == "m.room.member"
                  or not bridge.ghosts.is_ours(str(e.get("sender", "")))]
        to_device, dropped = bridge.crypto.observe(txn.crypto)
        stored = False
        if events or to_device:  # nothing to process, nothing to deduplicate: no write
            with bridge.db.urgent():
                stored = await bridge.db.transactions.store(
                    transaction_key(request.match_info["txn_id"], txn.events, to_device),
                    [*events, *(wrap(item) for item in to_device)],
                    seal=partial(seal_event, bridge.privacy.cipher))
        if dropped and (stored or not (events or to_device)):
            bridge.crypto.count_dropped(dropped)
    bridge.crypto.apply(txn.crypto)
    if txn.ephemeral and bridge.receipts is not None:
        # Not stored: a lost read tick is no lost message; don't hold the transaction.
        bridge.spawn(bridge.receipts.handle(txn.ephemeral))
    if stored:
        bridge.metrics.transactions.inc()
        bridge.worker.wake("matrix", *{event_lane(e) for e in events},
                           *{event_lane(wrap(item)) for item in to_device})
    return web.json_response({})


@routes.get("/_matrix/app/v1/users/{user_id}")
async def query_user(request: web.Request) -> web.Response:
    _auth(request)
    ghost = await request.app[BRIDGE].db.ghosts.get(UserID(request.match_info["user_id"]))
    if ghost is None:
        # Ghost IDs are random: the bridge never creates one on demand.
        raise NotFound("no such ghost")
    return web.json_response({})


@routes.get("/_matrix/app/v1/rooms/{alias}")
async def query_alias(request: web.Request) -> web.Response:
    _auth(request)
    raise NotFound("the bridge creates no rooms on alias lookup")


@routes.post("/_matrix/app/v1/ping")
async def ping(request: web.Request) -> web.Response:
    _auth(request)
    return web.json_response({})
