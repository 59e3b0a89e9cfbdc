"""WhatsApp citizens as members of agency rooms (issue 17).

Revision ID: 0014
Revises: 0015
Create Date: 2026-12-01

Hand-written; never edit once landed. Numbered 0014 when main's head was 0013; 0015
(issue 18's staff-state tables) landed first on 0013, so this one follows it: one
line of revisions, 0013 -> 0015 -> 0014. Four new tables (memberships, per-room
switches, the backlog kept while a citizen's 24 h window is closed, and the map from
per-member wamids to room events, the wamids only as keyed hash and ciphertext like
`message_map` since revision 0010); `consent_records.purpose` widens to hold
"room:<room id>" and its CHECK accepts that form; `ghosts.kind` gains "room". On SQLite
batch mode copies the two altered tables.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | Sequence[str] | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.String(255)
PURPOSES = ("mirroring", "notices", "membership")
GHOST_KINDS = ("bot", "citizen", "member")
MEMBER_STATES = ("invited", "joined", "left", "declined")


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _when() -> sa.Column[object]:
    return sa.Column("created_at", sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    with op.batch_alter_table("consent_records") as batch:
        batch.alter_column("purpose", type_=ID, existing_type=sa.String(16),
                           existing_nullable=False)
        batch.drop_constraint("ck_consent_records_purpose", type_="check")
        batch.create_check_constraint(
            "ck_consent_records_purpose",
            f"{_one_of('purpose', PURPOSES)} OR purpose LIKE 'room:%'")
    with op.batch_alter_table("ghosts") as batch:
        batch.drop_constraint("ck_ghosts_kind", type_="check")
        batch.create_check_constraint("ck_ghosts_kind", _one_of("kind", (*GHOST_KINDS, "room")))
    op.create_table(
        "wa_room_members",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("room_id", ID, nullable=False),
        sa.Column("citizen_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("display_name", sa.String(255), nullable=False),
        sa.Column("ghost_user_id", ID, nullable=True),
        sa.Column("invited_by", ID, nullable=False),
        sa.Column("notice_hash", sa.String(64), nullable=False),
        sa.Column("chosen_at", sa.DateTime(timezone=True), nullable=True),
        _when(),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(_one_of("state", MEMBER_STATES), name="ck_wa_room_members_state"),
        sa.ForeignKeyConstraint(["citizen_id"], ["citizens.id"], ondelete="CASCADE",
                                name="fk_wa_room_members_citizen_id_citizens"),
        sa.PrimaryKeyConstraint("id", name="pk_wa_room_members"),
        sa.UniqueConstraint("room_id", "citizen_id",
                            name="uq_wa_room_members_room_id_citizen_id"),
        sa.UniqueConstraint("ghost_user_id", name="uq_wa_room_members_ghost_user_id"),
    )
    op.create_index("ix_wa_room_members_room_id", "wa_room_members", ["room_id"])
    op.create_index("ix_wa_room_members_citizen_id", "wa_room_members", ["citizen_id"])
    op.create_table(
        "wa_room_settings",
        sa.Column("room_id", ID, nullable=False),
        sa.Column("whatsapp_allowed", sa.Boolean(), nullable=False),
        sa.Column("relay_media", sa.Boolean(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("room_id", name="pk_wa_room_settings"),
    )
    op.create_table(
        "wa_room_backlog",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("citizen_id", sa.Integer(), nullable=False),
        sa.Column("room_id", ID, nullable=False),
        sa.Column("event_key", ID, nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        _when(),
        sa.ForeignKeyConstraint(["citizen_id"], ["citizens.id"], ondelete="CASCADE",
                                name="fk_wa_room_backlog_citizen_id_citizens"),
        sa.PrimaryKeyConstraint("id", name="pk_wa_room_backlog"),
        sa.UniqueConstraint("citizen_id", "event_key",
                            name="uq_wa_room_backlog_citizen_id_event_key"),
    )
    op.create_index("ix_wa_room_backlog_citizen_id", "wa_room_backlog", ["citizen_id"])
    op.create_table(
        "wa_room_messages",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("wamid_hash", ID, nullable=False),
        sa.Column("wamid_ct", sa.Text(), nullable=False),
        sa.Column("citizen_id", sa.Integer(), nullable=False),
        sa.Column("room_id", ID, nullable=False),
        sa.Column("event_id", ID, nullable=False),
        _when(),
        sa.ForeignKeyConstraint(["citizen_id"], ["citizens.id"], ondelete="CASCADE",
                                name="fk_wa_room_messages_citizen_id_citizens"),
        sa.PrimaryKeyConstraint("id", name="pk_wa_room_messages"),
        sa.UniqueConstraint("wamid_hash", name="uq_wa_room_messages_wamid_hash"),
    )
    op.create_index("ix_wa_room_messages_citizen_id", "wa_room_messages", ["citizen_id"])
    op.create_index("ix_wa_room_messages_created_at", "wa_room_messages", ["created_at"])
    op.create_index("ix_wa_room_messages_event_id_citizen_id", "wa_room_messages",
                    ["event_id", "citizen_id"])


def downgrade() -> None:
    op.drop_table("wa_room_messages")
    op.drop_table("wa_room_backlog")
    op.drop_table("wa_room_settings")
    op.drop_table("wa_room_members")
    # Room consent records and room ghosts have no place in the old schema.
    op.execute(sa.text("DELETE FROM consent_records WHERE purpose LIKE 'room:%'"))
    op.execute(sa.text("UPDATE ghosts SET kind = 'member' WHERE kind = 'room'"))
    with op.batch_alter_table("ghosts") as batch:
        batch.drop_constraint("ck_ghosts_kind", type_="check")
        batch.create_check_constraint("ck_ghosts_kind", _one_of("kind", GHOST_KINDS))
    with op.batch_alter_table("consent_records") as batch:
        batch.drop_constraint("ck_consent_records_purpose", type_="check")
        batch.create_check_constraint("ck_consent_records_purpose",
                                      _one_of("purpose", PURPOSES))
        batch.alter_column("purpose", type_=sa.String(16), existing_type=ID,
                           existing_nullable=False)
