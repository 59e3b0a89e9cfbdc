"""The admin API's authentication at the edge: the sub-app's middleware and who calls.

The rules (tokens, scopes, the actor header) are bridge.admin.auth; this module applies
them to requests: `admin_auth` authenticates every call of the `/admin/v1` sub-app
(bridge.web.admin) and enforces the scope its route declared with `@requires`.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from bridge.admin.auth import ACTOR_HEADER, Principal, authenticate, on_behalf_of, scope_of
from bridge.errors import Forbidden, Unauthorized
from bridge.web.middleware import bearer
from bridge.web.state import ADMIN

log = logging.getLogger(__name__)
_PRINCIPAL = web.RequestKey("civic_bridge_admin_principal", Principal)


def principal(request: web.Request) -> Principal:
    """The caller of an admin route (set by `admin_auth`)."""
    found = request.get(_PRINCIPAL)
    if not isinstance(found, Principal):  # a route outside the admin sub-app: a wiring bug
        raise Unauthorized("missing access token")
    return found


def actor(request: web.Request) -> str:
    """The audit log's actor for this admin API call."""
    return principal(request).actor


@web.middleware
async def admin_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate every call of the admin sub-app and enforce the route's declared
    scope (an unknown path is authenticated too, then answers 404)."""
    declared = scope_of(request.match_info.handler)
    bridge = request.config_dict[ADMIN]
    route = request.match_info.route.resource.canonical \
        if request.match_info.route.resource else request.path
    try:
        who = authenticate(bridge.config.admin, bearer(request))
    except Unauthorized as exc:
        # Never the token itself; the route, so a probe shows in the log (ENS op.exp.8).
        bridge.metrics.admin_refusals.labels("unauthenticated").inc()
        log.warning("admin API: %s %s refused: %s", request.method, route, exc.message)
        raise
    if request.match_info.http_exception is None:  # 404/405 answer as they are
        scope = declared
        if scope is None:
            log.error("admin route %s %s declares no scope: refused to every token",
                      request.method, route)
            raise Forbidden("this route declares no scope; refused")
        if scope not in who.scopes:
            # A known caller reaching beyond its role: audited under its name.
            bridge.metrics.admin_refusals.labels("forbidden").inc()
            log.warning("admin API: %s %s refused to token %s (lacks %s)",
                        request.method, route, who.name, scope)
            await bridge.db.audit.append(who.actor,
                                         "admin.refused", f"{request.method} {route}"[:255],
                                         "forbidden", f"lacks the scope {scope}")
            raise Forbidden(f"this token lacks the scope {scope}")
    request[_PRINCIPAL] = Principal(who.name, who.scopes,
                                    on_behalf_of(request.headers.get(ACTOR_HEADER)))
    return await handler(request)
