"""The retry policy: which failures are transient, and the backoff schedule."""

from __future__ import annotations

import json

import aiohttp
import asyncpg
import nio
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import exc as sa_exc

from bridge.errors import NotFound, Unavailable
from bridge.matrix.api import MatrixError, nio_failure
from bridge.matrix.relay import UndecryptableEvent
from bridge.privacy import DecryptError
from bridge.retry import BACKOFF_CAP, DEAD_REASONS, backoff, is_transient, reason_of
from bridge.whatsapp.graph import GraphError, MediaIntegrityError


def _graph(status: int | None, code: int | None, retryable: bool) -> GraphError:
    return GraphError(status, code, None, "x", retryable=retryable)


TRANSIENT = [
    aiohttp.ClientConnectionError("connection refused"),
    aiohttp.ServerDisconnectedError(),
    aiohttp.ClientPayloadError("cut"),
    ConnectionRefusedError(),
    ConnectionResetError(),
    TimeoutError(),
    OSError("network unreachable"),
    MatrixError(502, "M_UNKNOWN", "bad gateway"),
    MatrixError(503, "M_UNKNOWN", ""),
    MatrixError(429, "M_LIMIT_EXCEEDED", "slow down"),
    MatrixError(400, "M_LIMIT_EXCEEDED", "old servers"),
    _graph(429, 4, True),
    _graph(500, 1, True),
    _graph(None, None, True),  # network error talking to Graph
    _graph(400, 130429, True),
    sa_exc.OperationalError("SELECT 1", {}, Exception("database is locked")),
    sa_exc.InterfaceError("SELECT 1", {}, Exception("connection closed")),
    sa_exc.DBAPIError("SELECT 1", {}, Exception("gone"), connection_invalidated=True),
    asyncpg.CannotConnectNowError("the database system is starting up"),
    asyncpg.exceptions.AdminShutdownError("terminating connection"),
    asyncpg.exceptions.DeadlockDetectedError("deadlock detected"),
    asyncpg.exceptions.SerializationError("could not serialize access"),
    Unavailable("not ready"),
]
PERMANENT = [
    (DecryptError("token failed authentication"), "undecryptable"),
    (UndecryptableEvent("room key not received"), "undecryptable"),
    (MatrixError(403, "M_FORBIDDEN", "not in room"), "matrix_refused"),
    (MatrixError(400, "M_BAD_JSON", ""), "matrix_refused"),
    (MatrixError(404, "M_NOT_FOUND", ""), "matrix_refused"),
    (_graph(400, 131026, False), "graph_refused"),
    (_graph(400, 100, False), "graph_refused"),
    (_graph(401, 190, False), "graph_refused"),
    (MediaIntegrityError(), "graph_refused"),
    (KeyError("messages"), "bad_payload"),
    (ValueError("unknown outbox payload type"), "bad_payload"),
    (TypeError("NoneType is not subscriptable"), "bad_payload"),
    (json.JSONDecodeError("x", "{", 0), "bad_payload"),
    (sa_exc.IntegrityError("INSERT", {}, Exception("unique")), "internal"),
    (NotFound("no such row"), "internal"),
    (RuntimeError("a bug"), "internal"),
]


@pytest.mark.parametrize("exc", TRANSIENT, ids=lambda e: type(e).__name__)
def test_transient_failures_are_retried(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize(("exc", "reason"), PERMANENT, ids=lambda e: str(e)[:30])
def test_permanent_failures_have_a_reason_class(exc: BaseException, reason: str) -> None:
    assert not is_transient(exc)
    assert reason_of(exc) == reason
    assert reason in DEAD_REASONS


def test_a_wrapper_of_a_transient_failure_is_transient() -> None:
    def wrapped() -> None:
        try:
            raise ConnectionResetError()
        except ConnectionResetError as exc:
            raise RuntimeError("relay failed") from exc

    with pytest.raises(RuntimeError) as caught:
        wrapped()
    assert is_transient(caught.value)
    assert not is_transient(RuntimeError("relay failed"))


def test_a_cause_cycle_does_not_loop() -> None:
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__cause__, b.__cause__ = b, a
    assert not is_transient(a)


def test_backoff_doubles_from_the_base_without_jitter() -> None:
    assert [backoff(n, jitter=lambda: 1.0) for n in range(1, 6)] == [2, 4, 8, 16, 32]


def test_backoff_is_capped_and_never_gives_up() -> None:
    for attempts in (9, 10, 100, 10_000, 10**9):
        assert backoff(attempts, jitter=lambda: 1.0) == BACKOFF_CAP
        assert backoff(attempts, jitter=lambda: 0.5) == BACKOFF_CAP / 2


@given(st.integers(min_value=-5, max_value=10**6))
def test_backoff_stays_within_half_and_all_of_its_step(attempts: int) -> None:
    step = min(BACKOFF_CAP, 2.0 * 2.0 ** (max(attempts, 1) - 1)) if attempts < 40 else BACKOFF_CAP
    delay = backoff(attempts)
    assert step / 2 <= delay <= step


def test_backoff_is_jittered() -> None:
    assert len({backoff(20) for _ in range(50)}) > 10


class _Transport:
    """What nio keeps of the HTTP answer (aiohttp's ClientResponse): its status."""

    def __init__(self, status: int) -> None:
        self.status = status


@pytest.mark.parametrize(("status", "errcode", "transient"), [
    (502, None, True),  # a reverse proxy while Synapse restarts: no Matrix body
    (503, "M_UNKNOWN", True),
    (403, "M_FORBIDDEN", False),
    (400, "M_UNKNOWN_TOKEN", False),
])
def test_a_nio_error_answer_is_classified_by_its_http_status(
        status: int, errcode: str | None, transient: bool) -> None:
    resp = nio.RoomSendError(message="x", status_code=errcode)
    resp.transport_response = _Transport(status)  # type: ignore[assignment]
    failure = nio_failure(resp, "send")
    assert (failure.status, failure.errcode) == (status, errcode or "M_UNKNOWN")
    assert is_transient(failure) is transient
    assert "x" not in str(failure).split(":")[-1]  # the server's text is not kept


def test_a_nio_error_without_an_answer_is_not_retried_blindly() -> None:
    failure = nio_failure(nio.ShareGroupSessionError(message="x"), "sharing the room key")
    assert failure.status == 0 and not is_transient(failure)
    assert reason_of(failure) == "matrix_refused"
