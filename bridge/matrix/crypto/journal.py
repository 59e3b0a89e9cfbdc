"""When a device's crypto journal reaches the database (design §5.3).

nio changes a device's state synchronously (bridge.matrix.crypto.store journals it);
the bridge writes the journal, in one transaction, at these points:

1. Before any request of the device leaves (`AppserviceDeviceClient._send`), so
   before ciphertext does: the Olm ratchets a to-device message advanced and the
   outbound Megolm session whose index a room message used are stored first. A crash
   after the write and before the send only burns an index; the reverse would make
   the next process reuse one, which receivers take for a replay.
2. After to-device events are handled (new Olm sessions, room keys received).
3. After key maintenance (the account saved once the server took its keys: nio saves
   it only after the answer, and bridge.matrix.devices.upload_keys recovers the window
   in between).
4. Before the device is closed (eviction, shutdown).

What nio keeps only in memory is captured at each write: the outbound Megolm sessions
(a restart or a takeover goes on with the session staff already have) and the tracked
users (a re-opened device does not query again the keys of every member).
"""

from __future__ import annotations

import asyncio
import logging

from nio.crypto import Olm

from bridge.db.crypto import CryptoRepo, CryptoSnapshot
from bridge.matrix.crypto.store import BridgeCryptoStore

log = logging.getLogger(__name__)


class DeviceCrypto:
    """One device's store and its writer."""

    def __init__(self, repo: CryptoRepo, user_id: str, device_id: str, pickle_key: str,
                 snapshot: CryptoSnapshot) -> None:
        self._repo = repo
        self.user_id = user_id
        self.store = BridgeCryptoStore(user_id, device_id, pickle_key, snapshot)
        self._lock = asyncio.Lock()
        self.olm: Olm | None = None

    def machine(self) -> Olm:
        """nio's Olm machine on this store (a new account, journaled, if none is
        stored), with what the bridge keeps that nio does not."""
        olm = Olm(self.user_id, self.store.device_id, self.store)
        self.store.restore(olm)
        self.olm = olm
        return olm

    async def flush(self) -> int:
        """Write what changed since the last flush; how many entries. On failure the
        entries are kept for the next flush and the error is raised."""
        async with self._lock:
            if self.olm is not None:
                self.store.capture(self.olm)
            journal = self.store.take_journal()
            if not len(journal):
                return 0
            try:
                return await self._repo.flush(self.user_id, journal)
            except BaseException:
                self.store.put_back(journal)
                raise

    async def close(self) -> None:
        """The last flush before the device closes; a failure is logged (the state of
        the last successful flush is what the next open gets)."""
        try:
            await self.flush()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("crypto state of %s not written at close (%s)", self.user_id,
                        type(exc).__name__)


def session_fits(olm: Olm, room_id: str, readers: set[str]) -> bool:
    """Whether the room's outbound Megolm session, restored from the database, may go
    on when a device first reads the room's members: it reached exactly who may read
    now (nobody it was shared with has left; every known device of a reader has it).
    Otherwise it ends, as it would have had the device seen the change while open, and
    the next message goes out under a new session. Devices not known yet are queried
    before the send; nio ends the session if any appear."""
    session = olm.outbound_group_sessions.get(room_id)
    if session is None or not session.shared:
        return False
    covered = set(session.users_shared_with) | set(session.users_ignored)
    if any(user not in readers for user, _device in covered):
        return False
    return all((user, device.id) in covered
               for user in readers for device in olm.device_store.active_user_devices(user)
               if not device.blacklisted)
