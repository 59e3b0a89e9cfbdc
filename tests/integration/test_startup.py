"""A bridge whose start cannot succeed gives up instead of holding on, not ready."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from bridge.app import BRIDGE, make_app
from bridge.db.engine import upgrade
from bridge.devtools.synapse import free_port
from tests.fixtures.synapse import SynapseHarness, build_test_config


async def test_start_refused_by_the_homeserver_stops_the_bridge(
        synapse: SynapseHarness, tmp_path: Path) -> None:
    """An as_token the homeserver does not know (401): retrying cannot help, so the
    active process steps down (exit status 3 from `run`), releasing the leader lock
    for a standby or a restart, rather than keeping it while never becoming ready."""
    config = build_test_config(synapse.synapse.url, free_port(), tmp_path)
    await upgrade(config.database.url)
    app = make_app(config)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        bridge = app[BRIDGE]
        await asyncio.wait_for(bridge.lost.wait(), 30)
        assert bridge.role == "lost" and not bridge.ready.is_set()
        assert bridge.stop_reason == "the bridge could not start (MatrixError)"
    finally:
        await runner.cleanup()
