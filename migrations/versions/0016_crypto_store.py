"""Crypto store: the E2EE state of the bridge's devices moves into the database (issue 16
point 2; docs/design/16-appservice-e2ee.md §5.1).

Revision ID: 0016
Revises: 0014 (the head: 0014 was landed after 0015 and revises it)
Create Date: 2026-12-02

Hand-written; never edit once landed. New tables only. The per-device nio files under
`appservice.store_dir` are moved in by the bridge on start (bridge.matrix.crypto.legacy):
a migration cannot do it, the files may be on another host and their pickles are copied
as they are. A downgrade drops the tables; the moved files are kept under
`store_dir/.migrated/` and can be put back by hand.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | Sequence[str] | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.String(255)
WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "crypto_accounts",
        sa.Column("user_id", ID, nullable=False),
        sa.Column("device_id", ID, nullable=False),
        sa.Column("pickle", sa.Text, nullable=False),
        sa.Column("shared", sa.Boolean, nullable=False),
        sa.Column("updated_at", WHEN, nullable=False),
        sa.Column("sync_token", sa.Text, nullable=True),
        sa.Column("migrated_from", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("user_id", name="pk_crypto_accounts"),
    )
    op.create_table(
        "crypto_olm_sessions",
        sa.Column("user_id", ID, nullable=False),
        sa.Column("session_id", ID, nullable=False),
        sa.Column("sender_key", ID, nullable=False),
        sa.Column("pickle", sa.Text, nullable=False),
        sa.Column("created_at", WHEN, nullable=False),
        sa.Column("last_used_at", WHEN, nullable=False),
        sa.PrimaryKeyConstraint("user_id", "session_id", name="pk_crypto_olm_sessions"),
    )
    op.create_table(
        "crypto_megolm_inbound",
        sa.Column("user_id", ID, nullable=False),
        sa.Column("session_id", ID, nullable=False),
        sa.Column("sender_key", ID, nullable=False),
        sa.Column("signing_key", ID, nullable=False),
        sa.Column("room_id", ID, nullable=False),
        sa.Column("pickle", sa.Text, nullable=False),
        sa.Column("forwarding_chain", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("user_id", "session_id", name="pk_crypto_megolm_inbound"),
    )
    op.create_table(
        "crypto_megolm_outbound",
        sa.Column("user_id", ID, nullable=False),
        sa.Column("room_id", ID, nullable=False),
        sa.Column("session_id", ID, nullable=False),
        sa.Column("pickle", sa.Text, nullable=False),
        sa.Column("created_at", WHEN, nullable=False),
        sa.Column("message_count", sa.Integer, nullable=False),
        sa.Column("shared", sa.Boolean, nullable=False),
        sa.Column("shared_with", sa.Text, nullable=False),
        sa.Column("ignored", sa.Text, nullable=False),
        sa.Column("reserved_index", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("user_id", "room_id", name="pk_crypto_megolm_outbound"),
    )
    op.create_table(
        "crypto_devices",
        sa.Column("user_id", ID, nullable=False),
        sa.Column("device_id", ID, nullable=False),
        sa.Column("curve25519", ID, nullable=True),
        sa.Column("keys", sa.Text, nullable=False),
        sa.Column("display_name", sa.Text, nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False),
        sa.PrimaryKeyConstraint("user_id", "device_id", name="pk_crypto_devices"),
    )
    op.create_index("ix_crypto_devices_curve25519", "crypto_devices", ["curve25519"])
    op.create_table(
        "crypto_device_trust",
        sa.Column("owner", ID, nullable=False),
        sa.Column("user_id", ID, nullable=False),
        sa.Column("device_id", ID, nullable=False),
        sa.Column("state", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("owner", "user_id", "device_id",
                                name="pk_crypto_device_trust"),
    )
    op.create_table(
        "crypto_tracked_users",
        sa.Column("owner", ID, nullable=False),
        sa.Column("user_id", ID, nullable=False),
        sa.PrimaryKeyConstraint("owner", "user_id", name="pk_crypto_tracked_users"),
    )
    op.create_table(
        "crypto_key_requests",
        sa.Column("owner", ID, nullable=False),
        sa.Column("request_id", ID, nullable=False),
        sa.Column("session_id", ID, nullable=False),
        sa.Column("room_id", ID, nullable=False),
        sa.Column("algorithm", ID, nullable=False),
        sa.PrimaryKeyConstraint("owner", "request_id", name="pk_crypto_key_requests"),
    )


def downgrade() -> None:
    for table in ("crypto_key_requests", "crypto_tracked_users", "crypto_device_trust",
                  "crypto_devices", "crypto_megolm_outbound", "crypto_megolm_inbound",
                  "crypto_olm_sessions", "crypto_accounts"):
        op.drop_table(table)
