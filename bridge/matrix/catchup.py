"""Fetching what Synapse dropped from the transactions while it held the bridge DOWN.

While Synapse holds the appservice DOWN (bridge.matrix.as_recovery) it sends no to-device
events, key counts or device-list changes, not even later: a room key sent then never
comes in a transaction. It is still in Synapse's device inbox (delivery to an
appservice deletes nothing there; only the device's own /sync with a `since` token
does). So when a staff event stays undecryptable for a device fed by transactions,
that device fetches its inbox once: one `/sync` without waiting, blocking rooms,
presence and account data, from the token the last catch-up ended at (kept in the
device's store). What it brings goes the way transaction data goes: to-device events
into the inbound queue in the device's lane (deduplicated against what transactions
already brought: the same dedupe key), then the key counts and device lists. The
caller then retries the event. Nothing of this runs on a timer: no event waiting for
its key, no request.

The first catch-up of a device has no token and reads the inbox from its start; Synapse
returns 100 events per /sync, so it may take a few pages (at most CATCH_UP_PAGES). Each
/sync with a token deletes what came before it from the inbox, which also trims the rows
transaction delivery leaves behind (element-hq/synapse#11423).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import Counter

from bridge.db.queues import event_lane
from bridge.matrix.crypto_parts import PROBE_TYPE, CryptoParts, wrap
from bridge.matrix.queued import seal_event
from bridge.privacy import Cipher

if TYPE_CHECKING:
    from bridge.db import Database
    from bridge.matrix.crypto_feed import CryptoFeed
    from bridge.matrix.devices import Device

log = logging.getLogger(__name__)

# To-device messages, device lists and key counts only (Synapse skips all room work).
CATCH_UP_FILTER: Final = json.dumps({
    "presence": {"not_types": ["*"]},
    "account_data": {"not_types": ["*"]},
    "room": {"rooms": []},
}, separators=(",", ":"))
SYNAPSE_PAGE: Final = 100  # to-device events per /sync (synapse handlers/sync.py)
CATCH_UP_PAGES: Final = 20
# How long the caller waits for the fetched events to be handled by the device's lane.
HANDLED_WAIT_SECONDS: Final = 5.0


class ToDeviceCatchUp:
    """One device inbox fetch per call; concurrent calls for a device share one."""

    def __init__(self, db: Database, cipher: Cipher, feed: CryptoFeed,
                 wake: Callable[[str], None], counter: Counter) -> None:
        self._db = db
        self._cipher = cipher
        self._feed = feed
        self._wake = wake  # the inbound worker, for a lane of source "matrix"
        self._counter = counter
        self._running: dict[str, asyncio.Task[bool]] = {}

    async def __call__(self, device: Device) -> bool:
        """Fetch the device's inbox; True if it held events no transaction brought
        (handled, or still queued after HANDLED_WAIT_SECONDS)."""
        key = device.user_id
        task = self._running.get(key)
        if task is None:
            task = asyncio.create_task(self._catch_up(device), name=f"catch-up {key}")
            self._running[key] = task
            task.add_done_callback(lambda _t: self._running.pop(key, None))
        return await asyncio.shield(task)

    async def _catch_up(self, device: Device) -> bool:
        try:
            parts, token = await self._fetch(device)
            lane = event_lane(wrap({"to_user_id": device.user_id}))
            before = sum((await self._db.inbound.count_lane("matrix", lane)).values())
            if parts.to_device:
                with self._db.urgent():
                    await self._db.transactions.store(
                        f"catch-up:{device.user_id}:{device.client.device_id}:{token}",
                        [wrap(item) for item in parts.to_device],
                        seal=partial(seal_event, self._cipher))
            self._feed.apply(parts)
            new = sum((await self._db.inbound.count_lane("matrix", lane)).values()) - before
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._counter.labels("failed").inc()
            log.warning("catch-up of a device inbox failed (%s)", type(exc).__name__)
            return False
        self._counter.labels("recovered" if new else "nothing_new").inc()
        if not new:
            return False
        log.warning("%d to-device event(s) for %s came only from its inbox: the homeserver "
                    "dropped them from its transactions (it held the bridge DOWN)",
                    new, device.user_id)
        self._wake(lane)
        await self._handled(lane)
        return True

    async def _fetch(self, device: Device) -> tuple[CryptoParts, str]:
        client = device.client
        user_id, device_id = str(client.user_id), str(client.device_id)
        since = client.store.load_sync_token() if client.store else None
        events: list[dict[str, Any]] = []
        body: dict[str, Any] = {}
        for _ in range(CATCH_UP_PAGES):
            params = {"timeout": "0", "filter": CATCH_UP_FILTER, "device_id": device_id}
            if since:
                params["since"] = since
            body = await device.api.request("GET", "/_matrix/client/v3/sync",
                                            as_user=user_id, params=params)
            page = body.get("to_device", {}).get("events", [])
            page = [e for e in page if isinstance(e, dict)] if isinstance(page, list) else []
            # As MSC2409 has them in transactions: the dedupe key is then the same.
            events += [{"to_user_id": user_id, "to_device_id": device_id, **e} for e in page]
            since = str(body.get("next_batch", since or ""))
            if client.store and since:
                client.store.save_sync_token(since)
            if len(page) < SYNAPSE_PAGE:
                break
        lists = body.get("device_lists", {}) if isinstance(body.get("device_lists"), dict) \
            else {}
        counts = body.get("device_one_time_keys_count")
        fallback = body.get("device_unused_fallback_key_types")
        me = (user_id, device_id)
        return CryptoParts(
            to_device=[e for e in events if e.get("type") != PROBE_TYPE
                       and isinstance(e.get("content"), dict)],
            changed={u for u in lists.get("changed", []) if isinstance(u, str)},
            left={u for u in lists.get("left", []) if isinstance(u, str)},
            otk_counts={me: int(counts.get("signed_curve25519", 0))}
            if isinstance(counts, dict) else {},
            fallback_unused={me: [a for a in fallback if isinstance(a, str)]}
            if isinstance(fallback, list) else {}), since or ""

    async def _handled(self, lane: str) -> None:
        for _ in range(int(HANDLED_WAIT_SECONDS / 0.05)):
            if not (await self._db.inbound.count_lane("matrix", lane)).get("pending", 0):
                return
            await asyncio.sleep(0.05)
