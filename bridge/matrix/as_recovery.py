"""Ending Synapse's hold on the appservice at once (MSC2659 ping).

When a transaction fails (an error answer, a timeout, a refused connection), Synapse
1.163 marks the appservice DOWN and retries its stored transactions with a backoff of
2 s doubling up to 512 s. Until one retry succeeds it creates transactions only for
room events, and neither those nor the retried ones carry to-device events, key
counts or device-list changes (`synapse/appservice/scheduler.py`
`_TransactionController.send`, `storage/databases/main/appservice.py`
`get_oldest_unsent_txn`): room keys sent meanwhile never come in a transaction. A
successful `POST /_matrix/client/v1/appservice/{id}/ping` makes Synapse retry at once
(`force_retry`), which ends the hold.

So the bridge pings whenever Synapse may hold it DOWN: at start (also after a standby
became the leader) and after it answered a transaction with an error. Each ping
retries a few times, then gives up: Synapse's own backoff still delivers later.

Not on a transaction id that skips ahead: Synapse numbers the transactions of all its
appservices from one sequence, so ids skip whenever another appservice got one, and
a transaction it created is retried under its own id until delivered (ids are not
spent on what it drops), so a skip says nothing about the bridge being held DOWN.

Consecutive error answers space their pings out (1 s doubling to 60 s) so that a
bridge that keeps failing does not make Synapse retry in a tight loop. What was
dropped meanwhile is fetched separately (bridge.matrix.catchup).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, Final

import aiohttp
from prometheus_client import Counter

from bridge.matrix.api import MatrixAPI, MatrixError

log = logging.getLogger(__name__)

PING_ATTEMPTS: Final = 5
# After an error answer, Synapse marks the appservice DOWN once our answer is in: a
# ping before that finds nothing to retry.
FIRST_GAP_SECONDS: Final = 1.0
MAX_GAP_SECONDS: Final = 60.0


class AppserviceRecovery:
    """Pings Synapse (MSC2659) when it may hold the appservice DOWN."""

    def __init__(self, api: MatrixAPI, appservice_id: str, pings: Counter) -> None:
        self._api = api
        self._id = appservice_id
        self._pings = pings
        self._gap = FIRST_GAP_SECONDS
        self._scheduled = False

    async def ping(self, attempts: int = PING_ATTEMPTS) -> bool:
        """Ask Synapse to ping us; True once it did (it then retries what it holds)."""
        for attempt in range(attempts):
            try:
                await self._api.ping_appservice(self._id)
                self._pings.labels("ok").inc()
                return True
            except (MatrixError, aiohttp.ClientError, OSError) as exc:
                # 502/504: e.g. the Service does not route to this pod yet. Not fatal:
                # Synapse retries on its own, only later.
                log.info("homeserver ping failed (%s)", exc)
                self._pings.labels("failed").inc()
                if isinstance(exc, MatrixError) and exc.status < 500:
                    return False  # a homeserver without MSC2659, or no `url` registered
            if attempt + 1 < attempts:
                await asyncio.sleep(2.0 * (attempt + 1))
        return False

    def after_transaction(self, failed: bool) -> Coroutine[Any, Any, None] | None:
        """Called for every transaction Synapse sends; returns the ping to run in the
        background, if one is due."""
        if not failed:
            self._gap = FIRST_GAP_SECONDS
            return None
        if self._scheduled:
            return None
        self._scheduled = True
        gap, self._gap = self._gap, min(self._gap * 2, MAX_GAP_SECONDS)
        return self._ping_after(gap)

    async def _ping_after(self, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
        finally:
            self._scheduled = False
        await self.ping()
