"""Notices of availability: citizens' subscriptions and the notice log.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05

Hand-written; never edit once landed. Two new tables, nothing existing changes.
"""

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.String(255)
CONSENT_STATES = ("unknown", "prompted", "granted", "withdrawn", "refused")


def _ts(name: str, nullable: bool = False) -> "sa.Column[datetime]":
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "notice_subscriptions",
        sa.Column("citizen_id", sa.Integer(), nullable=False),
        sa.Column("code", sa.String(32), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("citizen_id", name="pk_notice_subscriptions"),
        sa.UniqueConstraint("code", name="uq_notice_subscriptions_code"),
        sa.ForeignKeyConstraint(["citizen_id"], ["citizens.id"],
                                name="fk_notice_subscriptions_citizen_id_citizens",
                                ondelete="CASCADE"),
        sa.CheckConstraint("state IN ({})".format(", ".join(f"'{s}'" for s in CONSENT_STATES)),
                           name="ck_notice_subscriptions_state"),
    )
    op.create_table(
        "notices",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("reference", sa.String(128), nullable=False),
        sa.Column("citizen_id", sa.Integer(), nullable=True),
        sa.Column("pseudonym", sa.String(255), nullable=False),
        sa.Column("template_name", sa.String(512), nullable=False),
        sa.Column("template_language", sa.String(16), nullable=False),
        sa.Column("template_version", sa.String(64), nullable=False),
        sa.Column("wamid", ID, nullable=True),
        sa.Column("requested_by", sa.String(255), nullable=False),
        _ts("created_at"),
        _ts("sent_at", nullable=True),
        _ts("delivered_at", nullable=True),
        _ts("read_at", nullable=True),
        _ts("failed_at", nullable=True),
        sa.Column("error", sa.String(255), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_notices"),
        sa.UniqueConstraint("pseudonym", "reference", name="uq_notices_pseudonym_reference"),
        sa.ForeignKeyConstraint(["citizen_id"], ["citizens.id"],
                                name="fk_notices_citizen_id_citizens", ondelete="SET NULL"),
    )
    op.create_index("ix_notices_reference", "notices", ["reference"])
    op.create_index("ix_notices_citizen_id", "notices", ["citizen_id"])
    op.create_index("ix_notices_wamid", "notices", ["wamid"])
    op.create_index("ix_notices_created_at", "notices", ["created_at"])


def downgrade() -> None:
    op.drop_table("notices")
    op.drop_table("notice_subscriptions")
