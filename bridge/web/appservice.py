"""The appservice API the homeserver calls (`/_matrix/app/v1`, `Bearer hs_token`).

Thin: a transaction is stored by bridge.ingest (answered only once stored); users and
aliases are never created on demand (ghost IDs are random).
"""

from __future__ import annotations

from aiohttp import web

from bridge.errors import NotFound
from bridge.ingest import Ingest
from bridge.web.middleware import require_bearer
from bridge.web.state import INGEST

routes = web.RouteTableDef()


def _ingest(request: web.Request) -> Ingest:
    ingest = request.config_dict[INGEST]
    require_bearer(request, ingest.hs_token)
    return ingest


@routes.put("/_matrix/app/v1/transactions/{txn_id}")
async def put_transaction(request: web.Request) -> web.Response:
    ingest = _ingest(request)
    status: int | None = None  # cancelled: the bridge is stopping, or Synapse gave up
    try:
        await ingest.transaction(request.match_info["txn_id"], await request.read())
        status = 200
        return web.json_response({})
    except Exception as exc:
        status = int(getattr(exc, "status", 500))
        raise
    finally:
        if status is not None:
            ingest.transaction_answered(status)


@routes.get("/_matrix/app/v1/users/{user_id}")
async def query_user(request: web.Request) -> web.Response:
    if not await _ingest(request).known_ghost(request.match_info["user_id"]):
        # Ghost IDs are random: the bridge never creates one on demand.
        raise NotFound("no such ghost")
    return web.json_response({})


@routes.get("/_matrix/app/v1/rooms/{alias}")
async def query_alias(request: web.Request) -> web.Response:
    _ingest(request)
    raise NotFound("the bridge creates no rooms on alias lookup")


@routes.post("/_matrix/app/v1/ping")
async def ping(request: web.Request) -> web.Response:
    _ingest(request)
    return web.json_response({})
