"""Invite links (stored hashed) and the pseudonymous accounts made through them.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-15

Hand-written; never edit once landed. Constraint names follow the naming convention
in bridge/db/models.py.
"""

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.String(255)
HEX64 = sa.String(64)


def _ts(name: str, nullable: bool = False) -> "sa.Column[datetime]":
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "invite_links",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_hash", HEX64, nullable=False),
        sa.Column("room_id", ID, nullable=False),
        sa.Column("max_uses", sa.Integer(), nullable=False),
        sa.Column("uses", sa.Integer(), nullable=False),
        _ts("expires_at"),
        sa.Column("created_by", sa.String(255), nullable=False),
        _ts("created_at"),
        _ts("revoked_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_invite_links"),
        sa.UniqueConstraint("token_hash", name="uq_invite_links_token_hash"),
        sa.CheckConstraint("uses >= 0 AND uses <= max_uses", name="ck_invite_links_uses"),
    )
    op.create_index("ix_invite_links_room_id", "invite_links", ["room_id"])

    op.create_table(
        "invite_accounts",
        sa.Column("user_id", ID, nullable=False),
        sa.Column("link_id", sa.Integer(), nullable=True),
        sa.Column("room_id", ID, nullable=False),
        sa.Column("display_name", sa.String(255), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("user_id", name="pk_invite_accounts"),
        sa.ForeignKeyConstraint(
            ["link_id"], ["invite_links.id"], name="fk_invite_accounts_link_id_invite_links",
            ondelete="SET NULL",
        ),
    )
    op.create_index("ix_invite_accounts_link_id", "invite_accounts", ["link_id"])


def downgrade() -> None:
    op.drop_table("invite_accounts")
    op.drop_table("invite_links")
