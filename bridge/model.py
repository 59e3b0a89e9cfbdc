"""The records and state types of the core: small frozen dataclasses.

What the repositories (`bridge.db`) return, detached from any session, and what the
pure core (consent, relay and room policy) reasons about; this module imports no
storage or network library (tests/unit/test_core_imports.py). Callers never see ORM
rows, so nothing lazy-loads after its session has closed and no caller can change a
row by assigning to an attribute.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal, get_args

from bridge.types import DeviceID, EventID, Pseudonym, RoomID, UserID, WamidHash

ConsentState = Literal["unknown", "prompted", "granted", "withdrawn", "refused"]
ConsentPurpose = Literal["mirroring", "notices", "membership"]
# "room": a WhatsApp member's pseudonym in one agency room (bridge.rooms_wa).
GhostKind = Literal["bot", "citizen", "member", "room"]
RoomKind = Literal["team", "citizen", "announcement", "portal", "management"]
InboundSource = Literal["matrix", "whatsapp"]
# "dead": set aside after a permanent failure (a dead letter), until an admin retries
# (back to "pending") or discards it ("dropped", resp. "cancelled"); bridge.deadletters.
InboundStatus = Literal["pending", "held", "done", "failed", "dropped", "dead"]
OutboxStatus = Literal["pending", "sent", "failed", "cancelled", "dead"]
Direction = Literal["in", "out"]

# The same value sets, for CHECK constraints in the models and the migrations.
CONSENT_STATES: tuple[str, ...] = get_args(ConsentState)
CONSENT_PURPOSES: tuple[str, ...] = get_args(ConsentPurpose)
GHOST_KINDS: tuple[str, ...] = get_args(GhostKind)
ROOM_KINDS: tuple[str, ...] = get_args(RoomKind)
INBOUND_SOURCES: tuple[str, ...] = get_args(InboundSource)
INBOUND_STATUSES: tuple[str, ...] = get_args(InboundStatus)
OUTBOX_STATUSES: tuple[str, ...] = get_args(OutboxStatus)
DIRECTIONS: tuple[str, ...] = get_args(Direction)
# A WhatsApp citizen's place in an agency room (bridge.rooms_wa).
RoomMemberState = Literal["invited", "joined", "left", "declined"]
ROOM_MEMBER_STATES: tuple[str, ...] = get_args(RoomMemberState)
# Consent for one agency room is recorded with purpose ROOM_PURPOSE_PREFIX + room id.
ROOM_PURPOSE_PREFIX = "room:"


def room_purpose(room_id: str) -> ConsentPurpose:
    """The consent purpose of one agency room (the column also holds these, 0014)."""
    return ROOM_PURPOSE_PREFIX + room_id  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class Citizen:
    """A WhatsApp contact. Identifiers are ciphertext tokens that only `bridge.privacy` opens."""

    id: int
    index_hash: str
    identifier_ct: str
    wa_id_ct: str | None
    pseudonym_code: str
    ghost_user_id: UserID | None
    consent_state: ConsentState
    last_inbound_at: datetime | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class CitizenIdentifiers:
    """The encrypted columns of one citizen, for key rotation."""

    id: int
    identifier_ct: str
    wa_id_ct: str | None


@dataclass(frozen=True, slots=True)
class Ghost:
    """A Matrix user the appservice puppets (the bot, a citizen's ghost, a pseudonymous member)."""

    user_id: UserID
    device_id: DeviceID
    display_name: str
    kind: GhostKind
    citizen_id: int | None
    registered: bool
    cross_signing_ct: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Room:
    """A room the bridge created and controls."""

    room_id: RoomID
    kind: RoomKind
    name: str
    topic: str | None
    citizen_id: int | None
    created_by: UserID
    created_at: datetime
    closed_at: datetime | None


@dataclass(frozen=True, slots=True)
class InboundItem:
    """A received event or webhook entry, stored before it is acknowledged."""

    id: int
    source: InboundSource
    dedupe_key: str
    lane: str
    payload: str
    status: InboundStatus
    attempts: int
    error: str | None
    hold_until: datetime | None
    citizen_id: int | None
    created_at: datetime
    processed_at: datetime | None


@dataclass(frozen=True, slots=True)
class ConsentRecord:
    """One append-only entry of consent evidence."""

    id: int
    citizen_id: int | None  # None once the citizen has been erased; the pseudonym remains
    pseudonym: Pseudonym
    purpose: ConsentPurpose
    state: ConsentState
    notice_version: str
    notice_hash: str
    channel: str
    language: str | None
    evidence: str | None
    staff_id: UserID | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """A message to send to WhatsApp, persisted before the first attempt."""

    id: int
    idempotency_key: str
    citizen_id: int
    room_id: RoomID
    payload: str
    status: OutboxStatus
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    wamid_hash: WamidHash | None  # the message WhatsApp made of it (keyed hash)
    created_at: datetime
    updated_at: datetime
    sending_at: datetime | None = None  # an attempt in flight (or cut short by a crash)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A queued item set aside after a permanent failure; its payload stays encrypted in
    its queue row. `id` names the queue and the row ("in-12", "out-7").

    `source`, `lane_kind`, `reason` and the times are safe to show anywhere; `room_id`
    and `citizen_id` are for the bridge's own notice only (never listed)."""

    id: str
    source: str  # matrix, whatsapp (inbound queue) or outbox
    lane_kind: str  # room, citizen, statuses, global; outbox: staff, system, notice
    reason: str  # bridge.retry.DeadReason
    error: str | None  # the exception type or Graph status/code: no content
    attempts: int
    first_failed_at: datetime
    last_failed_at: datetime
    room_id: RoomID | None = None
    citizen_id: int | None = None
    lane: str = ""


@dataclass(frozen=True, slots=True)
class MessageLink:
    """A WhatsApp message id and the Matrix event it corresponds to. The wamid is kept
    as its keyed hash and a ciphertext (`Privacy.open_wamid` opens it)."""

    id: int
    wamid_hash: WamidHash
    wamid_ct: str
    room_id: RoomID
    event_id: EventID
    direction: Direction


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One link of the hash-chained audit log."""

    id: int
    at: datetime
    actor: str
    action: str
    object: str
    result: str
    reason: str | None
    prev_hash: str
    hash: str
    scheme: str = "hmac-sha256"
    key_id: str | None = None


@dataclass(frozen=True, slots=True)
class NoticeSubscription:
    """A citizen's subscription to notices: the code they give the sede electrónica."""

    citizen_id: int
    code: str
    state: ConsentState
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Notice:
    """One logged notice of availability (informative, not proof of notification)."""

    id: int
    reference: str
    citizen_id: int | None  # None once the citizen has been erased; the pseudonym remains
    pseudonym: Pseudonym
    template_name: str
    template_language: str
    template_version: str
    wamid_hash: WamidHash | None  # set once WhatsApp accepted it
    requested_by: str
    created_at: datetime
    sent_at: datetime | None
    delivered_at: datetime | None
    read_at: datetime | None
    failed_at: datetime | None
    error: str | None

    @property
    def status(self) -> str:
        """The furthest the notice got: queued, sent, delivered, read or failed."""
        if self.failed_at:
            return "failed"
        if self.read_at:
            return "read"
        if self.delivered_at:
            return "delivered"
        return "sent" if self.sent_at else "queued"


@dataclass(frozen=True, slots=True)
class StoredRoomKey:
    """A checkpoint of a bridge device's Megolm session; the key is still sealed."""

    id: int
    owner: UserID
    room_id: RoomID
    session_id: str
    message_index: int
    session_key_ct: str
    audience: tuple[str, ...]
    created_at: datetime


@dataclass(frozen=True, slots=True)
class RoomKeyDelivery:
    """The device with identity key `curve25519` has `session_id` from `message_index` on."""

    session_id: str
    curve25519: str
    message_index: int


@dataclass(frozen=True, slots=True)
class OwnerRoomKeys:
    """Everything kept for one owner's devices (`RoomKeyRepo.load`)."""

    keys: list[StoredRoomKey]
    deliveries: list[RoomKeyDelivery]


@dataclass(frozen=True, slots=True)
class RoomMember:
    """A WhatsApp citizen invited to (or taking part in) an agency room, as a separate
    pseudonym there: `display_name` is drawn at invitation (the citizen is told it),
    `ghost_user_id` exists once they accept."""

    id: int
    room_id: RoomID
    citizen_id: int
    state: RoomMemberState
    display_name: str
    ghost_user_id: UserID | None
    invited_by: str
    notice_hash: str
    chosen_at: datetime | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class RoomSettings:
    """Per-room admin switches for WhatsApp members."""

    room_id: RoomID
    whatsapp_allowed: bool
    relay_media: bool


@dataclass(frozen=True, slots=True)
class BacklogEntry:
    """A room message kept (encrypted) for a citizen while their 24 h window is closed."""

    id: int
    citizen_id: int
    room_id: RoomID
    event_key: str
    payload: str
    created_at: datetime


@dataclass(frozen=True)
class HeldStaffMessage:
    """A staff message held for confirmation; `payloads_ct` sealed, bound to `event_id`."""

    event_id: EventID
    room_id: RoomID
    held_at: datetime
    payloads_ct: str
