"""Admin API of rooms over WhatsApp (parse, call, answer; scopes as the other routes).

- `POST /admin/v1/rooms/{room_id}/whatsapp-members {citizen, confirm?}` (scope
  `invites`): `citizen` is the portal ghost's user ID or a subscription code; answers
  201 `{member_id, pseudonym, state}` (never a number).
- `GET /admin/v1/rooms/{room_id}/whatsapp-members` (scope `rooms`): pseudonyms and
  states only.
- `POST /admin/v1/rooms/{room_id}/whatsapp-settings {whatsapp_allowed?, relay_media?}`
  (scope `rooms`): the per-room switches; answers them.
- `GET /invite/{token}/whatsapp` (public, no token): join by WhatsApp from an invite
  link (bridge.rooms_wa.join); 404 where not offered.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from bridge.errors import InvalidParam, Unavailable
from bridge.invites.forms import pick_language
from bridge.invites.page import whatsapp_page
from bridge.invites.service import LinkUnusable
from bridge.roomguard import open_room
from bridge.rooms_wa.wiring import WhatsAppRooms
from bridge.texts.whatsapp import default as wa_text
from bridge.types import RoomID
from bridge.web.admin import json_object, verb_route
from bridge.web.admin_auth import actor
from bridge.web.invites import SECURITY_HEADERS
from bridge.web.state import ADMIN, PAGES

# The admin routes are declared verbs (bridge.admin.verbs), on the admin listener.
# On the public listener (bridge.app.make_app): the invite link's "join by WhatsApp".
public_routes = web.RouteTableDef()


def _parts(request: web.Request) -> WhatsAppRooms:
    parts: WhatsAppRooms | None = request.config_dict[ADMIN].wa_rooms
    if parts is None:
        raise Unavailable("WhatsApp is not enabled")
    return parts


def _flag(body: dict[str, Any], key: str) -> bool | None:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise InvalidParam(f"{key}: must be true or false")
    return value


@verb_route("whatsapp-members.add")
async def add_member(request: web.Request) -> web.Response:
    body = await json_object(request)
    citizen = body.get("citizen")
    if not isinstance(citizen, str):
        raise InvalidParam("citizen: must be a string (portal ghost or subscription code)")
    result = await _parts(request).members.invite(
        actor(request), request.match_info["room_id"], citizen,
        confirm=_flag(body, "confirm") is True)
    return web.json_response(result, status=201)


@verb_route("whatsapp-members")
async def list_members(request: web.Request) -> web.Response:
    db = request.config_dict[ADMIN].db
    await open_room(db, request.match_info["room_id"])  # 404 for a room not ours
    members: list[dict[str, Any]] = []
    for state in ("invited", "joined"):
        members += [{"member_id": m.id, "pseudonym": m.display_name, "state": m.state,
                     "user_id": m.ghost_user_id}
                    for m in await db.wa_rooms.in_room(RoomID(request.match_info["room_id"]),
                                                       state)]
    return web.json_response(members)


@verb_route("whatsapp-settings")
async def settings(request: web.Request) -> web.Response:
    body = await json_object(request)
    result = await _parts(request).members.configure(
        actor(request), request.match_info["room_id"], _flag(body, "whatsapp_allowed"),
        _flag(body, "relay_media"))
    return web.json_response(result)


@public_routes.get("/invite/{token}/whatsapp")
async def join_page(request: web.Request) -> web.Response:
    """Draw a one-time code for the link's room and show the wa.me link (no account)."""
    bridge = request.config_dict[PAGES]
    lang = pick_language(request.query.get("lang"), request.headers.get("Accept-Language"))
    parts = bridge.wa_rooms
    try:
        view = await bridge.invites.view(request.match_info["token"])
    except LinkUnusable:
        raise web.HTTPNotFound() from None
    if parts is None or not await parts.join.offered(view.link.room_id):
        raise web.HTTPNotFound()
    code = await parts.join.issue(view.link.room_id, view.link.id)
    body = whatsapp_page(lang=lang, agency=bridge.invites.agency, room=view.room_name,
                         href=parts.join.wa_me(code), number=parts.join.number,
                         message=f"{wa_text.ROOM_JOIN_WORD} {code}")
    return web.Response(text=body, content_type="text/html", charset="utf-8",
                        headers=SECURITY_HEADERS)
