"""The control of bench/whatsapp_relay.py's webhook acknowledgement: the issue's bare
handler (an aiohttp handler that checks the HMAC and commits the body to SQLite, WAL,
synchronous=FULL, before answering), in a process of its own, on the same machine and
under the same load as the bridge. What it takes at p99 is what the machine gives any
such handler then; the bridge's answer is read against it.

Usage: python _bare_webhook.py PORT APP_SECRET DB_PATH; prints "ready" once listening,
ends at end of input.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import sqlite3
import sys

from aiohttp import web


async def serve(port: int, secret: bytes, path: str) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS hooks (id INTEGER PRIMARY KEY, body BLOB)")

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, request.headers.get("X-Hub-Signature-256", "")):
            return web.Response(status=401)
        db.execute("INSERT INTO hooks (body) VALUES (?)", (body,))
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/whatsapp/webhook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the bench closes our input
    await runner.cleanup()
    db.close()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), sys.argv[2].encode(), sys.argv[3]))
