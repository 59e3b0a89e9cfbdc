"""The nio side of `bridge.matrix.keyshare`: records the Megolm sessions a ghost device
creates and sends the room keys its ledger says are owed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

import nio

from bridge.matrix.api import nio_failure
from bridge.matrix.keyshare import (
    MEGOLM,
    KeyLedger,
    KeyTrust,
    LedgerStore,
    Owed,
    Target,
    audience,
)

log = logging.getLogger(__name__)


class KeyForwarder:
    """The nio side: records sessions as the device encrypts, sends what is owed.

    With a `store`, every checkpoint is stored before the message it is needed for goes
    out, every delivery after it happened, and `restore` reloads them after a restart.
    """

    def __init__(self, client: nio.AsyncClient, is_ours: Callable[[str], bool],
                 store: LedgerStore | None = None, trust: KeyTrust | None = None) -> None:
        self.client = client
        self.is_ours = is_ours
        self.store = store
        self.trust = trust  # None: every later device of a member (`forward_keys_to: all`)
        self.ledger = KeyLedger()
        self.sent = 0  # keys forwarded since the device opened
        # One forward at a time: two at once would both send what neither marked yet.
        self._forwarding = asyncio.Lock()

    async def restore(self) -> int:
        """Load what the store kept into the ledger; returns how many checkpoints."""
        if self.store is None:
            return 0
        records, delivered = await self.store.load()
        count = 0
        for record in records:
            for checkpoint in record.checkpoints:
                self.ledger.add(record.room_id, record.session_id, checkpoint)
                count += 1
        for (session_id, curve25519), index in delivered.items():
            self.ledger.mark(session_id, curve25519, index)
        return count

    async def before_send(self, room_id: str) -> None:
        """Share the room's outbound session now (as room_send would) and note its key."""
        client, olm = self.client, self.client.olm
        room = client.rooms.get(room_id)
        if olm is None or room is None or not room.encrypted:
            return
        if olm.should_share_group_session(room_id):
            pending = client.sharing_session.get(room_id)
            if pending is not None:
                await pending.wait()
            else:
                resp = await client.share_group_session(room_id, ignore_unverified_devices=True)
                if isinstance(resp, nio.ShareGroupSessionError):
                    raise nio_failure(resp, "sharing the room key")
        session = olm.outbound_group_sessions.get(room_id)
        if session is None or not session.shared:
            return
        invited = set(room.invited_users)
        joined = set(room.users) - invited
        session_id = str(session.id)
        checkpoint = self.ledger.entitles(
            room_id, session_id, int(session.message_index), str(session.session_key),
            audience(str(room.history_visibility), joined, invited))
        if checkpoint is not None:
            if self.store is not None:  # stored first: the message it unlocks comes next
                await self.store.add(room_id, session_id, checkpoint)
            self.ledger.add(room_id, session_id, checkpoint)
        marks: dict[tuple[str, str], int] = {}
        for user_id, device_id in set(session.users_shared_with):
            device = olm.device_store[user_id].get(device_id)
            if device is not None and self.ledger.lowers(session_id, str(device.curve25519), 0):
                marks[(session_id, str(device.curve25519))] = 0
        if marks:
            if self.store is not None:
                await self.store.delivered(marks)
            for (sid, curve25519), index in marks.items():
                self.ledger.mark(sid, curve25519, index)

    def _targets(self, users: Iterable[str]) -> dict[str, list[Target]]:
        olm = self.client.olm
        assert olm is not None
        own = self.client.device_id
        out: dict[str, list[Target]] = {}
        for user_id in users:
            out[user_id] = [Target(user_id, str(d.id), str(d.curve25519))
                            for d in olm.device_store.active_user_devices(user_id)
                            if d.id != own and not olm.is_device_blacklisted(d)]
        return out

    async def forward(self) -> int:
        """Send every owed key; returns how many went out."""
        async with self._forwarding:
            return await self._forward()

    async def _forward(self) -> int:
        olm = self.client.olm
        if olm is None or not self.ledger.records:
            return 0
        dropped = self.ledger.forget_rooms_except(set(self.client.rooms))
        if dropped and self.store is not None:
            await self.store.drop(dropped)
        members: dict[str, set[str]] = {}
        for record in self.ledger.records.values():
            members[record.room_id] = set(self.client.rooms[record.room_id].users)
        users = set().union(*members.values())
        owed = self.ledger.owed(members, self._targets(users), self.is_ours)
        if owed and self.trust is not None:
            allowed = await self.trust(str(self.client.user_id), {o.target for o in owed})
            owed = [o for o in owed if o.target in allowed]
        if not owed:
            return 0
        missing: dict[str, list[str]] = {}
        for item in owed:
            if olm.session_store.get(item.target.curve25519) is None:
                missing.setdefault(item.target.user_id, []).append(item.target.device_id)
        if missing:
            resp = await self.client.keys_claim(missing)
            if isinstance(resp, nio.KeysClaimError):
                log.warning("claiming one-time keys to forward room keys failed: %s",
                            resp.status_code)
        sent = 0
        marks: dict[tuple[str, str], int] = {}
        for item in owed:
            if await self._send(item):
                sent += 1
                key = (item.session_id, item.target.curve25519)
                marks[key] = min(item.checkpoint.index, marks.get(key, item.checkpoint.index))
        self.sent += sent
        if sent:
            log.info("forwarded %d room key(s) to later devices", sent)
        if marks and self.store is not None:
            # After sending: a crash in between only means the key is sent once more.
            await self.store.delivered(marks)
        return sent

    async def _send(self, item: Owed) -> bool:
        olm = self.client.olm
        assert olm is not None
        target = item.target
        session = olm.session_store.get(target.curve25519)
        device = olm.device_store[target.user_id].get(target.device_id)
        if session is None or device is None:
            log.warning("no Olm session for a later device; its room key waits")
            return False
        content: dict[str, Any] = {
            "algorithm": MEGOLM, "room_id": item.room_id, "session_id": item.session_id,
            "session_key": item.checkpoint.session_key,
            # MSC3061: the key was shared because history is visible to this member.
            "org.matrix.msc3061.shared_history": True,
        }
        payload = olm._olm_encrypt(session, device, "m.room_key", content)
        resp = await self.client.to_device(
            nio.ToDeviceMessage("m.room.encrypted", target.user_id, target.device_id, payload))
        if isinstance(resp, nio.ToDeviceError):
            log.warning("sending a forwarded room key failed: %s", resp.status_code)
            return False
        self.ledger.mark(item.session_id, target.curve25519, item.checkpoint.index)
        return True
