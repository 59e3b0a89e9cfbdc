"""Room keys: the late-device key ledger of the bridge's devices survives a restart.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28

Hand-written; never edit once landed. Two new tables, nothing existing changes. The
ledger was in memory before, so there is nothing to carry over.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.String(255)


def upgrade() -> None:
    op.create_table(
        "room_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("owner", ID, nullable=False),
        sa.Column("room_id", ID, nullable=False),
        sa.Column("session_id", ID, nullable=False),
        sa.Column("message_index", sa.Integer(), nullable=False),
        sa.Column("session_key_ct", sa.Text(), nullable=False),
        sa.Column("audience", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_room_keys"),
        sa.UniqueConstraint("owner", "session_id", "message_index",
                            name="uq_room_keys_owner_session_id_message_index"),
    )
    op.create_table(
        "room_key_deliveries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("owner", ID, nullable=False),
        sa.Column("session_id", ID, nullable=False),
        sa.Column("curve25519", ID, nullable=False),
        sa.Column("message_index", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_room_key_deliveries"),
        sa.UniqueConstraint("owner", "session_id", "curve25519",
                            name="uq_room_key_deliveries_owner_session_id_curve25519"),
    )


def downgrade() -> None:
    op.drop_table("room_key_deliveries")
    op.drop_table("room_keys")
