"""Retention for everything kept (issue 15 point 6): when a message-map pair was linked,
and when an invite-link account was found in use.

Revision ID: 0013
Revises: 0010
Create Date: 2026-12-02

Hand-written; never edit once landed. Existing message-map pairs get the upgrade's time
as their link time, so they are purged one retention period after the upgrade, not at
once (replies to recent messages keep working).
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("message_map", sa.Column("created_at", sa.DateTime(timezone=True),
                                           nullable=True))
    now = datetime.now(UTC)
    if op.get_bind().dialect.name == "sqlite":
        now = now.replace(tzinfo=None)  # as bridge.db.models.UTCDateTime stores it there
    table = sa.table("message_map", sa.column("created_at", sa.DateTime(timezone=True)))
    op.execute(table.update().values(created_at=now))
    with op.batch_alter_table("message_map") as batch:
        batch.alter_column("created_at", existing_type=sa.DateTime(timezone=True),
                           nullable=False)
    op.create_index("ix_message_map_created_at", "message_map", ["created_at"])
    op.add_column("invite_accounts", sa.Column("in_use_at", sa.DateTime(timezone=True),
                                               nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("invite_accounts") as batch:
        batch.drop_column("in_use_at")
    op.drop_index("ix_message_map_created_at", table_name="message_map")
    with op.batch_alter_table("message_map") as batch:
        batch.drop_column("created_at")
