"""Declarative models: the schema as the code expects it after the newest migration.

The migrations in `migrations/versions/` are written by hand and must produce exactly
this schema; `tests/integration/test_storage_schema.py` compares the two on every backend.
Only portable types are used so the same schema runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from bridge.model import (
    CONSENT_PURPOSES,
    CONSENT_STATES,
    DIRECTIONS,
    GHOST_KINDS,
    INBOUND_SOURCES,
    INBOUND_STATUSES,
    OUTBOX_STATUSES,
    ROOM_KINDS,
    ROOM_MEMBER_STATES,
    ROOM_PURPOSE_PREFIX,
)

# Deterministic constraint names, so a later migration can drop or alter them by name.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ID = String(255)  # Matrix IDs are at most 255 bytes
HEX64 = String(64)  # sha256 / HMAC-SHA256 hex digests
# A wamid's keyed hash (bridge.privacy.KeyedIndex.wamid). 255, not 64: revision 0010
# renamed the clear `wamid` columns in place, and a row from before it holds its wamid
# here until the bridge's next start hashes it (bridge.legacy_wamids).
WAMID_HASH = String(255)


def one_of(column: str, values: tuple[str, ...]) -> str:
    """SQL for a CHECK that `column` holds one of `values` (shared with the migrations)."""
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend.

    SQLite has no time zone type and gives back naive values; PostgreSQL stores
    `timestamptz`. Naive datetimes are refused on the way in because their zone is a guess.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime; pass an aware one (datetime.now(UTC))")
        value = value.astimezone(UTC)
        # SQLite would drop the offset anyway; naive UTC everywhere keeps text order = time order.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


# The fixed purposes, or one agency room's (shared with migration 0014).
PURPOSE_CHECK = (f"{one_of('purpose', CONSENT_PURPOSES)} "
                 f"OR purpose LIKE '{ROOM_PURPOSE_PREFIX}%'")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class CitizenRow(Base):
    __tablename__ = "citizens"
    __table_args__ = (
        CheckConstraint(one_of("consent_state", CONSENT_STATES), name="consent_state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    index_hash: Mapped[str] = mapped_column(HEX64, unique=True)
    identifier_ct: Mapped[str] = mapped_column(Text)
    wa_id_ct: Mapped[str | None] = mapped_column(Text)
    pseudonym_code: Mapped[str] = mapped_column(String(32), unique=True)
    ghost_user_id: Mapped[str | None] = mapped_column(ID, unique=True)
    consent_state: Mapped[str] = mapped_column(String(16))
    last_inbound_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class GhostRow(Base):
    __tablename__ = "ghosts"
    __table_args__ = (CheckConstraint(one_of("kind", GHOST_KINDS), name="kind"),)

    user_id: Mapped[str] = mapped_column(ID, primary_key=True)
    device_id: Mapped[str] = mapped_column(ID)
    display_name: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(16))
    # SET NULL: the link to the person never outlives the citizen row (erasure also
    # deactivates the ghost's account and deletes this record: Ghosts.retire).
    citizen_id: Mapped[int | None] = mapped_column(
        ForeignKey("citizens.id", ondelete="SET NULL"), index=True
    )
    registered: Mapped[bool] = mapped_column(Boolean)
    cross_signing_ct: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class RoomRow(Base):
    __tablename__ = "rooms"
    __table_args__ = (CheckConstraint(one_of("kind", ROOM_KINDS), name="kind"),)

    room_id: Mapped[str] = mapped_column(ID, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(255))
    topic: Mapped[str | None] = mapped_column(Text)
    citizen_id: Mapped[int | None] = mapped_column(
        ForeignKey("citizens.id", ondelete="SET NULL"), index=True
    )
    created_by: Mapped[str] = mapped_column(ID)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ProcessedTransactionRow(Base):
    __tablename__ = "processed_transactions"

    txn_id: Mapped[str] = mapped_column(ID, primary_key=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class InboundRow(Base):
    __tablename__ = "inbound"
    __table_args__ = (
        UniqueConstraint("source", "dedupe_key"),
        CheckConstraint(one_of("source", INBOUND_SOURCES), name="source"),
        CheckConstraint(one_of("status", INBOUND_STATUSES), name="status"),
        Index("ix_inbound_status_id", "status", "id"),
        Index("ix_inbound_source_status_lane_id", "source", "status", "lane", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(16))
    # WhatsApp items: "msg:<wamid hash>", "status:<wamid hash>:<status>" (revision 0010).
    dedupe_key: Mapped[str] = mapped_column(ID)
    # Items of one lane (a room, a citizen's keyed hash) are processed in order, one at
    # a time; "" is the global lane: such an item runs alone, after everything older.
    lane: Mapped[str] = mapped_column(ID, server_default="")
    payload: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    hold_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # CASCADE: a citizen's erasure must take their held and queued messages with it.
    citizen_id: Mapped[int | None] = mapped_column(
        ForeignKey("citizens.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    processed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Failure bookkeeping (revision 0007): the first and the latest failed attempt of the
    # current run of failures, and why a dead letter was set aside (bridge.retry).
    first_failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    dead_reason: Mapped[str | None] = mapped_column(String(32))


class ConsentRecordRow(Base):
    __tablename__ = "consent_records"
    __table_args__ = (
        CheckConstraint(PURPOSE_CHECK, name="purpose"),
        CheckConstraint(one_of("state", CONSENT_STATES), name="state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # SET NULL: consent evidence outlives an erased citizen; the pseudonym identifies it.
    citizen_id: Mapped[int | None] = mapped_column(
        ForeignKey("citizens.id", ondelete="SET NULL"), index=True
    )
    pseudonym: Mapped[str] = mapped_column(String(255))
    # "room:<room id>" for an agency room's consent (revision 0014): a Matrix ID's length.
    purpose: Mapped[str] = mapped_column(ID)
    state: Mapped[str] = mapped_column(String(16))
    notice_version: Mapped[str] = mapped_column(String(64))
    notice_hash: Mapped[str] = mapped_column(HEX64)
    channel: Mapped[str] = mapped_column(String(32))
    language: Mapped[str | None] = mapped_column(String(16))
    # A citizen's message: "wamid-hmac:<its keyed hash>" (revision 0010), never the wamid.
    evidence: Mapped[str | None] = mapped_column(String(255))
    staff_id: Mapped[str | None] = mapped_column(ID)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class OutboxRow(Base):
    __tablename__ = "outbox"
    __table_args__ = (
        CheckConstraint(one_of("status", OUTBOX_STATUSES), name="status"),
        Index("ix_outbox_status_next_attempt_at", "status", "next_attempt_at"),
        Index("ix_outbox_status_id", "status", "id"),  # claims, in queue order
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(ID, unique=True)
    citizen_id: Mapped[int] = mapped_column(
        ForeignKey("citizens.id", ondelete="CASCADE"), index=True
    )
    room_id: Mapped[str] = mapped_column(ID)
    payload: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    wamid_hash: Mapped[str | None] = mapped_column(WAMID_HASH, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # When the attempt now in flight began (NULL when none is): set before Graph is
    # called, cleared by its outcome; still set after a crash mid-send (revision 0005).
    sending_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # As on `inbound` (revision 0007).
    first_failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    dead_reason: Mapped[str | None] = mapped_column(String(32))


class NoticeSubscriptionRow(Base):
    """A citizen's subscription to notices of availability: their code and consent state."""

    __tablename__ = "notice_subscriptions"
    __table_args__ = (CheckConstraint(one_of("state", CONSENT_STATES), name="state"),)

    # CASCADE: the subscription code goes with an erased citizen.
    citizen_id: Mapped[int] = mapped_column(
        ForeignKey("citizens.id", ondelete="CASCADE"), primary_key=True
    )
    code: Mapped[str] = mapped_column(String(32), unique=True)
    state: Mapped[str] = mapped_column(String(16))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class NoticeRow(Base):
    """The log of notices of availability: informative, never proof of notification."""

    __tablename__ = "notices"
    __table_args__ = (UniqueConstraint("pseudonym", "reference"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    reference: Mapped[str] = mapped_column(String(128), index=True)
    # SET NULL: the log entry outlives an erased citizen; the pseudonym identifies it.
    citizen_id: Mapped[int | None] = mapped_column(
        ForeignKey("citizens.id", ondelete="SET NULL"), index=True
    )
    pseudonym: Mapped[str] = mapped_column(String(255))
    template_name: Mapped[str] = mapped_column(String(512))
    template_language: Mapped[str] = mapped_column(String(16))
    template_version: Mapped[str] = mapped_column(String(64))
    # Looked up by delivery statuses; never shown (the admin API says whether there is one).
    wamid_hash: Mapped[str | None] = mapped_column(WAMID_HASH, index=True)
    requested_by: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    read_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    error: Mapped[str | None] = mapped_column(String(255))


class MessageMapRow(Base):
    __tablename__ = "message_map"
    __table_args__ = (CheckConstraint(one_of("direction", DIRECTIONS), name="direction"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Found by the hash (statuses, replies, reactions, edits, revokes); the ciphertext
    # (privacy.wamid_aad) is what goes back to Graph as a reply's or reaction's target.
    wamid_hash: Mapped[str] = mapped_column(WAMID_HASH, unique=True)
    wamid_ct: Mapped[str] = mapped_column(Text)
    room_id: Mapped[str] = mapped_column(ID)
    event_id: Mapped[str] = mapped_column(ID, unique=True)
    direction: Mapped[str] = mapped_column(String(8))
    # When the pair was linked: the retention purge (retention.message_map_days) goes by it.
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class AuditRow(Base):
    __tablename__ = "audit_log"
    # Never reuse an id on SQLite, even after the newest row was deleted.
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(String(255))
    action: Mapped[str] = mapped_column(String(64))
    object: Mapped[str] = mapped_column(String(255))
    result: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(HEX64)
    hash: Mapped[str] = mapped_column(HEX64)
    # How `hash` is computed (bridge.auditchain): "sha256" for entries written before
    # audit.key existed, "hmac-sha256" since; `key_id` names the audit key.
    scheme: Mapped[str] = mapped_column(String(16), server_default="sha256")
    key_id: Mapped[str | None] = mapped_column(String(16))


class KVRow(Base):
    __tablename__ = "kv"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class RoomKeyRow(Base):
    """A signed Megolm session key one of the bridge's devices created, at the index from
    which `audience` may read (bridge.matrix.keyshare): later staff devices get it."""

    __tablename__ = "room_keys"
    __table_args__ = (UniqueConstraint("owner", "session_id", "message_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(ID)  # the bridge user whose device made the session
    room_id: Mapped[str] = mapped_column(ID)
    session_id: Mapped[str] = mapped_column(ID)
    message_index: Mapped[int] = mapped_column(Integer)
    # Decrypts the room's messages from `message_index` on: sealed with the data key.
    session_key_ct: Mapped[str] = mapped_column(Text)
    audience: Mapped[str] = mapped_column(Text)  # JSON list of Matrix user IDs
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class RoomKeyDeliveryRow(Base):
    """Which device already has which of an owner's sessions, from which index on."""

    __tablename__ = "room_key_deliveries"
    __table_args__ = (UniqueConstraint("owner", "session_id", "curve25519"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(ID)
    session_id: Mapped[str] = mapped_column(ID)
    curve25519: Mapped[str] = mapped_column(ID)
    message_index: Mapped[int] = mapped_column(Integer)


# --- WhatsApp members of agency rooms (revision 0014, bridge.rooms_wa) --------------------


class RoomMemberRow(Base):
    """A WhatsApp citizen's place in one agency room, under a pseudonym of its own."""

    __tablename__ = "wa_room_members"
    __table_args__ = (
        UniqueConstraint("room_id", "citizen_id"),
        CheckConstraint(one_of("state", ROOM_MEMBER_STATES), name="state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    room_id: Mapped[str] = mapped_column(ID, index=True)
    # CASCADE: erasing a citizen takes their memberships with them.
    citizen_id: Mapped[int] = mapped_column(
        ForeignKey("citizens.id", ondelete="CASCADE"), index=True
    )
    state: Mapped[str] = mapped_column(String(16))
    display_name: Mapped[str] = mapped_column(String(255))
    ghost_user_id: Mapped[str | None] = mapped_column(ID, unique=True)
    invited_by: Mapped[str] = mapped_column(ID)
    # sha256 of the invitation text the citizen was shown (consent evidence).
    notice_hash: Mapped[str] = mapped_column(HEX64)
    # When the citizen last chose this room for their replies (quote or list).
    chosen_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class RoomSettingsRow(Base):
    """Admin switches per room; no row = the defaults (`rooms.*` in the config)."""

    __tablename__ = "wa_room_settings"

    room_id: Mapped[str] = mapped_column(ID, primary_key=True)
    whatsapp_allowed: Mapped[bool] = mapped_column(Boolean)
    relay_media: Mapped[bool] = mapped_column(Boolean)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class RoomBacklogRow(Base):
    """Room messages waiting for a citizen's 24 h window to open again (encrypted)."""

    __tablename__ = "wa_room_backlog"
    __table_args__ = (UniqueConstraint("citizen_id", "event_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    citizen_id: Mapped[int] = mapped_column(
        ForeignKey("citizens.id", ondelete="CASCADE"), index=True
    )
    room_id: Mapped[str] = mapped_column(ID)
    event_key: Mapped[str] = mapped_column(ID)
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class RoomMessageRow(Base):
    """Which room event a WhatsApp message to or from a room member stands for: one
    event reaches many members, each with its own wamid (quote routing, replies)."""

    __tablename__ = "wa_room_messages"
    __table_args__ = (Index("ix_wa_room_messages_event_id_citizen_id", "event_id",
                            "citizen_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Like message_map (revision 0010): found by the keyed hash (quote routing,
    # replies), the ciphertext (privacy.wamid_aad) is what goes back to Graph as a
    # quoted message's id; never the wamid itself (it embeds the number).
    wamid_hash: Mapped[str] = mapped_column(WAMID_HASH, unique=True)
    wamid_ct: Mapped[str] = mapped_column(Text)
    citizen_id: Mapped[int] = mapped_column(
        ForeignKey("citizens.id", ondelete="CASCADE"), index=True
    )
    room_id: Mapped[str] = mapped_column(ID)
    event_id: Mapped[str] = mapped_column(ID)
    # The retention purge (retention.message_map_days) goes by it.
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class HeldStaffMessageRow(Base):
    """A staff message to a citizen held until staff confirm it (it looks like it holds a
    DNI, an IBAN...: bridge.whatsapp.outbound); it expires with the 24-hour window."""

    __tablename__ = "held_staff_messages"

    event_id: Mapped[str] = mapped_column(ID, primary_key=True)
    room_id: Mapped[str] = mapped_column(ID, index=True)  # the portal it was written in
    held_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    # The WhatsApp payloads it becomes, sealed with the data key, bound to the event id.
    payloads_ct: Mapped[str] = mapped_column(Text)


class MuteRow(Base):
    """A member muted in a room, with the power level to give back on unmute."""

    __tablename__ = "mutes"

    room_id: Mapped[str] = mapped_column(ID, primary_key=True)
    user_id: Mapped[str] = mapped_column(ID, primary_key=True, index=True)
    previous_level: Mapped[int | None] = mapped_column(Integer)
    muted_at: Mapped[datetime] = mapped_column(UTCDateTime)


class ReactionRow(Base):
    """The Matrix reaction a citizen's ghost sent for a WhatsApp reaction, so that taking
    the reaction back on WhatsApp redacts it (bridge.whatsapp.mirror)."""

    __tablename__ = "reactions"

    ghost_user_id: Mapped[str] = mapped_column(ID, primary_key=True)
    target_event_id: Mapped[str] = mapped_column(ID, primary_key=True)
    reaction_event_id: Mapped[str] = mapped_column(ID)


# E2EE crypto state of the bridge's devices (bot and ghosts), issue 16 point 2. What
# matrix-nio kept in one SQLite file per device under `appservice.store_dir`; read and
# written by bridge.db.crypto, used through bridge.matrix.crypto.store. Every `pickle`
# is a vodozemac pickle made with the store key's passphrase (bridge.matrix.storekey):
# authenticated encryption, sealed as the file stores were; rotating the data key
# re-wraps the store key only. Rows are per owner (the device's user) except the
# device directory, which every owner shares (staff devices are the same for all).


class CryptoAccountRow(Base):
    """A device's Olm account: its identity keys and unpublished one-time keys."""

    __tablename__ = "crypto_accounts"

    user_id: Mapped[str] = mapped_column(ID, primary_key=True)
    device_id: Mapped[str] = mapped_column(ID)
    pickle: Mapped[str] = mapped_column(Text)
    shared: Mapped[bool] = mapped_column(Boolean)  # its identity keys are on the server
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Where the device's last inbox catch-up ended (bridge.matrix.catchup).
    sync_token: Mapped[str | None] = mapped_column(Text)
    # The file store it was moved from (bridge.matrix.crypto.legacy), if any.
    migrated_from: Mapped[str | None] = mapped_column(Text)


class CryptoOlmSessionRow(Base):
    """An Olm (1:1) session of a device with another device (`sender_key`)."""

    __tablename__ = "crypto_olm_sessions"

    user_id: Mapped[str] = mapped_column(ID, primary_key=True)
    session_id: Mapped[str] = mapped_column(ID, primary_key=True)
    sender_key: Mapped[str] = mapped_column(ID)
    pickle: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime] = mapped_column(UTCDateTime)


class CryptoMegolmInboundRow(Base):
    """A room key a device received: it decrypts staff messages of `room_id`."""

    __tablename__ = "crypto_megolm_inbound"

    user_id: Mapped[str] = mapped_column(ID, primary_key=True)
    session_id: Mapped[str] = mapped_column(ID, primary_key=True)
    sender_key: Mapped[str] = mapped_column(ID)
    signing_key: Mapped[str] = mapped_column(ID)
    room_id: Mapped[str] = mapped_column(ID)
    pickle: Mapped[str] = mapped_column(Text)
    forwarding_chain: Mapped[str] = mapped_column(Text)  # JSON list of curve25519 keys


class CryptoMegolmOutboundRow(Base):
    """The Megolm session a device encrypts a room's messages with (nio keeps it in
    memory only: persisted, a restart or takeover goes on with it instead of sharing a
    new one)."""

    __tablename__ = "crypto_megolm_outbound"

    user_id: Mapped[str] = mapped_column(ID, primary_key=True)
    room_id: Mapped[str] = mapped_column(ID, primary_key=True)
    session_id: Mapped[str] = mapped_column(ID)
    pickle: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    message_count: Mapped[int] = mapped_column(Integer)
    shared: Mapped[bool] = mapped_column(Boolean)
    shared_with: Mapped[str] = mapped_column(Text)  # JSON [[user, device], ...]
    ignored: Mapped[str] = mapped_column(Text)  # JSON [[user, device], ...]
    # The first message index a device restored from this row may use: the row is
    # written again only when the session gets there (bridge.matrix.crypto.store).
    reserved_index: Mapped[int] = mapped_column(Integer)


class CryptoDeviceRow(Base):
    """A device of a Matrix user as /keys/query showed it (shared by every owner)."""

    __tablename__ = "crypto_devices"

    user_id: Mapped[str] = mapped_column(ID, primary_key=True)
    device_id: Mapped[str] = mapped_column(ID, primary_key=True)
    curve25519: Mapped[str | None] = mapped_column(ID, index=True)
    keys: Mapped[str] = mapped_column(Text)  # JSON {"curve25519": ..., "ed25519": ...}
    display_name: Mapped[str] = mapped_column(Text)
    deleted: Mapped[bool] = mapped_column(Boolean)


class CryptoDeviceTrustRow(Base):
    """How one owner's device trusts another device (nio's TrustState value)."""

    __tablename__ = "crypto_device_trust"

    owner: Mapped[str] = mapped_column(ID, primary_key=True)
    user_id: Mapped[str] = mapped_column(ID, primary_key=True)
    device_id: Mapped[str] = mapped_column(ID, primary_key=True)
    state: Mapped[int] = mapped_column(Integer)


class CryptoTrackedUserRow(Base):
    """A user whose device list an owner's device follows (nio's `tracked_users`: its
    devices are loaded with the owner's machine)."""

    __tablename__ = "crypto_tracked_users"

    owner: Mapped[str] = mapped_column(ID, primary_key=True)
    user_id: Mapped[str] = mapped_column(ID, primary_key=True)


class CryptoKeyRequestRow(Base):
    """A room key a device asked other devices for and has not received yet."""

    __tablename__ = "crypto_key_requests"

    owner: Mapped[str] = mapped_column(ID, primary_key=True)
    request_id: Mapped[str] = mapped_column(ID, primary_key=True)
    session_id: Mapped[str] = mapped_column(ID)
    room_id: Mapped[str] = mapped_column(ID)
    algorithm: Mapped[str] = mapped_column(ID)
