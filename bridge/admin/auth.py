"""Who calls the admin API, and what they may do (least privilege, ENS op.acc).

Every `/admin/` route declares the one scope it needs with `@requires("scope")`; the
admin sub-app's middleware (bridge.web.admin_auth) authenticates the Bearer token
against `admin.tokens` (and the legacy `admin.token`, which has every scope and is
named `admin`) before the handler runs.
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

from bridge.admin.checks import MXID
from bridge.config import ADMIN_ACTOR_HEADER, ADMIN_SCOPES, LEGACY_TOKEN_NAME, AdminConfig
from bridge.errors import InvalidParam, Unauthorized

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


def on_behalf_of(claimed: str | None) -> str | None:
    """Who a token's holder says acts through it (`X-Civic-Bridge-Actor`), checked."""
    if claimed is None:
        return None
    claimed = claimed.strip()
    if not MXID.match(claimed) or len(claimed) > MAX_ACTOR - 80:
        raise InvalidParam(f"{ACTOR_HEADER}: must be a Matrix user ID like @name:server")
    return claimed
