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

This module is the pure ledger (no I/O library: tests/unit/test_core_imports.py);
`bridge.matrix.keyforward` is the nio side that records and sends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

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
