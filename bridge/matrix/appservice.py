"""The application-service API the homeserver calls (`/_matrix/app/v1`).

A transaction is answered 200 only after its events are durably stored; a repeated
txnId is a no-op (the stored id survives restarts). Synapse retries refused
transactions with backoff, so refusing on a storage error is safe; answering 200
and dropping would lose messages.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web

from bridge.errors import BadRequest, NotFound
from bridge.types import UserID
from bridge.web.middleware import require_bearer
from bridge.web.state import BRIDGE

log = logging.getLogger(__name__)
routes = web.RouteTableDef()


def _auth(request: web.Request) -> None:
    require_bearer(request, request.app[BRIDGE].config.appservice.hs_token)


def parse_transaction(raw: bytes) -> list[dict[str, Any]]:
    """The transaction's room events; BadRequest for anything malformed."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("body is not JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("events", []), list):
        raise BadRequest("expected an object with an `events` list")
    events: list[dict[str, Any]] = body.get("events", [])
    for ev in events:
        if not (isinstance(ev, dict) and isinstance(ev.get("event_id"), str)
                and isinstance(ev.get("room_id"), str) and isinstance(ev.get("type"), str)):
            raise BadRequest("every event needs event_id, room_id and type")
    return events


@routes.put("/_matrix/app/v1/transactions/{txn_id}")
async def put_transaction(request: web.Request) -> web.Response:
    _auth(request)
    bridge = request.app[BRIDGE]
    with bridge.metrics.transaction_latency.time():
        events = parse_transaction(await request.read())
        stored = await bridge.db.transactions.store(request.match_info["txn_id"], events)
    if stored:
        bridge.metrics.transactions.inc()
        bridge.worker.wake("matrix")
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
