"""SQL storage: the async engine, Alembic migrations and the repositories.

`Database.open(url)` refuses a database that is not ours or not migrated;
`upgrade(url)` (behind `civic-bridge migrate`) brings it to the code's schema.
"""

from bridge.db.engine import (
    FIX_COMMAND,
    VERSION_TABLE,
    Database,
    SchemaStatus,
    downgrade,
    head_revision,
    safe_url,
    schema_status,
    upgrade,
)
from bridge.db.records import (
    AuditEntry,
    Citizen,
    CitizenIdentifiers,
    ConsentPurpose,
    ConsentRecord,
    ConsentState,
    Direction,
    Ghost,
    GhostKind,
    InboundItem,
    InboundSource,
    InboundStatus,
    MessageLink,
    Notice,
    NoticeSubscription,
    OutboxItem,
    OutboxStatus,
    Room,
    RoomKind,
)
from bridge.db.repos import Repositories

__all__ = [
    "FIX_COMMAND",
    "VERSION_TABLE",
    "AuditEntry",
    "Citizen",
    "CitizenIdentifiers",
    "ConsentPurpose",
    "ConsentRecord",
    "ConsentState",
    "Database",
    "Direction",
    "Ghost",
    "GhostKind",
    "InboundItem",
    "InboundSource",
    "InboundStatus",
    "MessageLink",
    "Notice",
    "NoticeSubscription",
    "OutboxItem",
    "OutboxStatus",
    "Repositories",
    "Room",
    "RoomKind",
    "SchemaStatus",
    "downgrade",
    "head_revision",
    "safe_url",
    "schema_status",
    "upgrade",
]
