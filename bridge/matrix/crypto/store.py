"""matrix-nio's store over the bridge's database: a snapshot in, a journal out.

nio calls its store synchronously from the event loop (every new Olm or Megolm session,
every ratchet step); the file store it came with committed to SQLite there, blocking the
loop 100-350 ms on a busy machine. This store does no I/O at all: it is built from a
snapshot read beforehand (`CryptoRepo.load`, awaited), answers nio's `load_*` calls from
it, and turns each `save_*` and trust change into an entry of a journal (per key, the
last write wins) that the bridge writes with `await` at the points
bridge.matrix.crypto.journal gives. Design: docs/design/16-appservice-e2ee.md §3.1.

Pickles are nio's own (vodozemac, with the store key's passphrase,
bridge.matrix.storekey), so they move between the file stores and the database as
they are. nio's timestamps are naive local times; the database keeps them in UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from nio.crypto import (
    DeviceStore,
    GroupSessionStore,
    InboundGroupSession,
    Olm,
    OlmAccount,
    OlmDevice,
    OutboundGroupSession,
    OutgoingKeyRequest,
    Session,
    SessionStore,
    TrustState,
)
from nio.store.database import MatrixStore

from bridge.db.crypto import (
    AccountRecord,
    CryptoJournal,
    CryptoSnapshot,
    DeviceRecord,
    InboundRecord,
    KeyRequestRecord,
    OlmSessionRecord,
    OutboundRecord,
)

# Message indices of an outbound Megolm session reserved per write: the stored session is
# written again only every OUTBOUND_RESERVE messages (not before every message: one
# database write per relayed message cost the bridge 2-4 ms of CPU), and a device
# restored from it first advances it past the reserved indices, so no index is ever
# used twice (receivers would take the second use for a replay). Receivers skip the
# unused ones; restoring costs one encryption per index skipped.
OUTBOUND_RESERVE = 32


def to_utc(value: datetime) -> datetime:
    """nio's naive local time as an aware UTC one."""
    return value.astimezone(UTC)


def to_local(value: datetime) -> datetime:
    """A stored UTC time as the naive local time nio compares with datetime.now()."""
    return value.astimezone().replace(tzinfo=None)


class BridgeCryptoStore(MatrixStore):  # type: ignore[misc]  # nio is untyped
    """One device's nio store: reads from `snapshot`, writes to `journal`."""

    def __init__(self, user_id: str, device_id: str, pickle_key: str,
                 snapshot: CryptoSnapshot) -> None:
        # Not MatrixStore.__init__/__post_init__: they open a peewee SQLite file.
        self.user_id = user_id
        self.device_id = device_id
        self.store_path = ""
        self.pickle_key = pickle_key
        self.database_name = ""
        # What is stored belongs to another device id of the user: start afresh, and
        # have the first flush delete it.
        stale = snapshot.device_id is not None and snapshot.device_id != device_id
        self._snap = CryptoSnapshot() if stale else snapshot
        self.journal = CryptoJournal(reset=stale)
        self._trust: dict[tuple[str, str], int] = dict(self._snap.trust)
        self._sync_token = self._snap.sync_token
        # What the database has of what nio keeps in memory only (see `capture`).
        self._tracked: set[str] = set(self._snap.tracked)
        self._outbound_marks: dict[str, tuple[Any, ...]] = {}
        self._reserved: dict[str, int] = {}  # per room: see OUTBOUND_RESERVE

    # Account

    def load_account(self) -> OlmAccount | None:
        a = self._snap.account
        if a is None:
            return None
        account = OlmAccount.from_pickle(a.pickle.encode(), self.pickle_key, a.shared)
        if account.upgrade_pickle:  # a libolm pickle: saved again as vodozemac (as nio)
            account.upgrade_pickle = False
            self.save_account(account)
        return account

    def save_account(self, account: OlmAccount) -> None:
        self.journal.account = AccountRecord(
            self.device_id, account.pickle(self.pickle_key).decode(), bool(account.shared))

    # Olm sessions

    def load_sessions(self) -> SessionStore:
        store = SessionStore()
        for s in self._snap.olm_sessions:
            session = Session.from_pickle(s.pickle.encode(), to_local(s.created_at),
                                          self.pickle_key, to_local(s.last_used_at))
            store.add(s.sender_key, session)
            if session.upgrade_pickle:
                session.upgrade_pickle = False
                self.save_session(s.sender_key, session)
        return store

    def save_session(self, curve_key: str, session: Session) -> None:
        self.journal.olm_sessions[session.id] = OlmSessionRecord(
            session.id, curve_key, session.pickle(self.pickle_key).decode(),
            to_utc(session.creation_time), to_utc(session.use_time))

    # Inbound Megolm sessions (room keys received)

    def load_inbound_group_sessions(self) -> GroupSessionStore:
        store = GroupSessionStore()
        for s in self._snap.inbound:
            session = InboundGroupSession.from_pickle(
                s.pickle.encode(), s.signing_key, s.sender_key, s.room_id, self.pickle_key,
                list(s.forwarding_chain))
            store.add(session)
            if session.upgrade_pickle:
                session.upgrade_pickle = False
                self.save_inbound_group_session(session)
        return store

    def save_inbound_group_session(self, session: InboundGroupSession) -> None:
        self.journal.inbound[session.id] = InboundRecord(
            session.id, session.sender_key, session.ed25519, session.room_id,
            session.pickle(self.pickle_key).decode(), tuple(session.forwarding_chain or ()))

    # Device keys and trust

    def load_device_keys(self) -> DeviceStore:
        store = DeviceStore()
        for d in self._snap.devices:
            device = OlmDevice(d.user_id, d.device_id, dict(d.keys),
                               display_name=d.display_name, deleted=d.deleted)
            device.trust_state = TrustState(self._trust.get((d.user_id, d.device_id), 0))
            store.add(device)
        return store

    def save_device_keys(self, device_keys: dict[str, dict[str, OlmDevice]]) -> None:
        for user_id, devices in device_keys.items():
            for device_id, d in devices.items():
                self.journal.devices[(user_id, device_id)] = DeviceRecord(
                    user_id, device_id, dict(d.keys), d.display_name or "", bool(d.deleted))

    def _set_trust(self, device: OlmDevice, state: TrustState,
                   only_from: TrustState | None = None) -> bool:
        key = (device.user_id, device.id)
        current = TrustState(self._trust.get(key, 0))
        if only_from is not None and current != only_from:
            return False  # as nio: "un-" only undoes that state
        device.trust_state = state
        self._trust[key] = state.value
        self.journal.trust[key] = state.value
        return True

    def _trust_of(self, device: OlmDevice) -> TrustState:
        state: TrustState = TrustState(self._trust.get((device.user_id, device.id), 0))
        return state

    def blacklist_device(self, device: OlmDevice) -> bool:
        return self._set_trust(device, TrustState.blacklisted)

    def unblacklist_device(self, device: OlmDevice) -> bool:
        return self._set_trust(device, TrustState.unset, TrustState.blacklisted)

    def verify_device(self, device: OlmDevice) -> bool:
        return self._set_trust(device, TrustState.verified)

    def unverify_device(self, device: OlmDevice) -> bool:
        return self._set_trust(device, TrustState.unset, TrustState.verified)

    def ignore_device(self, device: OlmDevice) -> bool:
        return self._set_trust(device, TrustState.ignored)

    def unignore_device(self, device: OlmDevice) -> bool:
        return self._set_trust(device, TrustState.unset, TrustState.ignored)

    def ignore_devices(self, devices: list[OlmDevice]) -> None:
        for device in devices:
            self._set_trust(device, TrustState.ignored)

    def is_device_verified(self, device: OlmDevice) -> bool:
        return bool(self._trust_of(device) == TrustState.verified)

    def is_device_blacklisted(self, device: OlmDevice) -> bool:
        return bool(self._trust_of(device) == TrustState.blacklisted)

    def is_device_ignored(self, device: OlmDevice) -> bool:
        return bool(self._trust_of(device) == TrustState.ignored)

    # Key requests

    def load_outgoing_key_requests(self) -> dict[str, OutgoingKeyRequest]:
        return {r.request_id: OutgoingKeyRequest.from_database(SimpleNamespace(
                    request_id=r.request_id, session_id=r.session_id, room_id=r.room_id,
                    algorithm=r.algorithm))
                for r in self._snap.key_requests}

    def add_outgoing_key_request(self, key_request: OutgoingKeyRequest) -> None:
        self.journal.key_requests[key_request.request_id] = KeyRequestRecord(
            key_request.request_id, key_request.session_id, key_request.room_id,
            key_request.algorithm)

    def remove_outgoing_key_request(self, key_request: OutgoingKeyRequest) -> None:
        self.journal.key_requests[key_request.request_id] = None

    # Rooms and sync tokens. nio records encrypted rooms only from /sync room state,
    # which the bridge never asks for (it reads rooms from transactions and marks
    # every room it speaks in encrypted itself): nothing to keep.

    def load_encrypted_rooms(self) -> set[str]:
        return set()

    def save_encrypted_rooms(self, rooms: Any) -> None:
        pass

    def delete_encrypted_room(self, room: str) -> None:
        pass

    def load_sync_token(self) -> str | None:
        """Where the device's last inbox catch-up ended (bridge.matrix.catchup)."""
        return self._sync_token

    def save_sync_token(self, token: str) -> None:
        self._sync_token = token
        self.journal.sync_token = token

    # What nio keeps in memory only; the bridge keeps it too (design §3).

    def restore(self, olm: Olm) -> None:
        """Give a new machine the outbound Megolm sessions and tracked users stored:
        it goes on encrypting with the session staff already have, and does not query
        the keys of users it knows again."""
        olm.tracked_users = set(self._tracked)
        for s in self._snap.outbound:
            session = OutboundGroupSession.from_pickle(s.pickle.encode(), self.pickle_key)
            session.creation_time = to_local(s.created_at)
            session.message_count = s.message_count
            session.shared = s.shared
            session.users_shared_with = set(s.shared_with)
            session.users_ignored = set(s.ignored)
            # Past every index the process that wrote the row may have used.
            while session.message_index < s.reserved_index:
                session._session.encrypt(b"")
                session.message_count += 1
            olm.outbound_group_sessions[s.room_id] = session
            self._outbound_marks[s.room_id] = _mark(session)
            self._reserved[s.room_id] = s.reserved_index

    def capture(self, olm: Olm) -> None:
        """Journal what changed in the machine's outbound sessions and tracked users."""
        tracked = set(olm.tracked_users)
        for user in tracked - self._tracked:
            self.journal.tracked[user] = True
        for user in self._tracked - tracked:
            self.journal.tracked[user] = False
        self._tracked = tracked
        sessions: dict[str, OutboundGroupSession] = olm.outbound_group_sessions
        for room_id in [r for r in self._outbound_marks if r not in sessions]:
            del self._outbound_marks[room_id]
            self._reserved.pop(room_id, None)
            self.journal.outbound[room_id] = None
        for room_id, session in sessions.items():
            mark = _mark(session)
            # Written when shared anew, or when the next message may use an index the
            # stored row has not reserved (message_index is the next one to use).
            if self._outbound_marks.get(room_id) == mark and \
                    session.message_index < self._reserved.get(room_id, 0):
                continue
            self._outbound_marks[room_id] = mark
            reserved = session.message_index + OUTBOUND_RESERVE
            self._reserved[room_id] = reserved
            self.journal.outbound[room_id] = OutboundRecord(
                room_id, session.id, session.pickle(self.pickle_key).decode(),
                to_utc(session.creation_time), session.message_count, bool(session.shared),
                tuple(sorted(session.users_shared_with)),
                tuple(sorted(session.users_ignored)), reserved)

    def take_journal(self) -> CryptoJournal:
        """The journal so far, for a flush; a fresh one takes the next writes."""
        journal, self.journal = self.journal, CryptoJournal()
        return journal

    def put_back(self, journal: CryptoJournal) -> None:
        """A flush failed: its entries go back under what was journaled since."""
        journal.merge_under(self.journal)
        self.journal = journal


def _mark(session: OutboundGroupSession) -> tuple[Any, ...]:
    """What changes when the session is replaced or shared (cheap to compare)."""
    return (session.id, session.shared, len(session.users_shared_with),
            len(session.users_ignored))
