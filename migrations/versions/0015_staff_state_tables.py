"""Held staff messages, mutes and reactions get tables of their own (issue 18 point 3):
they lived as prefixed keys in `kv`, and dropping a portal's held messages decrypted
every held row to find them.

Revision ID: 0015
Revises: 0013
Create Date: 2026-12-02

Hand-written; never edit once landed. Mutes (`mute:<room>:<user>`) and reactions
(`reaction:<ghost>:<target>`) are plain values and move here. Held messages are sealed
with the data key, which a migration does not have: they stay in `kv` until the bridge
starts and moves them (bridge.whatsapp.outbound.adopt_legacy_holds). A downgrade moves
mutes and reactions back and drops held messages still in the table (they expire with
the 24-hour window anyway).
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | Sequence[str] | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.String(255)
KV = sa.table("kv", sa.column("key", sa.String(255)), sa.column("value", sa.Text))
MUTES = sa.table("mutes", sa.column("room_id", ID), sa.column("user_id", ID),
                 sa.column("previous_level", sa.Integer),
                 sa.column("muted_at", sa.DateTime(timezone=True)))
REACTIONS = sa.table("reactions", sa.column("ghost_user_id", ID),
                     sa.column("target_event_id", ID), sa.column("reaction_event_id", ID))


def upgrade() -> None:
    op.create_table(
        "held_staff_messages",
        sa.Column("event_id", ID, primary_key=True),
        sa.Column("room_id", ID, nullable=False),
        sa.Column("held_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("payloads_ct", sa.Text, nullable=False),
    )
    op.create_index("ix_held_staff_messages_room_id", "held_staff_messages", ["room_id"])
    op.create_index("ix_held_staff_messages_held_at", "held_staff_messages", ["held_at"])
    op.create_table(
        "mutes",
        sa.Column("room_id", ID, primary_key=True),
        sa.Column("user_id", ID, primary_key=True),
        sa.Column("previous_level", sa.Integer, nullable=True),
        sa.Column("muted_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_mutes_user_id", "mutes", ["user_id"])
    op.create_table(
        "reactions",
        sa.Column("ghost_user_id", ID, primary_key=True),
        sa.Column("target_event_id", ID, primary_key=True),
        sa.Column("reaction_event_id", ID, nullable=False),
    )
    bind = op.get_bind()
    now = datetime.now(UTC)
    if bind.dialect.name == "sqlite":
        now = now.replace(tzinfo=None)  # as bridge.db.models.UTCDateTime stores it there
    for key, value in bind.execute(sa.select(KV.c.key, KV.c.value).where(
            KV.c.key.like("mute:%"))).all():
        room_id, sep, user_id = key.removeprefix("mute:").partition(":@")
        if not sep:
            continue
        previous = value.strip()
        level = int(previous) if previous.lstrip("-").isdigit() else None  # JSON int/null
        bind.execute(MUTES.insert().values(room_id=room_id, user_id="@" + user_id,
                                           previous_level=level, muted_at=now))
        bind.execute(KV.delete().where(KV.c.key == key))
    for key, value in bind.execute(sa.select(KV.c.key, KV.c.value).where(
            KV.c.key.like("reaction:%"))).all():
        ghost, sep, target = key.removeprefix("reaction:").partition(":$")
        if not sep:
            continue
        bind.execute(REACTIONS.insert().values(ghost_user_id=ghost, target_event_id="$" + target,
                                               reaction_event_id=value))
        bind.execute(KV.delete().where(KV.c.key == key))


def downgrade() -> None:
    bind = op.get_bind()
    for room_id, user_id, level in bind.execute(sa.select(
            MUTES.c.room_id, MUTES.c.user_id, MUTES.c.previous_level)).all():
        bind.execute(KV.insert().values(key=f"mute:{room_id}:{user_id}",
                                        value="null" if level is None else str(level)))
    for ghost, target, reaction in bind.execute(sa.select(
            REACTIONS.c.ghost_user_id, REACTIONS.c.target_event_id,
            REACTIONS.c.reaction_event_id)).all():
        bind.execute(KV.insert().values(key=f"reaction:{ghost}:{target}", value=reaction))
    op.drop_table("reactions")
    op.drop_index("ix_mutes_user_id", table_name="mutes")
    op.drop_table("mutes")
    op.drop_index("ix_held_staff_messages_held_at", table_name="held_staff_messages")
    op.drop_index("ix_held_staff_messages_room_id", table_name="held_staff_messages")
    op.drop_table("held_staff_messages")
