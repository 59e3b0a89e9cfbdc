"""Room keys for staff devices that appear after a ghost already spoke.

A ghost shares each Megolm session with the devices that exist when it starts encrypting.
A staff member who logs in a new device later (Element on a new phone, a fresh browser),
or whose device appeared after the citizen's first portal messages, would otherwise never
be able to read them: the ghost never receives key requests it could answer (it does not
long-poll), and nio only answers requests from its own user's devices.

So each ghost device remembers, for every Megolm session it created, the signed session
key at the index where each member first became entitled to it (its *audience* then),
and sends that key to devices of current members that do not have it yet. The key goes
out as an ordinary Olm-encrypted `m.room_key` from the session's creator, not as an
`m.forwarded_room_key`: Element (matrix-rust-sdk) and nio both drop forwarded keys they
did not request, while a room key from the session's own creator is accepted at any
time, and messages decrypted with it stay fully authenticated (no "authenticity not
guaranteed" warning).

Who is owed what (`owed_keys`, pure):
- only sessions this device created in that room (sender key == our curve25519);
- only users who are joined or invited *now* (never users who left or were never
  members), outside the bridge's namespace (other ghosts and the bot need no history);
- only from the first index at which the user was in the session's audience: members
  joined + invited when the ghost encrypted (history visibility `invited`, `shared`,
  and anything unknown), joined only for `joined`. A user invited later gets nothing
  from before their invitation.
- to every active (not blacklisted) device of such a user that has not received the
  session from that index or earlier (nio's own share, or an earlier forward);
- with a `KeyTrust` (`e2ee.forward_keys_to: cross-signed`, bridge.matrix.devicetrust),
  only to devices their owner cross-signed: a device logged in with a phished password
  gets the keys of what is sent after it appeared (nio's ordinary sharing), never
  earlier ones. A refused device stays owed and gets them once its owner signs it.

What is kept, and when (with a `LedgerStore`; bridge.matrix.keystore puts it in the
bridge's database, the session key sealed with the privacy data key):
- a checkpoint (room, session, index, signed session key, audience) is stored in
  `before_send`, before the message that needs it is sent: a crash right after the send
  cannot lose the only key that opens it for later devices;
- a delivery mark (session, device curve25519, lowest index it has) after nio shared
  the session with the device (noted in `before_send`) and after each forwarded key;
  a crash between a forward and its mark only means the key goes out once more;
- `restore` loads the owner's rows when the device opens, before it sends or forwards
  anything. nio does not persist outbound sessions, so the stored key is the only way
  to give a device that appears after a restart the messages sent before it.
- sessions of rooms the device left are deleted with their marks, and erasure of the
  owner (Devices.forget) deletes everything kept for it.
Without a store the ledger lives in memory only, as in the unit tests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import nio

from bridge.matrix.api import nio_failure

log = logging.getLogger(__name__)

MEGOLM = "m.megolm.v1.aes-sha2"


@dataclass(frozen=True)
class Checkpoint:
    """The signed session key at `index`; `audience`: who was entitled from there on."""

    index: int
    session_key: str
    audience: frozenset[str]


@dataclass
class SessionRecord:
    room_id: str
    session_id: str
    checkpoints: list[Checkpoint] = field(default_factory=list)

    def first_for(self, user_id: str) -> Checkpoint | None:
        """The earliest key `user_id` may have (checkpoints are in index order)."""
        for checkpoint in self.checkpoints:
            if user_id in checkpoint.audience:
                return checkpoint
        return None


@dataclass(frozen=True)
class Target:
    """A recipient device."""

    user_id: str
    device_id: str
    curve25519: str


@dataclass(frozen=True)
class Owed:
    target: Target
    room_id: str
    session_id: str
    checkpoint: Checkpoint


def audience(history_visibility: str, joined: Iterable[str],
             invited: Iterable[str]) -> frozenset[str]:
    """Who may read a message encrypted now, by the room's history visibility."""
    if history_visibility == "joined":
        return frozenset(joined)
    return frozenset(joined) | frozenset(invited)


def owed_keys(records: Iterable[SessionRecord], members: Mapping[str, Iterable[str]],
              devices: Mapping[str, Iterable[Target]], delivered: Mapping[tuple[str, str], int],
              is_ours: Callable[[str], bool]) -> list[Owed]:
    """The (device, session key) pairs still to send.

    `members`: room id -> users joined or invited now; `devices`: user -> active devices;
    `delivered`: (session id, device curve25519) -> lowest index that device already has.
    """
    owed: list[Owed] = []
    for record in records:
        for user_id in sorted(set(members.get(record.room_id, ()))):
            if is_ours(user_id):
                continue
            checkpoint = record.first_for(user_id)
            if checkpoint is None:
                continue
            for target in devices.get(user_id, ()):
                have = delivered.get((record.session_id, target.curve25519))
                if have is not None and have <= checkpoint.index:
                    continue
                owed.append(Owed(target, record.room_id, record.session_id, checkpoint))
    return owed


class KeyLedger:
    """What one device created and handed out (in memory; `LedgerStore` keeps a copy)."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], SessionRecord] = {}
        self.delivered: dict[tuple[str, str], int] = {}

    def entitles(self, room_id: str, session_id: str, index: int, session_key: str,
                 entitled: frozenset[str]) -> Checkpoint | None:
        """The checkpoint to keep before encrypting at `index`, if someone new is entitled.

        At the index of the newest checkpoint it widens that checkpoint's audience.
        """
        record = self.records.get((room_id, session_id))
        if record is None or not record.checkpoints:
            return Checkpoint(index, session_key, entitled)
        known: set[str] = set()
        for checkpoint in record.checkpoints:
            known |= checkpoint.audience
        if entitled <= known:
            return None
        last = record.checkpoints[-1]
        if last.index == index:
            return Checkpoint(index, session_key, last.audience | entitled)
        return Checkpoint(index, session_key, entitled)

    def add(self, room_id: str, session_id: str, checkpoint: Checkpoint) -> None:
        """Keep `checkpoint` (it replaces one at the same index), in index order."""
        record = self.records.setdefault((room_id, session_id),
                                         SessionRecord(room_id, session_id))
        record.checkpoints = sorted(
            [c for c in record.checkpoints if c.index != checkpoint.index] + [checkpoint],
            key=lambda c: c.index)

    def note(self, room_id: str, session_id: str, index: int, session_key: str,
             entitled: frozenset[str]) -> Checkpoint | None:
        """Before encrypting at `index`: remember the key if someone new is entitled."""
        checkpoint = self.entitles(room_id, session_id, index, session_key, entitled)
        if checkpoint is not None:
            self.add(room_id, session_id, checkpoint)
        return checkpoint

    def lowers(self, session_id: str, curve25519: str, index: int) -> bool:
        """Whether the device would get the session from an earlier index than it has."""
        have = self.delivered.get((session_id, curve25519))
        return have is None or index < have

    def mark(self, session_id: str, curve25519: str, index: int) -> bool:
        """The device has the session from `index` on; True if that is news."""
        if not self.lowers(session_id, curve25519, index):
            return False
        self.delivered[(session_id, curve25519)] = index
        return True

    def rooms(self) -> set[str]:
        """Rooms this device created sessions in."""
        return {room_id for room_id, _ in self.records}

    def forget_rooms_except(self, rooms: set[str]) -> list[str]:
        """Drop what was kept for rooms this device is no longer in; returns the sessions."""
        gone = [key for key in self.records if key[0] not in rooms]
        for room_id, session_id in gone:
            del self.records[(room_id, session_id)]
            for key in [k for k in self.delivered if k[0] == session_id]:
                del self.delivered[key]
        return [session_id for _, session_id in gone]

    def owed(self, members: Mapping[str, Iterable[str]], devices: Mapping[str, Iterable[Target]],
             is_ours: Callable[[str], bool]) -> list[Owed]:
        return owed_keys(self.records.values(), members, devices, self.delivered, is_ours)


class LedgerStore(Protocol):
    """Where one device's ledger outlives the process (bridge.matrix.keystore)."""

    async def add(self, room_id: str, session_id: str, checkpoint: Checkpoint) -> None:
        """Keep a checkpoint (again at the same index: its wider audience replaces)."""

    async def delivered(self, marks: Mapping[tuple[str, str], int]) -> None:
        """(session id, device curve25519) -> index: lower what is kept, never raise it."""

    async def load(self) -> tuple[list[SessionRecord], dict[tuple[str, str], int]]:
        """Everything kept: the sessions' checkpoints and the deliveries."""

    async def drop(self, session_ids: Iterable[str]) -> None:
        """Forget these sessions (their room was left)."""


class KeyTrust(Protocol):
    """Which later devices may have earlier keys (bridge.matrix.devicetrust)."""

    async def __call__(self, as_user: str, targets: Iterable[Target]) -> set[Target]:
        """The subset of `targets` allowed; `as_user` asks the homeserver."""

    def users_changed(self, users: Iterable[str]) -> None:
        """These users' device lists changed: forget what was decided for them."""


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
