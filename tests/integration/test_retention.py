"""The retention purge survives bad rows: each failure is logged and counted, the other
rows go, every run reports, and the scheduled loop keeps running (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bridge.config import Config
from bridge.db import Database
from bridge.metrics import Metrics
from bridge.privacy import AAD_PAYLOAD, Cipher
from bridge.retention import Retention
from bridge.whatsapp.outbound import HELD_KEY
from tests.fixtures.synapse import build_test_config


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return build_test_config("http://127.0.0.1:1", 1, tmp_path)


async def hold(db: Database, cipher: Cipher, event_id: str, at: datetime) -> None:
    sealed = cipher.encrypt_json({"at": at.isoformat(), "room_id": "!r",
                                  "payload": {"type": "text", "body": "x"}}, aad=AAD_PAYLOAD)
    await db.kv.set(HELD_KEY + event_id, sealed)


def sample(metrics: Metrics, name: str, what: str) -> float:
    return metrics.registry.get_sample_value(name, {"what": what}) or 0.0


async def test_a_row_that_fails_does_not_stop_the_purge(
        db: Database, config: Config, caplog: pytest.LogCaptureFixture) -> None:
    cipher, metrics = Cipher(os.urandom(32)), Metrics()
    old = datetime.now(UTC) - timedelta(days=2)
    # Sealed with a key the bridge no longer has: it cannot be read, so not purged.
    await hold(db, Cipher(os.urandom(32)), "$poison", old)
    await hold(db, cipher, "$old", old)
    retention = Retention(db, cipher, config, metrics)

    with caplog.at_level(logging.INFO, logger="bridge.retention"):
        report = await retention.run(datetime.now(UTC))
    assert report.deleted["unconfirmed staff messages"] == 1
    assert report.failed == {"unconfirmed staff messages": 1}
    assert await db.kv.get(HELD_KEY + "$old") is None
    assert await db.kv.get(HELD_KEY + "$poison") is not None
    assert sample(metrics, "civic_bridge_retention_failures_total", "held_staff_messages") == 1
    assert sample(metrics, "civic_bridge_retention_purged_total", "held_staff_messages") == 1
    assert metrics.registry.get_sample_value("civic_bridge_retention_runs_total") == 1
    assert any("retention purge" in r.getMessage() and "1 failed" in r.getMessage()
               for r in caplog.records)
    # Never the row's key (it holds a Matrix event id); SQL drivers' debug logs aside.
    assert not any(HELD_KEY in r.getMessage() for r in caplog.records
                   if r.name.startswith("bridge."))

    # The next run still purges what came meanwhile.
    await hold(db, cipher, "$later", old)
    report = await retention.run(datetime.now(UTC))
    assert report.deleted["unconfirmed staff messages"] == 1
    assert await db.kv.get(HELD_KEY + "$later") is None


async def test_the_loop_keeps_running_after_failures(db: Database, config: Config) -> None:
    cipher, metrics = Cipher(os.urandom(32)), Metrics()
    old = datetime.now(UTC) - timedelta(days=2)
    await hold(db, Cipher(os.urandom(32)), "$poison", old)
    loop = asyncio.create_task(Retention(db, cipher, config, metrics).loop(every=0.05))
    try:
        for n in range(3):
            await hold(db, cipher, f"$old{n}", old)
            for _ in range(200):
                if await db.kv.get(HELD_KEY + f"$old{n}") is None:
                    break
                assert not loop.done(), "the retention loop died"
                await asyncio.sleep(0.02)
            else:
                raise AssertionError(f"$old{n} was never purged")
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
    assert sample(metrics, "civic_bridge_retention_failures_total", "held_staff_messages") >= 3
