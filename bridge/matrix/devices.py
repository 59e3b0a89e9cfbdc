"""E2EE devices for the bot and the ghosts, one matrix-nio client each.

Why one device per ghost: staff clients then see each pseudonym's messages come from
that pseudonym's own device, not "sent by another user's device" (MISMATCHED_SENDER).

No device polls when the homeserver sends to-device events, device-list changes and key
counts in appservice transactions (MSC2409/MSC3202, bridge.matrix.crypto_feed): the bot and
every ghost are then fed from the transactions (`feed_to_device`, `users_changed`,
`key_counts`) and their task only wakes when something needs doing (a key upload or
query, earlier room keys owed to a new device). When it does not (the fallback, decided
once at start), each device keeps its own /sync: the bot long-polls, a ghost refreshes
before it sends and every GHOST_UPKEEP_SECONDS. Devices are opened lazily (the bot at
start, a ghost when it first speaks or receives a to-device event).

Rooms are not synced at all (the filter blocks them): the bridge reads every room event
from appservice transactions already. What a device needs of a room to encrypt into it
(who is joined or invited, the history visibility) is read with one GET /state when it
first sends there, and again after a transaction reports a membership or visibility
change (`Devices.room_changed`). A changed member list ends the room's Megolm session,
as nio does when it sees the change in a sync, so a removed member gets no later keys.

Devices are created with the as_token (`MatrixAPI.create_device`, MSC4190) and every
request a device's nio client makes carries the as_token with `?user_id=&device_id=`
(MSC3202 device masquerading): no device has a login or a token of its own.

Crypto state lives in the bridge's database (bridge.matrix.crypto: read when a device
opens, written by journal; no file, no shared volume), pickled with the store key
(bridge.matrix.storekey: random, wrapped by `privacy.data_key`, so rotating the data key
leaves the pickles alone), so it survives restarts and takeovers; the device id is fixed
per user (stored in the ghosts table) so keys are reused, never regenerated. The room
keys kept for staff devices that appear later (bridge.matrix.keyshare) are in the
bridge's database, sealed with the data key, and reloaded when a device opens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import nio
from prometheus_client import Gauge, Histogram

from bridge.db.crypto import CryptoRepo
from bridge.matrix.api import MatrixAPI, MatrixError, nio_failure
from bridge.matrix.crypto.journal import DeviceCrypto, session_fits
from bridge.matrix.keyforward import KeyForwarder
from bridge.matrix.keyshare import KeyTrust, LedgerStore
from bridge.matrix.keystore import RoomKeyStore
from bridge.matrix.send_gate import SendGate
from bridge.types import DeviceID, RoomID, UserID

if TYPE_CHECKING:
    from bridge.matrix.crypto_feed import CryptoFeed

log = logging.getLogger(__name__)
_UNLOCKED = asyncio.Lock()

# To-device messages, device-list changes and one-time-key counts only: no rooms (see the
# module docstring), presence or account data. Measured with bench/whatsapp_relay.py
# (5 citizens, 2 cores): when the bot's syncs carried room state (timeline filtered to
# state types), each sync made Synapse re-read every changed room and cost it 30-160 ms
# of CPU; relaying at full speed ran at 0.82 of a bare client's rate, 0.91-0.95 without
# rooms (bench/README.md). Synapse skips all room work for a filter that blocks every room.
SYNC_FILTER: dict[str, Any] = {
    "presence": {"not_types": ["*"]},
    "account_data": {"not_types": ["*"]},
    "room": {"rooms": []},
}
# The bot's long-poll timeout. Staff room keys (to-device) end a poll at once.
LONG_POLL_MS = 2_000
# A ghost's state is refreshed (one /sync without waiting) at least this often before
# it sends, and in the background so its one-time keys stay topped up.
GHOST_UPKEEP_SECONDS = 30.0

# Fed by transactions: one-time keys are topped up when fewer than this are left on the
# server (half of the 50 vodozemac keeps), so one upload serves 25 new Olm sessions.
OTK_LOW = 25
# Over `appservice.max_open_devices`, the least recently used devices are closed, but not
# one used within this many seconds (a caller may still hold it between open and send).
EVICT_GRACE_SECONDS = 5.0
# A low count this soon after a top-up may have been counted before it (the message
# that claimed a key and the room event it unlocks come in two transactions, both with
# the count): topping up again would put more keys on the server than the account
# keeps the private halves of.
COUNT_SETTLE_SECONDS = 5.0
# A fallback key reported used is replaced only once it is this old, as Element's
# (matrix-rust-sdk rotates weekly, X3DH's lower bound for a signed pre-key). The account
# keeps the private halves of its current fallback key and of the one before only
# (tests/unit/test_fallback_keys.py): a pre-key message encrypted to a key replaced twice
# since fails (SessionCreationException) and its room key is lost. Such messages arrive
# late: they wait in Synapse's appservice queue and in the recipient's to-device lane,
# while the counts of later transactions are acted on as they arrive. Replacing on every
# report 30 s apart lost the room keys of new devices in a burst (issue 16,
# tests/integration/test_bot_key_burst.py). Synapse keeps handing out a used fallback
# key, so keeping it costs only forward secrecy for the sessions made with it.
FALLBACK_MAX_AGE_SECONDS = 7 * 24 * 3600.0

# Called after a device's keys are on the server (used for cross-signing).
DeviceReadyHook = Callable[[UserID, DeviceID], Awaitable[None]]


class FileStores(Protocol):
    """The nio file stores of earlier versions (bridge.matrix.crypto.legacy)."""

    async def migrate_all(self) -> int: ...

    async def migrate_one(self, user_id: str) -> bool: ...


async def upload_keys(client: nio.AsyncClient, attempts: int = 5) -> None:
    """Upload the device's keys, recovering from an account that forgot an upload.

    nio saves the account only after the server answered; a crash or cancellation in
    between leaves the server holding one-time keys the saved account never published,
    and the account then draws new keys with the same ids, which the server refuses
    forever ("One time key ... already exists"). The clashing keys are dropped and fresh
    ones (with higher ids) drawn. The orphaned keys on the server are unusable: a sender
    that claims one cannot reach this device until it claims another.
    """
    olm = client.olm
    for _ in range(attempts):
        resp = await client.keys_upload()
        if not isinstance(resp, nio.KeysUploadError):
            return
        if olm is None or "already exists" not in (resp.message or ""):
            raise RuntimeError(f"key upload failed for a device: {resp.status_code}")
        log.warning("%s: the server has one-time keys this device forgot; drawing new ones",
                    client.user_id)
        olm.mark_keys_as_published()
        olm.save_account()
    raise RuntimeError("key upload failed for a device: one-time key ids keep clashing")


async def upload_fallback_key(client: nio.AsyncClient, api: MatrixAPI) -> None:
    """Give the device a new fallback key (nio has none): what senders get once its
    one-time keys run out, e.g. when claims were not followed by a message that would
    have reported the count (docs/e2ee.md).

    The account is saved with the unpublished key before the upload: a crash after the
    server took it then still finds it (`pending_fallback_key`) and uploads it again,
    instead of leaving the server with a key whose private half is lost.
    """
    olm = client.olm
    assert olm is not None
    account = olm.account._account
    if not account.fallback_key:
        account.generate_fallback_key()
        olm.save_account()
    await flush_crypto(client)  # stored before the server can hand it out
    keys: dict[str, Any] = {}
    for key_id, key in account.fallback_key.items():
        signed: dict[str, Any] = {"key": key.to_base64(), "fallback": True}
        signed["signatures"] = {client.user_id: {
            f"ed25519:{client.device_id}": olm.sign_json(signed)}}
        keys[f"signed_curve25519:{key_id}"] = signed
    await api.request("POST", "/_matrix/client/v3/keys/upload", as_user=client.user_id,
                      params={"device_id": client.device_id}, json={"fallback_keys": keys})
    account.mark_keys_as_published()
    olm.save_account()


async def flush_crypto(client: nio.AsyncClient) -> None:
    """Write the device's crypto journal now (bridge.matrix.crypto.journal)."""
    crypto = getattr(client, "crypto", None)
    if isinstance(crypto, DeviceCrypto):
        await crypto.flush()


def pending_fallback_key(client: nio.AsyncClient) -> bool:
    """A fallback key generated and saved, but not known to be on the server."""
    return client.olm is not None and bool(client.olm.account._account.fallback_key)


class AppserviceDeviceClient(nio.AsyncClient):  # type: ignore[misc]  # nio is untyped
    """A nio client that speaks for one device of a user of the bridge's namespace with
    the appservice's token: `user_id` and `device_id` go into every request's query.
    Its crypto journal is written before each request leaves (design §5.3 rule 1)."""

    crypto: DeviceCrypto | None = None
    gate: SendGate | None = None  # shared by the devices: room sends leave together

    async def _send(self, response_class: Any, method: str, path: str, *args: Any,
                    **kwargs: Any) -> Any:
        if self.crypto is not None:
            await self.crypto.flush()
        url = urlsplit(path)
        query = [(k, v) for k, v in parse_qsl(url.query, keep_blank_values=True)
                 if k not in ("user_id", "device_id")]
        query += [("user_id", self.user_id), ("device_id", self.device_id)]
        path = urlunsplit(url._replace(query=urlencode(query)))
        if self.gate is not None and response_class is nio.RoomSendResponse:
            async with self.gate.turn():  # encrypted already: only the request waits
                return await super()._send(response_class, method, path, *args, **kwargs)
        return await super()._send(response_class, method, path, *args, **kwargs)


class Device:
    """One nio client and its key maintenance.

    Fed by transactions (`fed`), it makes no request of its own accord: its task waits
    until woken (to-device events handled, key counts low, device lists or room members
    changed) and then does only what is due (key upload or query, earlier room keys
    owed); a send refreshes first if something was marked.

    In the fallback (the homeserver does not send those), the bot long-polls /sync: it
    must receive staff's room keys promptly to decrypt their messages. Ghosts only send,
    so they do not long-poll (every event in their rooms, their own echoes included,
    would wake the poll and cost Synapse and the bridge work per message); they refresh
    with a non-waiting /sync before sending when their view is stale or marked dirty
    (membership or device-list changes reported in appservice transactions), and every
    GHOST_UPKEEP_SECONDS in the background.
    """

    def __init__(self, client: nio.AsyncClient, api: MatrixAPI, long_poll: bool,
                 is_ours: Callable[[str], bool] = lambda _user: False,
                 key_store: LedgerStore | None = None,
                 key_trust: KeyTrust | None = None,
                 feed: CryptoFeed | None = None) -> None:
        self.client = client
        self.api = api
        self.long_poll = long_poll
        # Fed by transactions (no /sync) once `feed` says so; None: always /sync.
        self.feed = feed
        self.needs_fallback_key = False
        # When the fallback key on the server was made, as far as this process knows:
        # its age is not stored, so a device opened counts it as new (a restart or a
        # reopening never brings its replacement forward).
        self._fallback_since = asyncio.get_running_loop().time()
        self._keys_uploaded_at = float("-inf")
        # Room keys of earlier messages for staff devices that appear later.
        self.keys = KeyForwarder(client, is_ours, key_store, key_trust)
        self._wake = asyncio.Event()
        self.synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._upkeep_lock = asyncio.Lock()
        self._last_upkeep = float("-inf")
        self.dirty = True
        self._room_changes: dict[str, int] = {}  # per known room: changes reported so far
        self.last_used = asyncio.get_running_loop().time()
        self.busy = 0  # sends in progress: never closed under them

    def touch(self) -> None:
        self.last_used = asyncio.get_running_loop().time()

    @property
    def user_id(self) -> UserID:
        return UserID(self.client.user_id)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"sync {self.user_id}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        crypto = getattr(self.client, "crypto", None)
        if isinstance(crypto, DeviceCrypto):
            await crypto.close()
        await self.client.close()

    @property
    def fed(self) -> bool:
        """Fed by appservice transactions: this device never calls /sync."""
        return self.feed is not None and self.feed.appservice

    async def _loop(self) -> None:
        if self.feed is not None:
            await self.feed.decided.wait()
        backoff = 1.0
        while True:
            try:
                if self.fed:  # no timer: only what transactions or senders ask for
                    await self._wake.wait()
                    self._wake.clear()
                    await self.upkeep()
                elif self.long_poll:
                    await self.upkeep(timeout_ms=LONG_POLL_MS)
                else:
                    delay = max(0.0, self._last_upkeep + GHOST_UPKEEP_SECONDS
                                - asyncio.get_running_loop().time())
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), delay)
                    self._wake.clear()
                    if self.stale():
                        await self.upkeep()
                backoff = 1.0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("sync of %s: %s; retrying in %.0fs", self.user_id,
                            type(exc).__name__, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 60.0)

    def wake(self) -> None:
        """Refresh soon (a member joined: it may be owed earlier room keys)."""
        self.dirty = True
        self._wake.set()

    def stale(self) -> bool:
        if self.fed:
            return self.dirty
        age = asyncio.get_running_loop().time() - self._last_upkeep
        return self.dirty or age >= GHOST_UPKEEP_SECONDS

    async def upkeep(self, timeout_ms: int = 0) -> None:
        """One /sync (not when fed by transactions), then the key maintenance nio's
        sync_forever would do."""
        async with self._upkeep_lock:
            self.dirty = False
            if self.fed:
                try:
                    await self.maintain_keys()
                except BaseException:
                    self.dirty = True
                    raise
                self._last_upkeep = asyncio.get_running_loop().time()
                self.synced.set()
                await self.forward_keys()
                await flush_crypto(self.client)
                return
            resp = await self.client.sync(timeout=timeout_ms, sync_filter=SYNC_FILTER,
                                          full_state=not self.synced.is_set())
            if isinstance(resp, nio.SyncError):
                self.dirty = True
                raise RuntimeError(f"sync failed: {resp.status_code}")
            # nio ignores a server count of 0 after a restart and then never
            # refills one-time keys; senders would log "Missing Olm session".
            if resp.device_key_count.signed_curve25519 == 0 and self.client.olm:
                self.client.olm.uploaded_key_count = 0
            await self.maintain_keys()
            self._last_upkeep = asyncio.get_running_loop().time()
            self.synced.set()
            await self.forward_keys()
            await flush_crypto(self.client)

    async def forward_keys(self) -> None:
        """Send earlier room keys to devices that are owed them; never fails a send."""
        try:
            for room_id in self.keys.ledger.rooms():
                try:
                    await self.prepare_room(self.api, RoomID(room_id))
                except MatrixError as exc:
                    if exc.status not in (403, 404):
                        raise  # transient: the next upkeep tries again
                    # No longer readable by this device (left and forgotten, or gone):
                    # forwarding then forgets what was kept for it.
                    self.client.rooms.pop(room_id, None)
            await self.keys.forward()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("forwarding room keys of %s: %s", self.user_id, type(exc).__name__)

    def users_changed(self, users: set[str]) -> None:
        """Device lists changed (from a transaction): re-query before the next send."""
        olm = self.client.olm
        if olm is not None:
            tracked = users & set(olm.device_store.users)
            if tracked:
                olm.users_for_key_query.update(tracked)
                if self.keys.ledger.records and (self.fed or self.keys.trust is not None):
                    # A new device, or one just cross-signed, may be owed earlier keys:
                    # now, not at the next routine upkeep (there is none when fed).
                    self.wake()

    async def feed_to_device(self, events: list[dict[str, Any]]) -> None:
        """To-device events from a transaction: what nio does with those of a /sync
        (decrypt Olm, store room keys, run the to-device callbacks, which include the
        key forwarder's, collect key requests); then maintenance runs in the background
        (Olm sessions to repair, earlier room keys owed)."""
        batch = SimpleNamespace(to_device_events=[nio.ToDeviceEvent.parse_event(e)
                                                  for e in events])
        await self.client._handle_to_device(batch)
        if self.client.olm is not None:
            await self.client._collect_key_requests()
        await flush_crypto(self.client)  # new Olm sessions and room keys
        self.wake()

    def key_counts(self, otk: int | None = None,
                   fallback_unused: list[str] | None = None) -> None:
        """Counts from a transaction: top up below OTK_LOW one-time keys (nio's own
        test would top up after every claim, or never after a count of 0), and replace
        the fallback key once the server has none unused and it is
        FALLBACK_MAX_AGE_SECONDS old."""
        olm = self.client.olm
        if olm is None:
            return
        wake = False
        now = asyncio.get_running_loop().time()
        if otk is not None and otk < OTK_LOW and \
                now - self._keys_uploaded_at >= COUNT_SETTLE_SECONDS:
            olm.uploaded_key_count = otk
            wake = True
        if fallback_unused is not None and "signed_curve25519" not in fallback_unused \
                and now - self._fallback_since >= FALLBACK_MAX_AGE_SECONDS:
            self.needs_fallback_key = True
            wake = True
        if wake:
            self.wake()

    async def maintain_keys(self) -> None:
        """What nio's sync_forever does after each sync and a manual sync() does not."""
        c = self.client
        await c.send_to_device_messages()
        if c.should_upload_keys:
            try:
                await upload_keys(c)
                self._keys_uploaded_at = asyncio.get_running_loop().time()
            except RuntimeError as exc:  # not fatal: the keys on the server still serve
                log.warning("%s: %s", self.user_id, exc)
        if self.fed and (self.needs_fallback_key or pending_fallback_key(c)):
            await upload_fallback_key(c, self.api)
            self.needs_fallback_key = False
            self._fallback_since = asyncio.get_running_loop().time()
        if c.should_query_keys:
            await c.keys_query()
        if c.should_claim_keys:
            await c.keys_claim(c.get_users_for_key_claiming())

    async def prepare_room(self, api: MatrixAPI, room_id: RoomID) -> None:
        """Know who may read the room's next message: its history visibility and the
        members it lets read (nio encrypts for every user in `room.users`).

        Read from the room's state when the room is new to this device or marked
        changed. Invited members count where history is visible from invitation
        (portals): invited staff must get the room key too (nio's own fallback,
        `joined_members`, would leave them out). Where it is visible only from joining
        (agency rooms), they do not: they get the keys of what is sent after they join.
        If the members differ from what the device knew, its outbound Megolm session
        ends, so the next message goes out under a new key (nio does the same when a
        sync shows a membership change).
        """
        room = self.client.rooms.get(room_id)
        if room is not None and room.members_synced:
            return
        first_read = room is None
        if room is None:  # known from now on, so that changes reported meanwhile count
            room = nio.MatrixRoom(room_id, self.client.user_id, encrypted=True)
            self.client.rooms[room_id] = room
        room.encrypted = True  # every room the bridge speaks in is encrypted
        changes = self._room_changes.get(room_id, 0)
        state = await api.get_state(self.user_id, room_id)
        for event in state:
            if event.get("type") == "m.room.history_visibility":
                room.history_visibility = str(
                    event.get("content", {}).get("history_visibility", "shared"))
        # Who may read what is sent now: joined members, and invited ones unless history
        # is visible only from joining. Not knocks: asking to enter is not being let in.
        readers = ("join",) if room.history_visibility == "joined" else ("join", "invite")
        members: dict[str, dict[str, Any]] = {}
        for event in state:
            content = event.get("content", {})
            if event.get("type") == "m.room.member" and content.get("membership") in readers:
                members[str(event.get("state_key"))] = content
        if self.client.user_id not in members:
            # Left or removed: nothing more is encrypted or forwarded there.
            self.client.rooms.pop(room_id, None)
            self._room_changes.pop(room_id, None)
            if self.client.olm:
                self.client.invalidate_outbound_session(room_id)
            return
        known = {user_id: user_id in room.invited_users for user_id in room.users}
        wanted = {user_id: c.get("membership") == "invite" for user_id, c in members.items()}
        changed = {user_id for user_id in wanted if known.get(user_id) != wanted[user_id]}
        if known != wanted:
            for user_id in known:
                room.remove_member(user_id)
            for user_id, content in members.items():
                room.add_member(user_id, content.get("displayname"), content.get("avatar_url"),
                                invited=wanted[user_id])
            # New to this client (just opened): the session restored from the database
            # goes on if it reached exactly who may read now (no new room key for staff
            # after a restart or a takeover); else it ends, as on any member change.
            if self.client.olm and not (first_read and session_fits(
                    self.client.olm, room_id, set(wanted))):
                self.client.invalidate_outbound_session(room_id)
        # A change reported while the state was being read may be missing from it.
        room.members_synced = self._room_changes.get(room_id, 0) == changes
        if self.client.olm:
            self.client.olm.update_tracked_users(room)
            # Synapse reports device changes only between users who share a joined room:
            # a member who just joined may bring devices made while only invited.
            self.client.olm.users_for_key_query.update(changed)
        if self.client.should_query_keys:
            await self.client.keys_query()

    def room_changed(self, room_id: str) -> None:
        """Members or history visibility changed: read the room again before use."""
        room = self.client.rooms.get(room_id)
        if room is not None:
            self._room_changes[room_id] = self._room_changes.get(room_id, 0) + 1
            room.members_synced = False
            self.wake()

    async def send(self, api: MatrixAPI, room_id: RoomID, event_type: str,
                   content: dict[str, Any], txn_id: str | None = None) -> str:
        """Encrypt (if the room is encrypted) and send; returns the event id."""
        self.busy += 1
        try:
            if (self.fed or not self.long_poll) and self.stale():
                await self.upkeep()
            await self.prepare_room(api, room_id)
            if self.client.should_query_keys:
                # A new staff device: querying invalidates the outbound session, so the
                # next message's key reaches it; the earlier sessions' keys are forwarded.
                await self.client.keys_query()
                await self.forward_keys()
            await self.keys.before_send(room_id)
            resp = await self.client.room_send(room_id, event_type, content, tx_id=txn_id,
                                               ignore_unverified_devices=True)
            if isinstance(resp, nio.RoomSendError):
                raise nio_failure(resp, "send")
            return str(resp.event_id)
        finally:
            self.busy -= 1
            self.touch()

    def decrypt(self, event: dict[str, Any]) -> nio.Event | None:
        """Decrypt a raw m.room.encrypted event dict; None while the room key is missing."""
        parsed = nio.Event.parse_event(event)
        if not isinstance(parsed, nio.MegolmEvent):
            return None
        try:
            decrypted: nio.Event = self.client.decrypt_event(parsed)
            return decrypted
        except nio.EncryptionError:
            return None


class Devices:
    """Opens, caches and closes the E2EE devices of users in the bridge's namespace."""

    def __init__(self, api: MatrixAPI, crypto: CryptoRepo, pickle_key: str,
                 on_ready: DeviceReadyHook | None = None,
                 long_poll_user: UserID | None = None,
                 room_keys: RoomKeyStore | None = None,
                 key_trust: KeyTrust | None = None,
                 max_open: int = 500, open_gauge: Gauge | None = None,
                 file_stores: FileStores | None = None,
                 send_batches: Histogram | None = None) -> None:
        self._api = api
        # Moved into the database at start, or when a device still there opens.
        self.file_stores = file_stores
        self._max_open = max_open
        self._open_gauge = open_gauge
        # Who may have earlier room keys (None: any later device of a member).
        self._key_trust = key_trust
        # Where each device's key ledger outlives a restart (None: in memory only).
        self._room_keys = room_keys
        self._long_poll_user = long_poll_user
        self._crypto = crypto
        # nio pickles Olm/Megolm state with this passphrase (storekey.pickle_passphrase).
        self._pickle_key = pickle_key
        self._on_ready = on_ready
        # Open devices, at most `appservice.max_open_devices` idle ones (see _evict).
        self._devices: dict[UserID, Device] = {}
        # When each recently closed device was closed, and when each user's device list
        # last changed: a device reopened after no change of the users it knows needs
        # no key query. Bounded; a device not found here re-queries (after a restart too).
        self._closed_at: OrderedDict[UserID, float] = OrderedDict()
        self._lists_changed_at: dict[str, float] = {}
        # Users in the bridge's namespace (set by Ghosts): never sent earlier room keys.
        self.is_ours: Callable[[str], bool] = lambda _user: False
        self._opening: dict[UserID, asyncio.Lock] = {}
        # Set by CryptoFeed: devices are fed by transactions once it decides so.
        self.feed: CryptoFeed | None = None
        # Key counts reported for closed devices that need action (low one-time keys,
        # no unused fallback key), applied when the device opens.
        self._pending_counts: dict[tuple[str, str], dict[str, Any]] = {}
        # One for all devices: a room send that finds others in flight leaves with the
        # next batch (group commit; bridge.matrix.send_gate).
        self.send_gate = SendGate(
            on_batch=send_batches.observe if send_batches is not None else None)

    def get_open(self, user_id: UserID) -> Device | None:
        return self._devices.get(user_id)


    def wake_all(self) -> None:
        """The transport changed (bridge.matrix.crypto_feed): each device's task looks
        again at how it is fed."""
        for device in self._devices.values():
            device.wake()

    def room_changed(self, room_id: str) -> None:
        """Someone joined, left or was invited: devices in the room refresh first."""
        for device in self._devices.values():
            device.room_changed(room_id)

    def users_changed(self, users: set[str]) -> None:
        now = asyncio.get_running_loop().time()
        for user in users:
            self._lists_changed_at[user] = now
        if self._key_trust is not None:  # e.g. a device was just cross-signed
            self._key_trust.users_changed(users)
        for device in self._devices.values():
            device.users_changed(users)

    def key_counts(self, user_id: str, device_id: str, otk: int | None = None,
                   fallback_unused: list[str] | None = None) -> None:
        device = self._devices.get(UserID(user_id))
        if device is not None and device.client.device_id == device_id:
            device.key_counts(otk, fallback_unused)
            return
        # Each reported value replaces the one kept: kept only while it needs action.
        key = (user_id, device_id)
        pending = self._pending_counts.get(key, {})
        if otk is not None:
            if otk < OTK_LOW:
                pending["otk"] = otk
            else:
                pending.pop("otk", None)
        if fallback_unused is not None:
            if "signed_curve25519" not in fallback_unused:
                pending["fallback_unused"] = fallback_unused
            else:
                pending.pop("fallback_unused", None)
        if pending:
            self._pending_counts[key] = pending
        else:
            self._pending_counts.pop(key, None)

    async def open(self, user_id: UserID, device_id: DeviceID) -> Device:
        """The user's device, created on the server, keys uploaded, its task running."""
        lock = self._opening.setdefault(user_id, asyncio.Lock())
        async with lock:
            if (device := self._devices.get(user_id)) is not None:
                device.touch()
                return device
            client = await self._client(user_id, device_id)
            try:
                device = await self._make_ready(client, user_id, device_id)
                await flush_crypto(client)  # a new account, keys just published
            except BaseException:
                await client.close()  # not cached: the next open tries again
                raise
            self._devices[user_id] = device
            self._closed_at.pop(user_id, None)
            self._count()
            log.info("device open for %s", user_id)
        await self._evict()
        return device

    async def _client(self, user_id: UserID, device_id: DeviceID) -> nio.AsyncClient:
        """The device's nio client on its state in the database, the device created on
        the server if its keys never were uploaded (one reopened after eviction or
        taken over from another process was: no request)."""
        snapshot = await self._crypto.load(user_id)
        if snapshot.device_id is None and self.file_stores is not None and \
                await self.file_stores.migrate_one(user_id):
            snapshot = await self._crypto.load(user_id)  # never a new account instead
        crypto = DeviceCrypto(self._crypto, user_id, device_id, self._pickle_key, snapshot)
        client = AppserviceDeviceClient(
            self._api.url, user_id, device_id, store_path="",
            # No stored sync tokens: a restart simply starts with one initial sync.
            config=nio.AsyncClientConfig(encryption_enabled=True, store_sync_tokens=False,
                                         pickle_key=self._pickle_key),
        )
        # A store already set: restore_login loads none of its own (nio's would be a
        # file); the machine is built on ours.
        client.store = crypto.store
        client.restore_login(user_id, device_id, self._api.as_token)
        client.olm = crypto.machine()
        client.crypto = crypto
        client.gate = self.send_gate
        if client.olm is None or not client.olm.account.shared:
            try:
                await self._api.create_device(user_id, device_id)
            except BaseException:
                await client.close()
                raise
        return client

    async def _make_ready(self, client: nio.AsyncClient, user_id: UserID,
                          device_id: DeviceID) -> Device:
        # Closed by eviction in this process: its keys, cross-signing and what it was
        # owed were in order then, so only what changed since needs a request.
        # Device-list changes reach open devices only: those of the users this one
        # knows that changed while it was closed (all of them, if we do not know when
        # it closed) are read again before it next encrypts or forwards.
        reopened = user_id in self._closed_at
        changed = self._changed_while_closed(
            user_id, client.olm.device_store.users if client.olm is not None else ())
        if client.olm is not None and self.feed is not None:
            client.olm.users_for_key_query.update(changed)
        device = Device(client, self._api, long_poll=user_id == self._long_poll_user,
                        is_ours=lambda user: self.is_ours(user),
                        key_store=self._room_keys.owner(user_id) if self._room_keys
                        else None, key_trust=self._key_trust, feed=self.feed)
        # Before anything is sent or forwarded: what was kept before a restart.
        if restored := await device.keys.restore():
            log.info("%s: %d room key checkpoint(s) restored", user_id, restored)
        if client.should_upload_keys or pending_fallback_key(client):
            new_account = client.olm is not None and not client.olm.account.shared
            if client.should_upload_keys:
                await upload_keys(client)
            if new_account or pending_fallback_key(client):
                # A new device gets its fallback key with its first keys.
                await upload_fallback_key(client, self._api)
        if pending := self._pending_counts.pop((user_id, device_id), None):
            device.key_counts(pending.get("otk"), pending.get("fallback_unused"))
        if self._on_ready and not reopened:
            await self._on_ready(user_id, device_id)
        device.start()
        if restored and (changed or not reopened):
            # Earlier room keys kept for later devices: forward what is owed now
            # (fed by transactions, nothing else would wake a device just opened).
            # Reopened with no device list changed meanwhile, nothing new is owed.
            device.wake()
        return device

    def _changed_while_closed(self, user_id: UserID, users: Any) -> set[str]:
        closed_at = self._closed_at.get(user_id)
        if closed_at is None:
            return set(users)
        return {u for u in users if self._lists_changed_at.get(u, float("-inf")) >= closed_at}

    async def _evict(self) -> None:
        """Close the least recently used devices while more than `max_open` are open
        (never the bot, one in use, or one used in the last EVICT_GRACE_SECONDS). Their
        state stays in the store; the next `open` reads it back without a request."""
        now = asyncio.get_running_loop().time()
        ghosts = len(self._devices) - (self._long_poll_user in self._devices)
        excess = ghosts - self._max_open  # the bot is always open and not counted
        for user_id, device in sorted(self._devices.items(), key=lambda i: i[1].last_used):
            if excess <= 0 or now - device.last_used < EVICT_GRACE_SECONDS:
                break  # the rest were used more recently still
            if self._closable(user_id, device):
                await self._close_one(user_id, device)
                excess -= 1

    async def evict_idle(self, idle_seconds: float) -> int:
        """Close the devices not used for `idle_seconds` (not the bot); how many."""
        now = asyncio.get_running_loop().time()
        idle = [(u, d) for u, d in self._devices.items()
                if now - d.last_used >= idle_seconds and self._closable(u, d)]
        for user_id, device in idle:
            await self._close_one(user_id, device)
        return len(idle)

    def _closable(self, user_id: UserID, device: Device) -> bool:
        """Not the bot, not sending, not being opened."""
        return (user_id != self._long_poll_user and not device.busy
                and not self._opening.get(user_id, _UNLOCKED).locked())

    async def _close_one(self, user_id: UserID, device: Device) -> None:
        if self._devices.get(user_id) is not device:
            return
        del self._devices[user_id]
        self._closed_at[user_id] = asyncio.get_running_loop().time()
        while len(self._closed_at) > 10 * self._max_open:
            self._closed_at.popitem(last=False)
        if (lock := self._opening.get(user_id)) is not None and not lock.locked():
            del self._opening[user_id]  # no lock kept per citizen ever seen
        self._count()
        await device.stop()
        log.info("device closed for %s (idle)", user_id)

    def _count(self) -> None:
        if self._open_gauge is not None:
            self._open_gauge.set(len(self._devices))

    async def forget(self, user_id: UserID) -> None:
        """Close the user's device and delete its crypto state and the room keys kept
        for later devices (the account is gone)."""
        device = self._devices.pop(user_id, None)
        if device is not None:
            await device.stop()
        await self._crypto.delete_owner(user_id)
        if self._room_keys is not None:
            await self._room_keys.forget(user_id)

    async def close(self) -> None:
        devices, self._devices = list(self._devices.values()), {}
        await asyncio.gather(*(d.stop() for d in devices), return_exceptions=True)
