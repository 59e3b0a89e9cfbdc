"""Audit log: each entry records how it is chained (scheme) and with which key.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01

Hand-written; never edit once landed. Every existing entry was chained with plain
SHA-256 and gets scheme "sha256" (no key id); the bridge seals them with a keyed entry
at its next start (bridge.auditchain, bridge.db.audit.AuditRepo.seal).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("audit_log", sa.Column("scheme", sa.String(16), nullable=False,
                                         server_default="sha256"))
    op.add_column("audit_log", sa.Column("key_id", sa.String(16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audit_log") as batch:
        batch.drop_column("key_id")
        batch.drop_column("scheme")
