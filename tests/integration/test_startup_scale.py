"""Start-up does not grow with the citizens ever seen (issue 16): with thousands of
ghosts that need no work, starting reads none of them and asks the homeserver nothing
about them; only the few that do need work (a registration a crash cut short) are read.

The steps of `Lifecycle.start` that walk the bridge's own state are run on a bridge
built by the composition root, against a stand-in homeserver that counts requests (the
bot's device and the transport probe need a real Synapse and do not depend on N).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from sqlalchemy import event

from bridge.config import Config
from bridge.db import Database
from bridge.db.models import GhostRow
from bridge.devtools.synapse import free_port
from bridge.matrix.trust import UPGRADED_KEY
from bridge.services import Bridge, build_bridge
from bridge.types import DeviceID, UserID
from tests.fixtures.db import Backend
from tests.fixtures.many_citizens import seed_citizens
from tests.fixtures.synapse import build_test_config

CITIZENS = 2_000
OPENED = 20  # ghosts whose device was ever opened (crypto state stored)


class Homeserver:
    """Answers as Synapse does for ghosts it has no device keys of; counts requests."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.server = TestServer(app)

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests.append(request.path)
        if request.path.endswith("/keys/query"):
            return web.json_response({"device_keys": {}})
        return web.json_response({})


@contextmanager
def ghosts_loaded() -> Iterator[list[str]]:
    """The user IDs of the ghost rows read from the database meanwhile."""
    loaded: list[str] = []

    def on_load(target: GhostRow, _context: Any) -> None:
        loaded.append(target.user_id)

    event.listen(GhostRow, "load", on_load)
    try:
        yield loaded
    finally:
        event.remove(GhostRow, "load", on_load)


async def resume(bridge: Bridge, config: Config) -> None:
    """What `Lifecycle.start` does with the bridge's state once the bot is up."""
    await bridge.ghosts.resume_unregistered()
    await bridge.trust.upgrade_existing(Path(config.appservice.store_dir))


@pytest.fixture
async def homeserver() -> Any:
    hs = Homeserver()
    await hs.server.start_server()
    yield hs
    await hs.server.close()


async def test_a_start_reads_only_the_ghosts_that_need_work(
        db_backend: Backend, tmp_path: Path, homeserver: Homeserver) -> None:
    config = build_test_config(str(homeserver.server.make_url("")).rstrip("/"),
                               free_port(), tmp_path)
    config = config.model_copy(update={"database": config.database.model_copy(
        update={"url": await db_backend.migrated()})})
    db = await Database.open(config.database.url)
    try:
        prefix = config.appservice.ghost_prefix
        await seed_citizens(db, CITIZENS, opened=OPENED, prefix=prefix)
        cut_short = UserID(f"@{prefix}cortado{secrets.token_hex(4)}:localhost")
        await db.ghosts.create(cut_short, DeviceID("CBCORTADO"), "Ciudadano/a X", "citizen")
    finally:
        await db.close()

    # The first start after the upgrade: the one-off cross-signing pass asks about each
    # opened device once (the stand-in has no keys of them: logged, left to their open).
    bridge = await build_bridge(config)
    try:
        await resume(bridge, config)
        assert homeserver.requests.count("/_matrix/client/v3/keys/query") == OPENED
        assert (await bridge.db.ghosts.get(cut_short)).registered  # type: ignore[union-attr]
    finally:
        await bridge.close()

    # Every later start: no ghost read that needs no work, no request about any.
    homeserver.requests.clear()
    again = UserID(f"@{prefix}otro{secrets.token_hex(4)}:localhost")
    bridge = await build_bridge(config)
    try:
        await bridge.db.ghosts.create(again, DeviceID("CBOTRO"), "Ciudadano/a Y", "citizen")
        with ghosts_loaded() as loaded:
            await resume(bridge, config)
        assert loaded == [again]
        assert homeserver.requests == ["/_matrix/client/v3/register",
                                       f"/_matrix/client/v3/profile/{again}/displayname"]
    finally:
        await bridge.close()


async def test_an_upgrade_pass_cut_by_the_network_runs_again(
        db_backend: Backend, tmp_path: Path) -> None:
    config = build_test_config(f"http://127.0.0.1:{free_port()}", free_port(), tmp_path)
    config = config.model_copy(update={"database": config.database.model_copy(
        update={"url": await db_backend.migrated()})})
    db = await Database.open(config.database.url)
    try:
        await seed_citizens(db, 3, opened=3, prefix=config.appservice.ghost_prefix)
    finally:
        await db.close()
    bridge = await build_bridge(config)
    try:
        with pytest.raises(aiohttp.ClientError):  # nothing listens there
            await bridge.trust.upgrade_existing(Path(config.appservice.store_dir))
        assert await bridge.db.kv.get(UPGRADED_KEY) is None
    finally:
        await bridge.close()
