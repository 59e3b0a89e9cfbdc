"""The core imports no I/O library (DESIGN.md, Layers): its records, policies, parsers and
decisions run without aiohttp, matrix-nio or SQLAlchemy, so they stay pure by
construction, not by habit. Each module is imported in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CORE = [
    "bridge.model",  # records and state types
    "bridge.types",
    "bridge.errors",
    "bridge.text",
    "bridge.privacy",  # keyed hashes and sealing
    "bridge.auditchain",
    "bridge.whatsapp.consent",  # consent decisions (chat)
    "bridge.whatsapp.notice_consent",  # consent decisions (notices)
    "bridge.whatsapp.webhook_parse",
    "bridge.whatsapp.webhook",  # a delivery checked and split into queue rows
    "bridge.whatsapp.stored",  # the queued item: the parsed message, as JSON
    "bridge.whatsapp.limits",
    "bridge.whatsapp.message_content",
    "bridge.whatsapp.rich_content",
    "bridge.whatsapp.markup",
    "bridge.texts.whatsapp.es",  # what citizens, staff and visitors read
    "bridge.texts.matrix.es",
    "bridge.texts.management.en",
    "bridge.texts.reporters.es",
    "bridge.texts.reporters.en",
    "bridge.texts.web.es",
    "bridge.texts.web.en",
    "bridge.whatsapp.staff_events",
    "bridge.whatsapp.templates",
    "bridge.whatsapp.vcard",
    "bridge.matrix.room_policy",  # room policy
    "bridge.matrix.keyshare",  # key-share ledger
    "bridge.matrix.crosssign",  # cross-signing maths
    "bridge.matrix.management",  # management-room command parsing
    "bridge.matrix.appservice",  # an appservice transaction, read
    "bridge.admin.auth",  # admin tokens and scopes
    "bridge.matrix.crypto_parts",  # E2EE parts of appservice transactions
    "bridge.moderation.rules",
]
IO_LIBRARIES = ("aiohttp", "nio", "sqlalchemy", "alembic")


def loaded_by(module: str, watched: tuple[str, ...]) -> list[str]:
    """Which of `watched` importing `module` loads, in a fresh interpreter."""
    probe = (f"import sys, json, {module}; "
             f"print(json.dumps(sorted(m for m in {watched!r} if m in sys.modules)))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True, timeout=60)
    found: list[str] = json.loads(result.stdout)
    return found


@pytest.mark.parametrize("module", CORE)
def test_core_module_loads_no_io_library(module: str) -> None:
    found = loaded_by(module, IO_LIBRARIES)
    assert found == [], f"{module} loads {found}"


def test_the_probe_sees_an_io_library_when_one_is_loaded() -> None:
    """The check itself can fail: an adapter module is reported."""
    assert "aiohttp" in loaded_by("bridge.whatsapp.graph", IO_LIBRARIES)


# The ingest process (bridge.web.ingest_child) stores and answers webhooks only: it must
# start small, without the Matrix side or the migrations (bench/scale.py counts its memory
# with the bridge's).
NOT_IN_INGEST_CHILD = ("nio", "alembic", "bridge.matrix.api", "bridge.web.state",
                       "bridge.services")


def test_the_ingest_process_loads_neither_matrix_nor_migrations() -> None:
    found = loaded_by("bridge.web.ingest_child", NOT_IN_INGEST_CHILD)
    assert found == [], f"the ingest child loads {found}"
