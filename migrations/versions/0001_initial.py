"""Initial schema: citizens, ghosts, rooms, queues, consent, message map, audit log, kv.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Hand-written; never edit once landed. Constraint names follow the naming convention
in bridge/db/models.py so later revisions can address them by name.
"""

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.String(255)
HEX64 = sa.String(64)


def _ts(name: str, nullable: bool = False) -> "sa.Column[datetime]":
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _one_of(table: str, column: str, values: Sequence[str]) -> sa.CheckConstraint:
    allowed = ", ".join(f"'{v}'" for v in values)
    return sa.CheckConstraint(f"{column} IN ({allowed})", name=f"ck_{table}_{column}")


def _citizen_fk(table: str, ondelete: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["citizen_id"], ["citizens.id"], name=f"fk_{table}_citizen_id_citizens", ondelete=ondelete
    )


CONSENT_STATES = ("unknown", "prompted", "granted", "withdrawn", "refused")


def upgrade() -> None:
    op.create_table(
        "citizens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("index_hash", HEX64, nullable=False),
        sa.Column("identifier_ct", sa.Text(), nullable=False),
        sa.Column("wa_id_ct", sa.Text(), nullable=True),
        sa.Column("pseudonym_code", sa.String(32), nullable=False),
        sa.Column("ghost_user_id", ID, nullable=True),
        sa.Column("consent_state", sa.String(16), nullable=False),
        _ts("last_inbound_at", nullable=True),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_citizens"),
        sa.UniqueConstraint("index_hash", name="uq_citizens_index_hash"),
        sa.UniqueConstraint("pseudonym_code", name="uq_citizens_pseudonym_code"),
        sa.UniqueConstraint("ghost_user_id", name="uq_citizens_ghost_user_id"),
        _one_of("citizens", "consent_state", CONSENT_STATES),
    )

    op.create_table(
        "ghosts",
        sa.Column("user_id", ID, nullable=False),
        sa.Column("device_id", ID, nullable=False),
        sa.Column("display_name", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("citizen_id", sa.Integer(), nullable=True),
        sa.Column("registered", sa.Boolean(), nullable=False),
        sa.Column("cross_signing_ct", sa.Text(), nullable=True),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("user_id", name="pk_ghosts"),
        _citizen_fk("ghosts", "SET NULL"),
        _one_of("ghosts", "kind", ("bot", "citizen", "member")),
    )
    op.create_index("ix_ghosts_citizen_id", "ghosts", ["citizen_id"])

    op.create_table(
        "rooms",
        sa.Column("room_id", ID, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("topic", sa.Text(), nullable=True),
        sa.Column("citizen_id", sa.Integer(), nullable=True),
        sa.Column("created_by", ID, nullable=False),
        _ts("created_at"),
        _ts("closed_at", nullable=True),
        sa.PrimaryKeyConstraint("room_id", name="pk_rooms"),
        _citizen_fk("rooms", "SET NULL"),
        _one_of("rooms", "kind", ("team", "citizen", "announcement", "portal", "management")),
    )
    op.create_index("ix_rooms_citizen_id", "rooms", ["citizen_id"])

    op.create_table(
        "processed_transactions",
        sa.Column("txn_id", ID, nullable=False),
        _ts("received_at"),
        sa.PrimaryKeyConstraint("txn_id", name="pk_processed_transactions"),
    )
    op.create_index(
        "ix_processed_transactions_received_at", "processed_transactions", ["received_at"]
    )

    op.create_table(
        "inbound",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("dedupe_key", ID, nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        _ts("hold_until", nullable=True),
        sa.Column("citizen_id", sa.Integer(), nullable=True),
        _ts("created_at"),
        _ts("processed_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_inbound"),
        sa.UniqueConstraint("source", "dedupe_key", name="uq_inbound_source_dedupe_key"),
        _citizen_fk("inbound", "CASCADE"),
        _one_of("inbound", "source", ("matrix", "whatsapp")),
        _one_of("inbound", "status", ("pending", "held", "done", "failed", "dropped")),
    )
    op.create_index("ix_inbound_status_id", "inbound", ["status", "id"])
    op.create_index("ix_inbound_citizen_id", "inbound", ["citizen_id"])

    op.create_table(
        "consent_records",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("citizen_id", sa.Integer(), nullable=True),
        sa.Column("pseudonym", sa.String(255), nullable=False),
        sa.Column("purpose", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("notice_version", sa.String(64), nullable=False),
        sa.Column("notice_hash", HEX64, nullable=False),
        sa.Column("channel", sa.String(32), nullable=False),
        sa.Column("language", sa.String(16), nullable=True),
        sa.Column("evidence", sa.String(255), nullable=True),
        sa.Column("staff_id", ID, nullable=True),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_consent_records"),
        _citizen_fk("consent_records", "SET NULL"),
        _one_of("consent_records", "purpose", ("mirroring", "notices", "membership")),
        _one_of("consent_records", "state", CONSENT_STATES),
    )
    op.create_index("ix_consent_records_citizen_id", "consent_records", ["citizen_id"])

    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", ID, nullable=False),
        sa.Column("citizen_id", sa.Integer(), nullable=False),
        sa.Column("room_id", ID, nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _ts("next_attempt_at"),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("wamid", ID, nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
        sa.UniqueConstraint("idempotency_key", name="uq_outbox_idempotency_key"),
        _citizen_fk("outbox", "CASCADE"),
        _one_of("outbox", "status", ("pending", "sent", "failed", "cancelled")),
    )
    op.create_index("ix_outbox_status_next_attempt_at", "outbox", ["status", "next_attempt_at"])
    op.create_index("ix_outbox_citizen_id", "outbox", ["citizen_id"])
    op.create_index("ix_outbox_wamid", "outbox", ["wamid"])

    op.create_table(
        "message_map",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("wamid", ID, nullable=False),
        sa.Column("room_id", ID, nullable=False),
        sa.Column("event_id", ID, nullable=False),
        sa.Column("direction", sa.String(8), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_message_map"),
        sa.UniqueConstraint("wamid", name="uq_message_map_wamid"),
        sa.UniqueConstraint("event_id", name="uq_message_map_event_id"),
        _one_of("message_map", "direction", ("in", "out")),
    )

    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        _ts("at"),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("object", sa.String(255), nullable=False),
        sa.Column("result", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("prev_hash", HEX64, nullable=False),
        sa.Column("hash", HEX64, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
        # Never reuse an id on SQLite, even after the newest row was deleted.
        sqlite_autoincrement=True,
    )

    op.create_table(
        "kv",
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_kv"),
    )


def downgrade() -> None:
    # Children before the table they reference.
    for table in (
        "kv", "audit_log", "message_map", "outbox", "consent_records", "inbound",
        "processed_transactions", "rooms", "ghosts", "citizens",
    ):
        op.drop_table(table)
