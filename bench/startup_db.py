"""What the bridge's start-up costs per citizen on the database side (not a Synapse bench).

Seeds N citizens with portals straight into a new SQLite database
(tests/fixtures/many_citizens.py; `--opened` of their ghosts with stored crypto state,
and the bot's device holding a session with each), then runs what `civic-bridge run`
does with the bridge's own state: building the bridge (`build_bridge`: schema check,
audit seal, store key, legacy passes), the steps of `Lifecycle.start` other than the
bot's device and the transport probe, the read of the bot's device state, and the
retention run that follows ready. A stand-in homeserver answers `/keys/query` as Synapse
does for a device it has no keys of, and counts requests. Prints, per step, CPU seconds
(the stand-in's share included), SQL statements and requests to the homeserver; the
start is run twice (the first one also makes what a deployment already holds, e.g.
cross-signing seeds). The bot's state is read as rows only (the seeded pickles are not
real): unpickling adds about 12-15 microseconds per Olm or Megolm session.

    .venv/bin/python bench/startup_db.py --citizens 10000
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import secrets
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from aiohttp import web
from sqlalchemy import event

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge.config import parse_config  # noqa: E402
from bridge.db import Database, upgrade  # noqa: E402
from bridge.devtools.synapse import free_port  # noqa: E402
from bridge.matrix.keystore import RoomKeyStore  # noqa: E402
from bridge.matrix.queued import seal_unsealed  # noqa: E402
from bridge.privacy import Privacy  # noqa: E402
from bridge.services import Bridge, build_bridge  # noqa: E402
from bridge.types import UserID  # noqa: E402
from tests.fixtures.many_citizens import seed_citizens  # noqa: E402


def key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


async def homeserver(counts: dict[str, int]) -> web.AppRunner:
    async def handle(request: web.Request) -> web.Response:
        counts[request.path] = counts.get(request.path, 0) + 1
        if request.path.endswith("/keys/query"):
            return web.json_response({"device_keys": {}})
        return web.json_response({})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    return runner


async def measure(bridge: Bridge, counts: dict[str, int],
                  steps: dict[str, Callable[[], Awaitable[Any]]]) -> None:
    statements = 0

    def count(*_: Any) -> None:
        nonlocal statements
        statements += 1

    event.listen(bridge.db.engine.sync_engine, "before_cursor_execute", count)
    try:
        for name, step in steps.items():
            statements, requests = 0, sum(counts.values())
            cpu = time.process_time()
            await step()
            print(f"  {name:<28} {time.process_time() - cpu:7.3f} CPU-s "
                  f"{statements:7d} statements {sum(counts.values()) - requests:7d} requests")
    finally:
        event.remove(bridge.db.engine.sync_engine, "before_cursor_execute", count)


async def run(citizens: int, opened: int) -> None:
    logging.basicConfig(level=logging.ERROR)
    counts: dict[str, int] = {}
    runner = await homeserver(counts)
    hs_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", hs_port).start()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        config = parse_config({
            "homeserver": {"url": f"http://127.0.0.1:{hs_port}", "domain": "localhost"},
            "appservice": {"as_token": secrets.token_hex(32), "hs_token": secrets.token_hex(32),
                           "store_dir": str(workdir / "store")},
            "database": {"url": f"sqlite+aiosqlite:///{workdir / 'bridge.db'}"},
            "privacy": {"data_key": key(), "index_key": key()},
            "audit": {"key": key()},
            "admin": {"token": secrets.token_hex(32)},
        }, base=workdir)
        await upgrade(config.database.url)
        db = await Database.open(config.database.url)
        cpu = time.process_time()
        await seed_citizens(db, citizens, opened=opened, prefix=config.appservice.ghost_prefix,
                            bot=config.bot_mxid,
                            cipher=Privacy.from_config(config.privacy).cipher)
        await db.close()
        print(f"seeded {citizens} citizens ({opened} with crypto state) in "
              f"{time.process_time() - cpu:.1f} CPU-s")
        for attempt in (1, 2):
            print(f"start {attempt}:")
            cpu = time.process_time()
            bridge = await build_bridge(config)
            print(f"  {'build_bridge':<28} {time.process_time() - cpu:7.3f} CPU-s")
            try:
                await measure(bridge, counts, {
                    "seal_unsealed": partial(seal_unsealed, bridge.db, bridge.privacy.cipher),
                    "file_stores.migrate_all": bridge.devices.file_stores.migrate_all,
                    "ghosts.resume_unregistered": bridge.ghosts.resume_unregistered,
                    "trust.upgrade_existing": partial(bridge.trust.upgrade_existing,
                                                      Path(config.appservice.store_dir)),
                    "dead_letters.refresh_gauge": bridge.dead_letters.refresh_gauge,
                    "crypto.load(bot) (DB only)": partial(bridge.db.crypto.load,
                                                          config.bot_mxid),
                    "room keys of the bot": RoomKeyStore(
                        bridge.db.room_keys, bridge.privacy.cipher).owner(
                        UserID(config.bot_mxid)).load,
                    # Not before ready, but at once after it (Lifecycle.retention).
                    "retention run (after ready)": partial(bridge.retention_job().run,
                                                           datetime.now(UTC)),
                })
            finally:
                await bridge.close()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--citizens", type=int, default=1_000)
    parser.add_argument("--opened", type=int, default=None,
                        help="ghosts with stored crypto state (default: all)")
    args = parser.parse_args()
    asyncio.run(run(args.citizens, args.citizens if args.opened is None else args.opened))


if __name__ == "__main__":
    main()
