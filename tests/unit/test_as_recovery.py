"""When the bridge pings Synapse to end its hold on the appservice (MSC2659)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter

import bridge.matrix.as_recovery as as_recovery
from bridge.matrix.api import MatrixError
from bridge.matrix.as_recovery import FIRST_GAP_SECONDS, MAX_GAP_SECONDS, AppserviceRecovery


class _API:
    def __init__(self, fail: list[MatrixError | None]) -> None:
        self.fail = fail
        self.calls: list[str] = []

    async def ping_appservice(self, appservice_id: str) -> None:
        self.calls.append(appservice_id)
        error = self.fail.pop(0) if self.fail else None
        if error is not None:
            raise error


def _recovery(fail: list[MatrixError | None] | None = None) -> tuple[AppserviceRecovery, _API,
                                                                     Counter]:
    api = _API(fail or [])
    pings = Counter("pings", "p", ["result"], registry=CollectorRegistry())
    return AppserviceRecovery(api, "civic-bridge", pings), api, pings  # type: ignore[arg-type]


def _gap(ping: Any) -> float:
    """The delay a scheduled ping waits (read from the coroutine's frame)."""
    assert ping is not None
    delay = float(ping.cr_frame.f_locals["delay"])
    ping.close()
    return delay


def test_successful_transactions_ping_nothing() -> None:
    recovery, _, _ = _recovery()
    for _ in range(3):
        assert recovery.after_transaction(failed=False) is None


def test_an_error_answer_pings_once_at_a_time_and_backs_off_until_a_success() -> None:
    recovery, _, _ = _recovery()
    first = recovery.after_transaction(failed=True)
    assert _gap(first) == FIRST_GAP_SECONDS
    recovery._scheduled = False  # the ping ran
    assert _gap(recovery.after_transaction(failed=True)) == 2 * FIRST_GAP_SECONDS
    assert recovery.after_transaction(failed=True) is None  # one already waits
    recovery._scheduled = False
    for _ in range(10):
        ping = recovery.after_transaction(failed=True)
        recovery._scheduled = False
        last = _gap(ping)
    assert last == MAX_GAP_SECONDS
    assert recovery.after_transaction(failed=False) is None
    assert _gap(recovery.after_transaction(failed=True)) == FIRST_GAP_SECONDS


async def test_ping_retries_server_errors_and_stops_at_client_errors(monkeypatch: Any) -> None:
    async def no_sleep(_seconds: float) -> None:
        return None

    monkeypatch.setattr(as_recovery.asyncio, "sleep", no_sleep)
    recovery, api, pings = _recovery([MatrixError(502, "M_UNKNOWN", ""), None])
    assert await recovery.ping() is True and len(api.calls) == 2
    assert pings.labels("ok")._value.get() == 1 and pings.labels("failed")._value.get() == 1
    recovery, api, _ = _recovery([MatrixError(400, "M_AS_PING_URL_NOT_SET", "")])
    assert await recovery.ping() is False and len(api.calls) == 1
    recovery, api, _ = _recovery([MatrixError(504, "M_UNKNOWN", "")] * 5)
    assert await recovery.ping(attempts=5) is False and len(api.calls) == 5
