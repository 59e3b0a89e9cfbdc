"""Errors as JSON `{errcode, error}`: one place turns exceptions into answers."""

from __future__ import annotations

import hmac
import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from bridge.errors import BridgeError, Forbidden, Unauthorized
from bridge.logsetup import redact

log = logging.getLogger(__name__)


def json_error(status: int, errcode: str, message: str) -> web.Response:
    return web.json_response({"errcode": errcode, "error": message}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except BridgeError as exc:
        return json_error(exc.status, exc.errcode, redact(exc.message))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return json_error(exc.status, "M_UNRECOGNIZED" if exc.status in (404, 405)
                          else "M_UNKNOWN", exc.reason)
    except Exception:
        # Never a stack trace or a secret to the caller; the log gets the type only
        # plus a redacted traceback.
        # The route's pattern, not the path: paths carry secrets (an invite link's token).
        route = request.match_info.route.resource
        where = route.canonical if route is not None else "(no route)"
        log.exception("unhandled error on %s %s", request.method, where)
        return json_error(500, "M_UNKNOWN", "internal error")


def bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return header[len("Bearer "):]
    return None


def require_bearer(request: web.Request, expected: str) -> None:
    """401 without a token, 403 with a wrong one; constant-time compare."""
    token = bearer(request)
    if token is None:
        raise Unauthorized("missing access token")
    if not hmac.compare_digest(token.encode(), expected.encode()):
        raise Forbidden("invalid access token")
