"""E2EE fed by appservice transactions: no device polls the homeserver.

With `experimental_features: msc2409_to_device_messages_enabled` (and the registration's
`receive_ephemeral`), Synapse puts every to-device event addressed to the bridge's users
into the transactions it pushes (MSC2409, with `to_user_id`/`to_device_id`); with
`msc3202_transaction_extensions` (and `org.matrix.msc3202` in the registration) it adds
device-list changes, one-time-key counts and unused fallback-key types per device
(MSC3202). bridge.matrix.crypto_parts reads those parts of a transaction; this module feeds them
to the nio clients of the bot and the ghosts (bridge.matrix.devices), which then run no /sync.

- To-device events are stored in the inbound queue with the transaction's room events,
  sealed like them (bridge.matrix.queued), before the transaction is acknowledged
  (Synapse sends each one once); one lane per recipient keeps them in order. The worker
  hands each to the recipient's device, opening it if it is closed.
- Device-list changes mark the users for a key query in every open device.
- Key counts go to the device: one-time keys are topped up when fewer than half are
  left on the server, a used fallback key is replaced once it is a week old
  (bridge.matrix.devices.FALLBACK_MAX_AGE_SECONDS: the to-device events encrypted to it
  may still be queued).
  Counts are not stored: every later transaction that concerns the device repeats them.

Which transport a process uses is decided once at start (`CryptoFeed.probe`): the bot
sends one to-device message to its own device and waits for the transaction carrying
it. If it arrives with the bot's key counts, the homeserver sends everything above and
no device polls ("appservice"). Otherwise each device keeps its own /sync loop as
before ("sync", the fallback), and `/ready` and the log name the missing settings.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, Literal

from prometheus_client import Counter

from bridge.matrix.crypto_parts import PROBE_TYPE, Counts, CryptoParts
from bridge.types import UserID

if TYPE_CHECKING:
    from bridge.db import Database
    from bridge.matrix.api import MatrixAPI
    from bridge.matrix.as_recovery import AppserviceRecovery
    from bridge.matrix.devices import Device, Devices
    from bridge.matrix.ghosts import Ghosts

log = logging.getLogger(__name__)

PROBE_SECONDS: Final = 10.0
LATE_PROBE_SECONDS: Final = 3.0
NO_TO_DEVICE: Final = (
    "the homeserver sends no to-device events to the bridge: set "
    "`experimental_features: {msc2409_to_device_messages_enabled: true}` in homeserver.yaml "
    "and `receive_ephemeral: true` in the registration, then restart Synapse")
NO_COUNTS: Final = (
    "the homeserver sends no one-time-key counts to the bridge: set "
    "`experimental_features: {msc3202_transaction_extensions: true}` in homeserver.yaml "
    "and `org.matrix.msc3202: true` in the registration, then restart Synapse")
FALLBACK_NOTE: Final = "; every E2EE device polls the homeserver with /sync meanwhile"

Mode = Literal["pending", "sync", "appservice"]


class CryptoFeed:
    """The transport decision and the routing of transaction E2EE data to devices."""

    def __init__(self, devices: Devices, dropped: Counter) -> None:
        self.devices = devices
        self.mode: Mode = "pending"
        self.decided = asyncio.Event()
        self.problem: str | None = None  # why the fallback is used
        self.dropped = dropped
        # The nonces of the probes sent, and whether their transaction had key counts.
        self._probe: tuple[set[str], asyncio.Future[bool]] | None = None
        self._resent_at = float("-inf")  # when the probe was last sent again
        # Fetches a device's inbox once (bridge.matrix.catchup); set when wired.
        self.catch_up: Callable[[Device], Awaitable[bool]] | None = None
        # Pings Synapse when it may hold the bridge DOWN (bridge.matrix.as_recovery).
        self.recovery: AppserviceRecovery | None = None
        devices.feed = self

    @property
    def appservice(self) -> bool:
        return self.mode == "appservice"

    def warning(self) -> str | None:
        """For /ready: set while the fallback (per-device /sync) is in use."""
        if self.mode == "sync" and self.problem:
            return self.problem + FALLBACK_NOTE
        return None

    def decide(self, mode: Mode, problem: str | None = None) -> None:
        self.mode, self.problem = mode, problem
        self.decided.set()
        if mode == "sync":
            log.warning("E2EE: %s%s", problem, FALLBACK_NOTE)
        else:
            log.info("E2EE: to-device events, device lists and key counts come in "
                     "appservice transactions; no device polls the homeserver")

    def start_as(self, remembered: str | None) -> bool:
        """Decide at once as the last process did (`remembered`, kept in the database),
        so that a restart or a takeover does not wait for the probe; `recheck` then
        confirms it in the background. False when there is nothing to go by."""
        if self.decided.is_set():
            return False
        if remembered == "appservice":
            self.decide("appservice")
        elif remembered == "sync":
            self.decide("sync", NO_TO_DEVICE)
        else:
            return False
        return True

    async def recheck(self, api: MatrixAPI, bot: str, bot_device: str,
                      timeout: float = PROBE_SECONDS,  # noqa: ASYNC109
                      recovered: Callable[[], Awaitable[bool]] | None = None) -> None:
        """Probe again while running as remembered; a different answer (the homeserver's
        switches changed) changes the transport, and every open device moves to it."""
        mode, problem = await self._run_probe(api, bot, bot_device, timeout, recovered)
        if (mode, problem) != (self.mode, self.problem):
            log.warning("E2EE: the homeserver's answer changed since the last start")
            self.decide(mode, problem)
            self.devices.wake_all()

    async def probe(self, api: MatrixAPI, bot: str, bot_device: str,
                    timeout: float = PROBE_SECONDS,  # noqa: ASYNC109
                    recovered: Callable[[], Awaitable[bool]] | None = None) -> None:
        """Decide the transport (once per process): see the module docstring.

        `recovered` (run alongside) says whether Synapse has been made to retry the
        transactions it held (bridge.matrix.as_recovery). While it held the bridge
        DOWN it dropped the probe from its transactions, so after that the probe is
        sent again (after 1, 2 and 4 s: Synapse marks the bridge UP only once it has
        delivered what it held) within the same wait; the last one sent gets at
        least LATE_PROBE_SECONDS. A ping that keeps failing adds no wait."""
        if self.decided.is_set():
            return
        self.decide(*await self._run_probe(api, bot, bot_device, timeout, recovered))

    async def _run_probe(self, api: MatrixAPI, bot: str, bot_device: str,
                         timeout: float,  # noqa: ASYNC109
                         recovered: Callable[[], Awaitable[bool]] | None
                         ) -> tuple[Mode, str | None]:
        found: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._probe = (set(), found)
        self._resent_at = float("-inf")
        resend = None
        try:
            await self._send_probe(api, bot, bot_device)
            if recovered is not None:
                resend = asyncio.create_task(self._resend_probe(api, bot, bot_device, recovered))
            has_counts = await self._wait_probe(found, timeout)
            # A probe sent again near the end of the wait gets LATE_PROBE_SECONDS. A
            # ping still failing (it retries for up to 30 s) is not waited for.
            late = self._resent_at + LATE_PROBE_SECONDS - asyncio.get_running_loop().time()
            if has_counts is None and late > 0:
                has_counts = await self._wait_probe(found, late)
        finally:
            self._probe = None
            if resend is not None:
                resend.cancel()
                await asyncio.gather(resend, return_exceptions=True)
        if has_counts is None:
            return "sync", NO_TO_DEVICE
        return ("appservice", None) if has_counts else ("sync", NO_COUNTS)

    async def _send_probe(self, api: MatrixAPI, bot: str, bot_device: str) -> None:
        assert self._probe is not None
        nonce = secrets.token_urlsafe(12)
        self._probe[0].add(nonce)
        await api.request(
            "PUT", f"/_matrix/client/v3/sendToDevice/{PROBE_TYPE}/{nonce}", as_user=bot,
            json={"messages": {bot: {bot_device: {"nonce": nonce}}}})

    async def _resend_probe(self, api: MatrixAPI, bot: str, bot_device: str,
                            recovered: Callable[[], Awaitable[bool]]) -> None:
        """Send the probe again once Synapse was made to retry (`_resent_at`)."""
        if not await recovered():
            return
        for delay in (1.0, 2.0, 4.0):
            await asyncio.sleep(delay)
            if self._probe is None or self._probe[1].done():
                return
            await self._send_probe(api, bot, bot_device)
            self._resent_at = asyncio.get_running_loop().time()

    @staticmethod
    async def _wait_probe(found: asyncio.Future[bool], timeout: float  # noqa: ASYNC109
                          ) -> bool | None:
        """Whether the probe's transaction had key counts; None: none came in time."""
        try:
            return await asyncio.wait_for(asyncio.shield(found), timeout)
        except TimeoutError:
            return None

    def observe(self, parts: CryptoParts) -> tuple[list[dict[str, Any]], Counts]:
        """Called by the transaction handler before it stores anything: settles the
        probe; returns the to-device events to queue (ours, probes left out) and how
        many were dropped for which reason (`count_dropped` once the transaction is
        known to be new, so that a retried one is not counted twice)."""
        keep: list[dict[str, Any]] = []
        dropped: Counts = {}
        if parts.malformed:
            dropped["malformed"] = parts.malformed
        for item in parts.to_device:
            if item["type"] == PROBE_TYPE:
                nonce = item["content"].get("nonce")
                if self._probe is not None and not self._probe[1].done() and \
                        isinstance(nonce, str) and nonce in self._probe[0]:
                    key = (item["to_user_id"], item["to_device_id"])
                    self._probe[1].set_result(key in parts.otk_counts)
                continue
            if not self.devices.is_ours(item["to_user_id"]):
                dropped["not_ours"] = dropped.get("not_ours", 0) + 1
                continue
            keep.append(item)
        return keep, dropped

    def count_dropped(self, dropped: Counts) -> None:
        for reason, n in dropped.items():
            self.dropped.labels(reason).inc(n)
            log.warning("transaction: %d to-device event(s) ignored (%s)", n,
                        "no recipient" if reason == "malformed" else
                        "for users outside the bridge's namespace")

    def apply(self, parts: CryptoParts) -> None:
        """After the transaction is acknowledged: device lists and key counts."""
        users = parts.changed | parts.left
        if users:
            self.devices.users_changed({u for u in users if not self.devices.is_ours(u)})
        if self.appservice:
            for user_id, device_id in parts.otk_counts.keys() | parts.fallback_unused.keys():
                if self.devices.is_ours(user_id):
                    self.devices.key_counts(
                        user_id, device_id, otk=parts.otk_counts.get((user_id, device_id)),
                        fallback_unused=parts.fallback_unused.get((user_id, device_id)))


class ToDeviceHandler:
    """The inbound worker's handler for queued to-device events."""

    def __init__(self, feed: CryptoFeed, db: Database, ghosts: Ghosts) -> None:
        self._feed = feed
        self._db = db
        self._ghosts = ghosts

    async def __call__(self, item: dict[str, Any]) -> None:
        await self._feed.decided.wait()
        if not self._feed.appservice:
            # The recipient's own /sync delivers the same event (Synapse sends both
            # ways); handling it twice would fail the second Olm decryption.
            return
        user_id, device_id = str(item["to_user_id"]), str(item["to_device_id"])
        ghost = await self._db.ghosts.get(UserID(user_id))
        if ghost is None or ghost.device_id != device_id:
            # A device of ours the bridge no longer uses (e.g. an old login) or an
            # erased ghost: nobody can read it.
            self._feed.dropped.labels("unknown_device").inc()
            log.warning("a to-device event for a device the bridge does not use, ignored")
            return
        device = await self._ghosts.device(UserID(user_id))
        await device.feed_to_device([item])
