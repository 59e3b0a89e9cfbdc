"""The key ledgers of the bridge's devices in the database (`LedgerStore` of keyshare).

A stored session key decrypts a portal's messages, so it is sealed with the privacy
cipher like the citizens' identifiers (nio's own store is pickled with the store key,
bridge.matrix.storekey, itself sealed with the same data key). The associated data
names the row's owner, session and index: a token copied into another row does not
decrypt there.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from bridge.db.roomkeys import RoomKeyRepo
from bridge.matrix.keyshare import Checkpoint, SessionRecord
from bridge.model import RoomKeyDelivery
from bridge.privacy import AAD_ROOM_KEY, Cipher, DecryptError
from bridge.types import RoomID, UserID

log = logging.getLogger(__name__)


def room_key_aad(owner: str, session_id: str, index: int) -> bytes:
    return AAD_ROOM_KEY + f"\0{owner}\0{session_id}\0{index}".encode()


class RoomKeyStore:
    """Builds each device's store; forgets an owner's keys on erasure."""

    def __init__(self, repo: RoomKeyRepo, cipher: Cipher) -> None:
        self._repo = repo
        self._cipher = cipher

    def owner(self, user_id: UserID) -> OwnerKeyStore:
        return OwnerKeyStore(self._repo, self._cipher, user_id)

    async def forget(self, user_id: UserID) -> int:
        """Delete every key and delivery kept for the user's device; returns the rows."""
        return await self._repo.delete_owner(user_id)


class OwnerKeyStore:
    """One device's ledger in the database."""

    def __init__(self, repo: RoomKeyRepo, cipher: Cipher, owner: UserID) -> None:
        self._repo = repo
        self._cipher = cipher
        self._owner = owner

    async def add(self, room_id: str, session_id: str, checkpoint: Checkpoint) -> None:
        sealed = self._cipher.encrypt(
            checkpoint.session_key, aad=room_key_aad(self._owner, session_id, checkpoint.index))
        await self._repo.add_key(self._owner, RoomID(room_id), session_id, checkpoint.index,
                                 sealed, checkpoint.audience)

    async def delivered(self, marks: Mapping[tuple[str, str], int]) -> None:
        await self._repo.record_deliveries(
            self._owner, [RoomKeyDelivery(session_id, curve25519, index)
                          for (session_id, curve25519), index in sorted(marks.items())])

    async def load(self) -> tuple[list[SessionRecord], dict[tuple[str, str], int]]:
        kept = await self._repo.load(self._owner)
        records: dict[tuple[str, str], SessionRecord] = {}
        skipped = 0
        for row in kept.keys:
            try:
                session_key = self._cipher.decrypt_str(
                    row.session_key_ct,
                    aad=room_key_aad(self._owner, row.session_id, row.message_index))
            except DecryptError as exc:
                # E.g. its data key was rotated away: those messages stay unreadable to
                # later devices, everything else still works. Never log the token.
                log.warning("a stored room key of %s (row %d) does not decrypt: %s",
                            self._owner, row.id, exc)
                skipped += 1
                continue
            record = records.setdefault((row.room_id, row.session_id),
                                        SessionRecord(row.room_id, row.session_id))
            record.checkpoints.append(
                Checkpoint(row.message_index, session_key, frozenset(row.audience)))
        if skipped:
            log.warning("%d stored room key(s) of %s skipped", skipped, self._owner)
        delivered = {(d.session_id, d.curve25519): d.message_index for d in kept.deliveries}
        return list(records.values()), delivered

    async def drop(self, session_ids: Iterable[str]) -> None:
        await self._repo.delete_sessions(self._owner, session_ids)
