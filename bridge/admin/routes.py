"""HTTP routes of the admin API (`/admin/v1`, Bearer admin.token)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from aiohttp import web

from bridge.errors import BadRequest, InvalidParam
from bridge.web.middleware import require_bearer
from bridge.web.state import BRIDGE

routes = web.RouteTableDef()
ACTOR = "admin-api"


async def _body(request: web.Request) -> dict[str, Any]:
    require_bearer(request, request.app[BRIDGE].config.admin.token)
    try:
        body = json.loads(await request.read() or b"{}")
    except ValueError:
        raise BadRequest("body is not JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


def _str(body: dict[str, Any], key: str, required: bool = True) -> str | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise InvalidParam(f"{key}: must be a string")
    return value


@routes.post("/admin/v1/rooms")
async def create_room(request: web.Request) -> web.Response:
    body = await _body(request)
    room_id = await request.app[BRIDGE].admin.create_room(
        ACTOR, _str(body, "name") or "", _str(body, "kind") or "", _str(body, "topic", False))
    return web.json_response({"room_id": room_id}, status=201)


@routes.get("/admin/v1/rooms")
async def list_rooms(request: web.Request) -> web.Response:
    require_bearer(request, request.app[BRIDGE].config.admin.token)
    rooms = await request.app[BRIDGE].admin.list_rooms()
    return web.json_response([dataclasses.asdict(r) for r in rooms])


@routes.get("/admin/v1/rooms/{room_id}/members")
async def members(request: web.Request) -> web.Response:
    require_bearer(request, request.app[BRIDGE].config.admin.token)
    return web.json_response(
        await request.app[BRIDGE].admin.members(request.match_info["room_id"]))


@routes.post("/admin/v1/rooms/{room_id}/invite")
async def invite(request: web.Request) -> web.Response:
    body = await _body(request)
    await request.app[BRIDGE].admin.invite(ACTOR, request.match_info["room_id"],
                                           _str(body, "user_id") or "",
                                           _str(body, "reason", False))
    return web.json_response({})
