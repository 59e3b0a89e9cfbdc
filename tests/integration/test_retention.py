"""The retention purge survives bad rows: each failure is logged and counted, the other
rows go, every run reports, and the scheduled loop keeps running (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bridge.config import Config
from bridge.db import Citizen, Database
from bridge.metrics import Metrics
from bridge.privacy import Cipher
from bridge.retention import Retention
from tests.fixtures.synapse import build_test_config


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return build_test_config("http://127.0.0.1:1", 1, tmp_path)


class Eraser:
    """The erasure path as the retention sees it (`ContactEraser`): it erases a contact
    by deleting the row, and fails for `poison` as a broken erasure would."""

    def __init__(self, db: Database, poison: str) -> None:
        self._db = db
        self.poison = poison

    async def erase_citizen(self, citizen: Citizen, actor: str, reason: str | None, *,
                            keep_new_messages: bool = False) -> object:
        if citizen.pseudonym_code == self.poison:
            raise RuntimeError("the homeserver refused")
        await self._db.citizens.delete(citizen.id)
        return None


async def contact(db: Database, code: str) -> Citizen:
    """A contact who wrote and never opted in to anything."""
    return await db.citizens.create(index_hash=secrets.token_hex(32), identifier_ct="ct",
                                    pseudonym_code=code)


def sample(metrics: Metrics, name: str, what: str) -> float:
    return metrics.registry.get_sample_value(name, {"what": what}) or 0.0


async def test_a_row_that_fails_does_not_stop_the_purge(
        db: Database, config: Config, caplog: pytest.LogCaptureFixture) -> None:
    cipher, metrics = Cipher(os.urandom(32)), Metrics()
    later = datetime.now(UTC) + timedelta(days=config.retention.never_consented_days + 1)
    await contact(db, "POISON1")
    erased = await contact(db, "GONE01")
    retention = Retention(db, cipher, config, metrics, contacts=Eraser(db, "POISON1"))

    with caplog.at_level(logging.INFO, logger="bridge.retention"):
        report = await retention.run(later)
    assert report.deleted["never-consented contacts"] == 1
    assert report.failed == {"never-consented contacts": 1}
    assert await db.citizens.get(erased.id) is None
    assert [c.pseudonym_code for c in await db.citizens.never_consented(later)] == ["POISON1"]
    assert sample(metrics, "civic_bridge_retention_failures_total", "never_consented") == 1
    assert sample(metrics, "civic_bridge_retention_purged_total", "never_consented") == 1
    assert metrics.registry.get_sample_value("civic_bridge_retention_runs_total") == 1
    assert any("retention purge" in r.getMessage() and "1 failed" in r.getMessage()
               for r in caplog.records)
    # Never who it was (the pseudonym), nor the failure's text.
    assert not any("POISON1" in r.getMessage() or "refused" in r.getMessage()
                   for r in caplog.records if r.name.startswith("bridge."))

    # The next run still purges what came meanwhile.
    came = await contact(db, "LATER1")
    report = await retention.run(later)
    assert report.deleted["never-consented contacts"] == 1
    assert await db.citizens.get(came.id) is None


async def test_the_loop_keeps_running_after_failures(db: Database, config: Config) -> None:
    cipher, metrics = Cipher(os.urandom(32)), Metrics()
    # Whoever is silent now is due.
    config = config.model_copy(update={"retention": config.retention.model_copy(
        update={"never_consented_days": 0})})
    await contact(db, "POISON1")
    loop = asyncio.create_task(Retention(db, cipher, config, metrics,
                                         contacts=Eraser(db, "POISON1")).loop(every=0.05))
    try:
        for n in range(3):
            due = await contact(db, f"OLD{n}")
            for _ in range(200):
                if await db.citizens.get(due.id) is None:
                    break
                assert not loop.done(), "the retention loop died"
                await asyncio.sleep(0.02)
            else:
                raise AssertionError(f"OLD{n} was never erased")
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
    assert sample(metrics, "civic_bridge_retention_failures_total", "never_consented") >= 3
