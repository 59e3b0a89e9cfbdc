"""Takeover after SIGKILL with no shared volume (issue 16 point 2): two `run` processes
on one PostgreSQL database, each with its own empty `appservice.store_dir`, behind a
proxy that plays the Kubernetes Service (a Synapse of the test's own pushes
transactions to it, so devices are fed by transactions as in production). Staff, on
the Element stack (the matrix-js-sdk checker), read the citizen's message relayed by the
process that took over: decrypted, no shield, from the ghost's same device, under the
room key they already had (the outbound Megolm session continued from the database).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import text

from bridge.db import Database
from bridge.devtools.synapse import LocalSynapse, free_port
from bridge.homeserver.settings import module_entry
from bridge.matrix.api import MatrixAPI
from bridge.privacy import Privacy
from bridge.registration import registration_yaml
from bridge.types import UserID
from bridge.whatsapp.consent import OPT_IN_BUTTON
from tests.fixtures.db import PgServer
from tests.fixtures.faultproxy import FaultProxy
from tests.fixtures.jschecker import run_checker
from tests.fixtures.synapse import SynapseHarness, build_test_config
from tests.integration.test_ha import (
    TAKEOVER_LIMIT,
    citizen,
    eventually,
    make_cluster,
    notice_to,
)

pytestmark = pytest.mark.integration



async def _outbound(db: Database, ghost: str, room_id: str) -> tuple[str | None, list[Any]]:
    """The ghost's outbound Megolm session in the room and whom it was shared with."""
    async with db.engine.connect() as conn:
        row = (await conn.execute(text(
            "SELECT session_id, shared_with FROM crypto_megolm_outbound "
            "WHERE user_id = :ghost AND room_id = :room"), {"ghost": ghost, "room": room_id})
        ).first()
    return (None, []) if row is None else (row[0], json.loads(row[1]))


@contextlib.asynccontextmanager
async def _homeserver(tmp: Path) -> AsyncIterator[tuple[SynapseHarness, FaultProxy]]:
    """A Synapse of its own whose appservice URL is a proxy, the stand-in for the
    Kubernetes Service in front of both processes: it forwards to the active one
    (`proxy.upstream`), so transactions reach whichever process leads."""
    tmp.mkdir(parents=True, exist_ok=True)
    proxy = FaultProxy("http://127.0.0.1:9")
    hs_port = free_port()
    config = build_test_config(f"http://127.0.0.1:{hs_port}", proxy.port, tmp)
    registration = tmp / "registration.yaml"
    registration.write_text(registration_yaml(config), encoding="utf-8")
    server = LocalSynapse(tmp / "synapse", registration_files=[registration], port=hs_port,
                          settings={"modules": [module_entry(config)]})
    await proxy.start()
    try:
        async with server:
            yield SynapseHarness(server, config, tmp, registration), proxy
    finally:
        await proxy.stop()


async def test_staff_read_the_new_leader_without_new_keys_or_warnings(
        tmp_path: Path, pg_server: PgServer) -> None:
    async with _homeserver(tmp_path / "hs") as (synapse, proxy):
        await _journey(tmp_path, synapse, proxy, pg_server)


async def _journey(tmp_path: Path, synapse: SynapseHarness, proxy: FaultProxy,
                   pg_server: PgServer) -> None:
    localpart, password = f"checker_{secrets.token_hex(3)}", secrets.token_urlsafe(16)
    staff = await synapse.synapse.register_user(localpart, password)
    async with make_cluster(tmp_path, synapse, pg_server, staff=[staff]) as cluster:
        a, b = cluster.procs
        proxy.upstream = a.url
        wa = cluster.wa
        db = await Database.open(cluster.db_url)
        index = Privacy.from_config(a.config.privacy).index
        try:
            await a.start()
            await a.wait_role("active")
            await b.start()
            await b.wait_role("standby")

            # A: first contact, opt-in, the portal with staff invited.
            ana = citizen("Ana")
            hello = wa.text_message(ana, "hola, una consulta")
            assert await wa.deliver(f"{a.url}/whatsapp/webhook", hello) == 200
            await wa.wait_for_sent(notice_to(ana), timeout=60)
            assert await wa.deliver(f"{a.url}/whatsapp/webhook",
                                    wa.button_reply(ana, OPT_IN_BUTTON, "Acepto")) == 200
            first = await eventually(
                lambda: db.messages.by_wamid(index.wamid(hello["messages"][0]["id"])),
                "the first message relayed into the portal")
            room_id = first.room_id
            row = await db.citizens.by_index(index.digest(ana.user_id))
            assert row is not None and row.ghost_user_id is not None
            ghost = UserID(row.ghost_user_id)
            record = await db.ghosts.get(ghost)
            assert record is not None
            after = f"despues del relevo {secrets.token_hex(3)}"

            async with run_checker(synapse.synapse.url, staff, password, room_id,
                                   expect_body=after, expect_sender=ghost,
                                   timeout=240) as run:
                # A relays until its ghost has shared its session with staff's new
                # device (a device-list change in a transaction tells it of the device).
                checker_device = run.lines[0]["device_id"]
                session = None
                for attempt in range(12):
                    before = wa.text_message(ana, f"antes del relevo {attempt}")
                    assert await wa.deliver(f"{a.url}/whatsapp/webhook", before) == 200
                    wamid = index.wamid(before["messages"][0]["id"])
                    await eventually(partial(db.messages.by_wamid, wamid), "relayed by A")
                    session, shared = await _outbound(db, ghost, room_id)
                    if [staff, checker_device] in shared:
                        break
                    await asyncio.sleep(5)
                else:
                    raise AssertionError("A's ghost never shared its room key with staff")
                assert a.proc is not None
                a.proc.kill()  # SIGKILL: nothing flushed at exit
                killed_at = time.monotonic()
                assert await a.wait_exit() == -9
                await b.wait_role("active", timeout=TAKEOVER_LIMIT + 30)
                proxy.upstream = b.url  # the Service now routes to the ready process

                async def started() -> bool:
                    return (await b.get("/ready"))[1].get("started") is True
                await eventually(started, "B started", TAKEOVER_LIMIT + 30)
                print(f"\ntakeover after SIGKILL: {time.monotonic() - killed_at:.2f}s")

                assert await wa.deliver(f"{b.url}/whatsapp/webhook",
                                        wa.text_message(ana, after)) == 200
                message = await run.wait_for("message", 150)
            assert message["decrypted"] is True, run.report()
            assert (message["body"], message["sender"]) == (after, ghost), run.report()
            assert message["sender_device"] == record.device_id, run.report()
            assert (message["shield_colour"], message["shield_reason"]) == ("NONE", None), (
                run.report())
            # B went on with the session staff already had: no new room key was needed.
            assert (await _outbound(db, ghost, room_id))[0] == session
            # Still one device for the ghost on the server, the one A made.
            async with aiohttp.ClientSession() as http:
                api = MatrixAPI(http, synapse.synapse.url, synapse.config.appservice.as_token)
                query = await api.request("POST", "/_matrix/client/v3/keys/query",
                                          json={"device_keys": {ghost: []}})
            assert list(query["device_keys"][ghost]) == [record.device_id]
            # Neither process wrote a crypto file: there is no volume to share.
            for proc in (a, b):
                store = Path(proc.config.appservice.store_dir)
                assert not store.exists() or not any(store.rglob("*.db")), store
        finally:
            await db.close()
