"""The outbox is claimed in queue order (`id`) among pending rows: an index on
(status, id) lets that walk stop after one batch. With only (status, next_attempt_at),
SQLite scanned the whole table in id order, sent rows first (27 ms per claim with 100,000
sent rows kept until the purge, 1 ms with this index), and PostgreSQL sorted every
pending row for each claim (a fan-out of 20 posts to 1,000 members queues 20,000).

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-02

Hand-written; never edit once landed.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0017"
down_revision: str | Sequence[str] | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_outbox_status_id", "outbox", ["status", "id"])


def downgrade() -> None:
    op.drop_index("ix_outbox_status_id", table_name="outbox")
