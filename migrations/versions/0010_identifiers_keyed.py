"""WhatsApp message ids at rest only as keyed hash or ciphertext.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02

Hand-written; never edit once landed. A wamid is base64 that embeds the citizen's
number, so no column keeps one in clear any more:

* `outbox.wamid` and `notices.wamid` become `wamid_hash` (looked up by statuses);
* `message_map.wamid` becomes `wamid_hash` (looked up by statuses, replies, reactions,
  edits, revokes) plus `wamid_ct`, the ciphertext sent back to Graph as a reply's or
  reaction's target.

The columns are renamed in place: hashing needs `privacy.index_key` and encrypting
`privacy.data_key`, which a migration does not have. Rows from before this revision
keep their clear wamid in `wamid_hash` (and an empty `wamid_ct`) until the bridge's
next start (or `civic-bridge migrate`), which hashes and encrypts them, as well as the
wamids inside WhatsApp dedupe keys, system-reply idempotency keys and consent evidence
(bridge.legacy_wamids). That pass runs until it has seen every table once, then
records so in `kv`; this revision deletes that record, so a database upgraded again
after a downgrade is looked at again.

Downgrade renames the columns back and drops `wamid_ct`; hashed values stay hashed
(the old code then finds no message by them: replies to older messages lose their
context, statuses of older sends are not shown).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.String(255)
DONE_KEY = "legacy_wamids:done"  # bridge.legacy_wamids.DONE_KEY, as of this revision


def _rename(table: str, old: str, new: str, index: tuple[str, str] | None) -> None:
    if index:
        op.drop_index(index[0], table_name=table)
    with op.batch_alter_table(table) as batch:
        batch.alter_column(old, new_column_name=new, existing_type=ID)
    if index:
        op.create_index(index[1], table, [new])


def upgrade() -> None:
    _rename("outbox", "wamid", "wamid_hash", ("ix_outbox_wamid", "ix_outbox_wamid_hash"))
    _rename("notices", "wamid", "wamid_hash", ("ix_notices_wamid", "ix_notices_wamid_hash"))
    with op.batch_alter_table("message_map") as batch:
        batch.drop_constraint("uq_message_map_wamid", type_="unique")
        batch.alter_column("wamid", new_column_name="wamid_hash", existing_type=ID,
                           existing_nullable=False)
        batch.add_column(sa.Column("wamid_ct", sa.Text(), nullable=True))
    # Empty until the bridge seals the clear value still in wamid_hash (see above).
    op.execute(sa.text("UPDATE message_map SET wamid_ct = ''"))
    with op.batch_alter_table("message_map") as batch:
        batch.alter_column("wamid_ct", existing_type=sa.Text(), nullable=False)
        batch.create_unique_constraint("uq_message_map_wamid_hash", ["wamid_hash"])
    op.execute(sa.text("DELETE FROM kv WHERE key = :key").bindparams(key=DONE_KEY))


def downgrade() -> None:
    with op.batch_alter_table("message_map") as batch:
        batch.drop_constraint("uq_message_map_wamid_hash", type_="unique")
        batch.drop_column("wamid_ct")
        batch.alter_column("wamid_hash", new_column_name="wamid", existing_type=ID,
                           existing_nullable=False)
    # A batch of its own: in the same one, SQLite's copy would lose it (renamed column).
    with op.batch_alter_table("message_map") as batch:
        batch.create_unique_constraint("uq_message_map_wamid", ["wamid"])
    _rename("notices", "wamid_hash", "wamid", ("ix_notices_wamid_hash", "ix_notices_wamid"))
    _rename("outbox", "wamid_hash", "wamid", ("ix_outbox_wamid_hash", "ix_outbox_wamid"))
