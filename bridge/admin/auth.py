"""Who calls the admin API, and what they may do (least privilege, ENS op.acc).

Every `/admin/` route declares the one scope it needs with `@requires("scope")`; a
middleware authenticates the Bearer token against `admin.tokens` (and the legacy
`admin.token`, which has every scope and is named `admin`) before the handler runs.
A route without a declaration is refused to everyone (fail closed), and
tests/unit/test_admin_scopes.py fails for it, so a route added later cannot slip
through unprotected.

The audit log names the caller as `api:<token name>`; a token may add who is acting
through it with the `X-Civic-Bridge-Actor: @user:domain` header (the CLI's `--as`). The
header is recorded next to the token's name, never instead of it: it is a claim made by
the token's holder, not an authentication.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler

from bridge.admin.common import MXID
from bridge.config import ADMIN_ACTOR_HEADER, ADMIN_SCOPES, LEGACY_TOKEN_NAME, AdminConfig
from bridge.errors import Forbidden, InvalidParam, Unauthorized
from bridge.web.middleware import bearer
from bridge.web.state import BRIDGE

log = logging.getLogger(__name__)

ACTOR_HEADER = ADMIN_ACTOR_HEADER
_SCOPE_ATTR = "__civic_bridge_scope__"
MAX_ACTOR = 255  # the audit log's actor column

F = TypeVar("F", bound=Callable[..., object])


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the token's name, its scopes and who it says acts."""

    name: str
    scopes: frozenset[str]
    on_behalf_of: str | None = None

    @property
    def actor(self) -> str:
        """How the audit log names this caller."""
        base = f"api:{self.name}"
        return f"{base} as {self.on_behalf_of}" if self.on_behalf_of else base


_PRINCIPAL = web.RequestKey("civic_bridge_admin_principal", Principal)


def requires(scope: str) -> Callable[[F], F]:
    """Declare the scope an admin route needs (decorate the handler, under `@routes.x`)."""
    if scope not in ADMIN_SCOPES:
        raise ValueError(f"unknown admin scope {scope!r}")

    def mark(handler: F) -> F:
        setattr(handler, _SCOPE_ATTR, scope)
        return handler

    return mark


def scope_of(handler: object) -> str | None:
    """The scope a route handler declared, or None."""
    scope = getattr(handler, _SCOPE_ATTR, None)
    return scope if isinstance(scope, str) else None


def principals(config: AdminConfig) -> list[tuple[str, str, frozenset[str]]]:
    """(name, token, scopes) of every token the admin API accepts."""
    out = [(LEGACY_TOKEN_NAME, config.token, frozenset(ADMIN_SCOPES))]
    out += [(t.name, t.token, frozenset(t.scopes)) for t in config.tokens]
    return out


def authenticate(config: AdminConfig, token: str | None) -> Principal:
    """The token's principal; 401 without a token or with an unknown one.

    Every configured token is compared, in constant time, whatever matches first: the
    answer's timing says nothing about which token (or how much of one) was right.
    """
    if token is None:
        raise Unauthorized("missing access token")
    # Digests first: equal lengths, so not even a token's length shows in the timing.
    given = hashlib.sha256(token.encode()).digest()
    found: Principal | None = None
    for name, expected, scopes in principals(config):
        if hmac.compare_digest(given, hashlib.sha256(expected.encode()).digest()) \
                and found is None:
            found = Principal(name, scopes)
    if found is None:
        raise Unauthorized("unknown access token")
    return found


def _on_behalf_of(request: web.Request) -> str | None:
    claimed = request.headers.get(ACTOR_HEADER)
    if claimed is None:
        return None
    claimed = claimed.strip()
    if not MXID.match(claimed) or len(claimed) > MAX_ACTOR - 80:
        raise InvalidParam(f"{ACTOR_HEADER}: must be a Matrix user ID like @name:server")
    return claimed


def principal(request: web.Request) -> Principal:
    """The caller of an admin route (set by `admin_auth`)."""
    found = request.get(_PRINCIPAL)
    if not isinstance(found, Principal):  # a route outside /admin/, i.e. a wiring bug
        raise Unauthorized("missing access token")
    return found


def actor(request: web.Request) -> str:
    """The audit log's actor for this admin API call."""
    return principal(request).actor


@web.middleware
async def admin_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate `/admin/` calls and enforce the route's declared scope."""
    declared = scope_of(request.match_info.handler)
    if not request.path.startswith("/admin/") and declared is None:
        return await handler(request)
    bridge = request.app[BRIDGE]
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
    request[_PRINCIPAL] = Principal(who.name, who.scopes, _on_behalf_of(request))
    return await handler(request)
