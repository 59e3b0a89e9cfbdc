"""Reports and flags for moderators (issue 19).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01

Hand-written; never edit once landed. One new table, nothing existing changes. The
lead re-chains `down_revision` when branches merge.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.String(255)
SOURCES = ("matrix", "whatsapp", "flag")
STATUSES = ("open", "redact", "mute", "kick", "ban", "dismiss")


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def upgrade() -> None:
    op.create_table(
        "reports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("external_id", ID, nullable=False),
        sa.Column("room_id", ID, nullable=False),
        sa.Column("event_id", ID, nullable=False),
        sa.Column("reporter", ID, nullable=False),
        sa.Column("author", ID, nullable=True),
        sa.Column("reason_ct", sa.Text(), nullable=True),
        sa.Column("language", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("handled_by", sa.String(255), nullable=True),
        sa.Column("handled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(_one_of("source", SOURCES), name="ck_reports_source"),
        sa.CheckConstraint(_one_of("status", STATUSES), name="ck_reports_status"),
        sa.PrimaryKeyConstraint("id", name="pk_reports"),
        sa.UniqueConstraint("external_id", name="uq_reports_external_id"),
    )
    op.create_index("ix_reports_status", "reports", ["status"])


def downgrade() -> None:
    op.drop_index("ix_reports_status", table_name="reports")
    op.drop_table("reports")
