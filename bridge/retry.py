"""How the queues react to a failure: retry it (transient) or set it aside (permanent).

One place decides, for the inbound worker and the outbox alike (and for anyone else who
must tell a passing fault from one that will never heal):

- `is_transient(exc)`: network errors, timeouts, Synapse or Graph 5xx and 429, Graph's
  throughput codes, database connection errors. They are retried with `backoff` for as
  long as it takes: an outage of hours loses nothing.
- everything else is permanent: retrying the same payload cannot help (it no longer
  decrypts or its room key never came, it is malformed, Synapse or Graph refused it
  with a 4xx, or the code has a bug). Such an item becomes a dead letter
  (`bridge.deadletters`), with the reason class `reason_of(exc)`.

A wrapper keeps the verdict of what it wraps: an exception raised `from` a transient
one is transient.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from typing import Final, Literal, get_args

import aiohttp
import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import exc as sa_exc

from bridge.errors import Unavailable
from bridge.matrix.api import MatrixError
from bridge.matrix.relay import UndecryptableEvent
from bridge.privacy import DecryptError
from bridge.whatsapp.graph import GraphError

# Why an item was set aside; also the `reason` label of the dead-letter metric.
DeadReason = Literal["undecryptable", "bad_payload", "matrix_refused", "graph_refused",
                     "internal"]
DEAD_REASONS: Final[tuple[str, ...]] = get_args(DeadReason)
BACKOFF_BASE: Final = 2.0  # seconds before the first retry (before jitter)
BACKOFF_CAP: Final = 300.0  # never wait longer than 5 minutes between attempts

_NETWORK: Final = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError,
                   ConnectionError, TimeoutError, OSError)
_DATABASE: Final = (sa_exc.OperationalError, sa_exc.InterfaceError,
                    sa_exc.DisconnectionError, sa_exc.TimeoutError,
                    asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError,
                    asyncpg.TooManyConnectionsError, asyncpg.exceptions.AdminShutdownError,
                    asyncpg.exceptions.CrashShutdownError,
                    # Two transactions in each other's way: one is chosen to fail and
                    # succeeds when run again.
                    asyncpg.exceptions.DeadlockDetectedError,
                    asyncpg.exceptions.SerializationError)
_PAYLOAD: Final = (KeyError, IndexError, TypeError, ValueError, json.JSONDecodeError,
                   UnicodeError)


def _transient_status(status: int | None) -> bool:
    return status is not None and (status == 429 or status == 408 or status >= 500)


def _one_is_transient(exc: BaseException) -> bool:
    if isinstance(exc, GraphError):
        return exc.retryable
    if isinstance(exc, MatrixError):
        return _transient_status(exc.status) or exc.errcode == "M_LIMIT_EXCEEDED"
    if isinstance(exc, aiohttp.ClientResponseError):
        return _transient_status(exc.status)
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, (*_NETWORK, *_DATABASE, Unavailable))


def is_transient(exc: BaseException) -> bool:
    """True if the same attempt may succeed later without anyone changing anything."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if _one_is_transient(current):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def reason_of(exc: BaseException) -> DeadReason:
    """The reason class of a permanent failure (a fixed set: safe in metrics and lists)."""
    if isinstance(exc, (DecryptError, UndecryptableEvent)):
        # A stored payload that no longer opens, or a staff event whose room key did
        # not arrive within the bot's wait: retrying blindly would hold its lane for
        # ever; an admin retries it once the key is there.
        return "undecryptable"
    if isinstance(exc, GraphError):
        return "graph_refused"
    if isinstance(exc, MatrixError):
        return "matrix_refused"
    if isinstance(exc, _PAYLOAD):
        return "bad_payload"
    return "internal"


def error_label(exc: BaseException) -> str:
    """A short label of a failure, safe to store, log and list (statuses and codes,
    never text from a payload): "MatrixError 403 M_FORBIDDEN", "GraphError 400 131026",
    else the exception type."""
    name = type(exc).__name__
    if isinstance(exc, MatrixError):
        return f"{name} {exc.status} {exc.errcode}"[:120]
    if isinstance(exc, GraphError):
        return f"{name} {exc.status} {exc.code}"
    return name


def _jitter() -> float:
    """A factor in [0.5, 1.0]: retries of many items spread out instead of stampeding
    ("equal jitter": at least half the delay, so a retry is never immediate)."""
    return 0.5 + secrets.randbelow(500_001) / 1_000_000


def backoff(attempts: int, *, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP,
            jitter: Callable[[], float] = _jitter) -> float:
    """Seconds to wait after the `attempts`-th failure in a row: base·2^(attempts-1),
    capped at `cap`, times the jitter factor. It never gives up: attempt 1,000 waits
    about as long as attempt 10."""
    exponent = min(max(attempts, 1) - 1, 32)  # 2^32·base is far past any cap
    return min(cap, base * 2.0**exponent) * jitter()
