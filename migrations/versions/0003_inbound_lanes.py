"""Inbound lanes: each queued item names the lane (room, citizen) it is processed in.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28

Hand-written; never edit once landed. Items queued before this revision get the global
lane "", which the worker runs alone and after everything older, so a backlog left at
upgrade time keeps its order.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_inbound_source_status_lane_id"


def upgrade() -> None:
    op.add_column("inbound", sa.Column("lane", sa.String(255), nullable=False,
                                       server_default=""))
    op.create_index(INDEX, "inbound", ["source", "status", "lane", "id"])


def downgrade() -> None:
    op.drop_index(INDEX, table_name="inbound")
    with op.batch_alter_table("inbound") as batch:
        batch.drop_column("lane")
