"""Outbox: record a send in flight, so a crash mid-send is confirmed by its status.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28

Hand-written; never edit once landed. One nullable column: NULL on every existing row
(none is in flight at upgrade time, the bridge is stopped).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("outbox", sa.Column("sending_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("sending_at")
