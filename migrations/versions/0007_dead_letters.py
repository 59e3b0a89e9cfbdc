"""Dead letters: a queued item that fails for good is set aside, not given up.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01

Hand-written; never edit once landed. `inbound` and `outbox` get the status "dead"
(their CHECK constraints are rebuilt; on SQLite batch mode copies the table) and three
nullable columns: the first and latest failure of the current run of failures and the
reason class of a dead letter. Existing rows keep NULL: none has failed under this
bookkeeping yet. Items the old code gave up on ("failed" inbound rows) stay as they are.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUSES = {
    "inbound": (("pending", "held", "done", "failed", "dropped"), ("dead",)),
    "outbox": (("pending", "sent", "failed", "cancelled"), ("dead",)),
}
COLUMNS = ("first_failed_at", "last_failed_at", "dead_reason")


def _check(values: Sequence[str]) -> str:
    return f"status IN ({', '.join(repr(v) for v in values)})"


def upgrade() -> None:
    for table, (old, added) in STATUSES.items():
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("first_failed_at", sa.DateTime(timezone=True)))
            batch.add_column(sa.Column("last_failed_at", sa.DateTime(timezone=True)))
            batch.add_column(sa.Column("dead_reason", sa.String(32)))
            batch.drop_constraint(f"ck_{table}_status", type_="check")
            batch.create_check_constraint(f"ck_{table}_status", _check((*old, *added)))


def downgrade() -> None:
    for table, (old, _) in STATUSES.items():
        # Dead letters have no place in the old schema: back in the queue they go.
        op.execute(sa.text(f"UPDATE {table} SET status = 'pending' WHERE status = 'dead'"))
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(f"ck_{table}_status", type_="check")
            batch.create_check_constraint(f"ck_{table}_status", _check(old))
            for column in COLUMNS:
                batch.drop_column(column)
