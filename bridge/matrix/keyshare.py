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
  session from that index or earlier (nio's own share, or an earlier forward).

State is in memory only: the signed session key at index 0 cannot be rebuilt after a
restart (nio does not persist outbound sessions), so messages encrypted before a
restart reach only devices that existed before it. After a restart nothing is
forwarded twice because nothing old is remembered; a key sent twice would be harmless.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import nio

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
    """What one device created and handed out (in memory)."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], SessionRecord] = {}
        self.delivered: dict[tuple[str, str], int] = {}

    def note(self, room_id: str, session_id: str, index: int, session_key: str,
             entitled: frozenset[str]) -> None:
        """Before encrypting at `index`: remember the key if someone new is entitled."""
        record = self.records.setdefault((room_id, session_id),
                                         SessionRecord(room_id, session_id))
        known: set[str] = set()
        for checkpoint in record.checkpoints:
            known |= checkpoint.audience
        if not record.checkpoints or not entitled <= known:
            record.checkpoints.append(Checkpoint(index, session_key, entitled))

    def mark(self, session_id: str, curve25519: str, index: int) -> None:
        key = (session_id, curve25519)
        self.delivered[key] = min(index, self.delivered.get(key, index))

    def rooms(self) -> set[str]:
        """Rooms this device created sessions in."""
        return {room_id for room_id, _ in self.records}

    def forget_rooms_except(self, rooms: set[str]) -> None:
        """Drop what was kept for rooms this device is no longer in."""
        gone = [key for key in self.records if key[0] not in rooms]
        for room_id, session_id in gone:
            del self.records[(room_id, session_id)]
            for key in [k for k in self.delivered if k[0] == session_id]:
                del self.delivered[key]

    def owed(self, members: Mapping[str, Iterable[str]], devices: Mapping[str, Iterable[Target]],
             is_ours: Callable[[str], bool]) -> list[Owed]:
        return owed_keys(self.records.values(), members, devices, self.delivered, is_ours)


class KeyForwarder:
    """The nio side: records sessions as the device encrypts, sends what is owed."""

    def __init__(self, client: nio.AsyncClient, is_ours: Callable[[str], bool]) -> None:
        self.client = client
        self.is_ours = is_ours
        self.ledger = KeyLedger()

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
                    raise RuntimeError(f"sharing the room key failed: {resp.status_code}")
        session = olm.outbound_group_sessions.get(room_id)
        if session is None or not session.shared:
            return
        invited = set(room.invited_users)
        joined = set(room.users) - invited
        index = int(session.message_index)
        self.ledger.note(room_id, str(session.id), index, str(session.session_key),
                         audience(str(room.history_visibility), joined, invited))
        for user_id, device_id in set(session.users_shared_with):
            device = olm.device_store[user_id].get(device_id)
            if device is not None:
                self.ledger.mark(str(session.id), str(device.curve25519), 0)

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
        olm = self.client.olm
        if olm is None or not self.ledger.records:
            return 0
        self.ledger.forget_rooms_except(set(self.client.rooms))
        members: dict[str, set[str]] = {}
        for record in self.ledger.records.values():
            members[record.room_id] = set(self.client.rooms[record.room_id].users)
        users = set().union(*members.values())
        owed = self.ledger.owed(members, self._targets(users), self.is_ours)
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
        for item in owed:
            if await self._send(item):
                sent += 1
        if sent:
            log.info("forwarded %d room key(s) to later devices", sent)
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
