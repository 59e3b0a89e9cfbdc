"""Audited homeserver calls: every admin action that reaches the homeserver is written to
the audit log with actor, object, action, result (`ok` or `error <errcode>`) and reason,
whether it worked or not."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from bridge.db import Database
from bridge.errors import BridgeError
from bridge.matrix.api import MatrixError

T = TypeVar("T")


class HomeserverRefused(BridgeError):
    """Synapse answered the action with an error; its errcode is passed on."""

    status = 400
    errcode = "CB_HOMESERVER_REFUSED"

    def __init__(self, what: str, exc: MatrixError) -> None:
        super().__init__(f"homeserver refused the {what}: {exc.errcode}")
        if exc.status >= 500:
            self.status = 502
        self.matrix_errcode = exc.errcode


async def audited(db: Database, actor: str, action: str, obj: str, why: str | None,
                  call: Callable[[], Awaitable[T]], what: str | None = None) -> T:
    """Run a homeserver call and audit its outcome either way."""
    try:
        result = await call()
    except MatrixError as exc:
        await db.audit.append(actor, action, obj, f"error {exc.errcode}", why)
        raise HomeserverRefused(what or action, exc) from None
    await db.audit.append(actor, action, obj, "ok", why)
    return result
