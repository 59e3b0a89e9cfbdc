"""Alembic environment for civic-bridge.

Run through `bridge.db.engine` (`civic-bridge migrate`), which hands over an open
connection in `config.attributes["connection"]`; there is no alembic.ini.
`command.upgrade(cfg, "head", sql=True)` with `sqlalchemy.url` set prints the SQL
for review instead (offline mode). A new revision is written with:

    python -c "from alembic import command; from bridge.db.engine import alembic_config; \
command.revision(alembic_config(), 'what it does', rev_id='0002')"

Revisions are hand-written, numbered 0001, 0002, ... and never edited once landed.
"""

from alembic import context

from bridge.db.engine import VERSION_TABLE
from bridge.db.models import Base

config = context.config
# Only for `alembic check`/autogenerate during development; migrations never read it.
target_metadata = Base.metadata


def run_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        version_table=VERSION_TABLE,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("migrations run through civic-bridge: civic-bridge migrate -c CONFIG")
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    # The caller's connection is already in a transaction; this joins it, so the
    # whole upgrade commits or rolls back as one.
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
