"""High availability: two real `civic-bridge run` processes on one PostgreSQL database.

Exactly one processes (the holder of the leader lock, bridge.leader); the other answers
503 to the appservice API and the webhook and 200 to /ready with role `standby`. When
the active one is killed with SIGKILL, right after acknowledging work it had no time
to do, the standby takes over within seconds and does that work: nothing lost, nothing
done twice. When the active one's lock connection is cut instead, it exits with status
3 and the other takes over.

Both processes use the session's real Synapse (the registration it loaded) and each
its own, empty `appservice.store_dir`: no volume is shared (the E2EE state is in the
database since revision 0016), and the process that takes over reuses the devices the
first one created. Work is driven straight at
the processes (signed webhooks, appservice transactions with the hs_token); their
logs are JSON (`logging.format: json`) and every line must parse.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import string
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from bridge.config import ENV_PREFIX, Config, load_config
from bridge.db import Database, upgrade
from bridge.devtools.simulator import CloudAPISimulator, SimulatedUser
from bridge.devtools.synapse import free_port
from bridge.leader import APPLICATION_NAME
from bridge.privacy import Privacy
from bridge.whatsapp.consent import OPT_IN_BUTTON
from tests.fixtures.db import PgServer
from tests.fixtures.synapse import SynapseHarness, other_free_port

pytestmark = pytest.mark.integration

PHONE_NUMBER_ID = "109876543210"
TAKEOVER_LIMIT = 15.0  # seconds; the measured time is printed (see the report, -s)


def citizen(name: str) -> SimulatedUser:
    wa_id = "346" + "".join(secrets.choice(string.digits) for _ in range(8))
    bsuid = "ES." + "".join(secrets.choice(string.ascii_letters) for _ in range(20))
    return SimulatedUser(wa_id=wa_id, user_id=bsuid, name=name)


def notice_to(who: SimulatedUser) -> Callable[[dict[str, Any]], bool]:
    return lambda sent: sent.get("type") == "interactive" and sent.get("to") == who.wa_id


async def eventually(check: Callable[[], Awaitable[Any]], what: str,
                     timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


class BridgeProcess:
    """One `python -m bridge run` subprocess; its stderr (JSON lines) is collected."""

    def __init__(self, name: str, config_path: Path, config: Config,
                 http: aiohttp.ClientSession) -> None:
        self.name = name
        self.config_path = config_path
        self.config = config
        self.http = http
        self.lines: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.config.appservice.listen_port}"

    def url_for(self, path: str) -> str:
        """/metrics on the metrics listener, everything else on the public one."""
        port = (self.config.metrics.listen_port if path == "/metrics"
                else self.config.appservice.listen_port)
        return f"http://127.0.0.1:{port}{path}"

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(ENV_PREFIX) and not k.startswith(("POD_", "KUBERNETES_"))}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "run", "-c", str(self.config_path),
            cwd=self.config_path.parent, env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode(errors="replace"))

    def logged(self, fragment: str) -> int | None:
        """Index of the first log line whose message contains `fragment`."""
        for i, line in enumerate(self.lines):
            if fragment in line:
                return i
        return None

    async def get(self, path: str) -> tuple[int, Any]:
        try:
            async with self.http.get(self.url_for(path),
                                     timeout=aiohttp.ClientTimeout(total=5)) as resp:
                body = await resp.read()
                try:
                    return resp.status, json.loads(body)
                except ValueError:
                    return resp.status, body.decode()
        except aiohttp.ClientError:
            return 0, None

    async def role(self) -> tuple[int, Any]:
        status, body = await self.get("/ready")
        return status, body.get("role") if isinstance(body, dict) else None

    async def wait_role(self, role: str, timeout: float = 60) -> float:
        """Wait until /ready is 200 with `role`; returns the time it took."""
        start = time.monotonic()

        async def check() -> bool:
            assert self.proc is not None
            if self.proc.returncode is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n"
                                     + "".join(self.lines[-30:]))
            return await self.role() == (200, role)
        await eventually(check, f"{self.name} to be {role}", timeout)
        return time.monotonic() - start

    async def transaction(self, txn_id: str, events: list[dict[str, Any]]) -> int:
        async with self.http.put(
                f"{self.url}/_matrix/app/v1/transactions/{txn_id}", json={"events": events},
                headers={"Authorization": f"Bearer {self.config.appservice.hs_token}"}) as resp:
            return resp.status

    async def metrics(self) -> dict[str, float]:
        status, body = await self.get("/metrics")
        assert status == 200
        return {f"{s.name}{sorted(s.labels.items())}": s.value
                for family in text_string_to_metric_families(body) for s in family.samples}

    async def wait_exit(self, timeout: float = 30) -> int:
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        if self._reader:
            await self._reader
        return code

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader:
            await self._reader


def matrix_events(count: int) -> list[dict[str, Any]]:
    """Notices in a room the bridge does not know: stored, processed, ignored."""
    room = f"!ha{secrets.token_hex(6)}:localhost"
    return [{"event_id": f"$ha{secrets.token_hex(8)}", "room_id": room, "type": "m.room.message",
             "sender": "@someone:localhost", "origin_server_ts": 1,
             "content": {"msgtype": "m.notice", "body": f"n{i}"}} for i in range(count)]


class Cluster:
    """Two bridge processes, their shared PostgreSQL database and Cloud API; each has its
    own store directory (nothing in it: the crypto state is in the database)."""

    def __init__(self, tmp: Path, synapse: SynapseHarness, db_url: str, wa: CloudAPISimulator,
                 api_base: str, http: aiohttp.ClientSession, staff: list[str] | None = None
                 ) -> None:
        self.wa = wa
        self.db_url = db_url
        base = synapse.config
        # A ghost prefix of our own (inside the registered `cb_` namespace): a new bot
        # user, so the session's other bridge and its cross-signing keys are not touched.
        prefix = f"cb_ha{secrets.token_hex(2)}"
        raw = {
            "homeserver": {"url": base.homeserver.url, "domain": base.homeserver.domain},
            "appservice": {"listen_host": "127.0.0.1", "as_token": base.appservice.as_token,
                           "hs_token": base.appservice.hs_token, "ghost_prefix": prefix},
            "database": {"url": db_url},
            "privacy": {"data_key": base.privacy.data_key, "index_key": base.privacy.index_key},
            "audit": {"key": base.audit.key},
            "admin": {"token": base.admin.token},
            "whatsapp": {"enabled": True, "api_base": api_base,
                         "phone_number_id": PHONE_NUMBER_ID, "access_token": wa.access_token,
                         "app_secret": wa.app_secret,
                         "verify_token": secrets.token_urlsafe(16)},
            "logging": {"level": "INFO", "format": "json"},
            "portals": {"staff": staff or []},
        }
        self.procs: list[BridgeProcess] = []
        for name in ("a", "b"):
            port = free_port()
            admin_port = other_free_port(port)
            conf_dir = tmp / name
            conf_dir.mkdir()
            path = conf_dir / "config.yaml"
            store = conf_dir / "store"  # the process's own, empty: no shared volume
            cfg = {**raw, "appservice": {**raw["appservice"], "listen_port": port,
                                         "store_dir": str(store)},
                   "admin": {**raw["admin"], "listen_port": admin_port},
                   "metrics": {"listen_port": other_free_port(port, admin_port)}}
            path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
            self.procs.append(BridgeProcess(name, path, load_config(path), http))

    async def stop(self) -> None:
        for p in self.procs:
            await p.stop()


@contextlib.asynccontextmanager
async def make_cluster(tmp_path: Path, synapse: SynapseHarness, pg_server: PgServer,
                       staff: list[str] | None = None) -> AsyncIterator[Cluster]:
    db_url = await pg_server.create()
    await upgrade(db_url)
    wa = CloudAPISimulator(access_token=secrets.token_urlsafe(24),
                           app_secret=secrets.token_hex(16), phone_number_id=PHONE_NUMBER_ID,
                           display_phone_number="+34 900 000 000")
    api_base = await wa.start()
    async with aiohttp.ClientSession() as http:
        c = Cluster(tmp_path, synapse, db_url, wa, api_base, http, staff)
        try:
            yield c
        finally:
            await c.stop()
            await wa.stop()


@pytest.fixture
async def cluster(tmp_path: Path, synapse: SynapseHarness,
                  pg_server: PgServer) -> AsyncIterator[Cluster]:
    async with make_cluster(tmp_path, synapse, pg_server) as c:
        yield c


async def _scalar(db: Database, sql: str, **params: Any) -> Any:
    async with db.engine.connect() as conn:
        return (await conn.execute(text(sql), params)).scalar()


async def test_standby_takes_over_and_loses_nothing(cluster: Cluster) -> None:
    a, b = cluster.procs
    wa = cluster.wa
    db = await Database.open(cluster.db_url)
    index = Privacy.from_config(cluster.procs[0].config.privacy).index
    try:
        # --- A starts first and is elected; B waits as a warm standby ------------------
        await a.start()
        await a.wait_role("active")
        await b.start()
        await b.wait_role("standby")
        status, ready = await b.get("/ready")
        assert status == 200 and ready["role"] == "standby"
        assert ready["database"] and ready["homeserver"]
        assert (await b.get("/health"))[0] == 200
        assert await b.transaction("standby-1", matrix_events(1)) == 503
        first = citizen("Ana")
        assert await wa.deliver(f"{b.url}/whatsapp/webhook",
                                wa.text_message(first, "hola")) == 503
        assert (await b.metrics())["civic_bridge_active[]"] == 0
        assert (await a.metrics())["civic_bridge_active[]"] == 1
        assert await _scalar(db, "SELECT count(*) FROM inbound") == 0  # B stored nothing

        # --- A works: first contact, opt-in, portal (bot and ghost devices in the store)
        hello = wa.text_message(first, "hola, una consulta")
        assert await wa.deliver(f"{a.url}/whatsapp/webhook", hello) == 200
        await wa.wait_for_sent(notice_to(first), timeout=60)
        assert await wa.deliver(f"{a.url}/whatsapp/webhook",
                                wa.button_reply(first, OPT_IN_BUTTON, "Acepto")) == 200
        await eventually(lambda: db.messages.by_wamid(index.wamid(hello["messages"][0]["id"])),
                         "the held first message relayed into the portal")

        # --- A acknowledges more work, cannot finish it, and is killed ------------------
        # Every send to WhatsApp fails (retryable) while A lives, so its notices stay
        # queued; the appservice transaction is large, so the worker is mid-way.
        wa.fail_next(130429, 429, count=10_000)
        newcomers = [citizen(f"Vecino {i}") for i in range(4)]
        again = wa.text_message(first, "¿sigue ahí?")
        statuses = await asyncio.gather(
            *(wa.deliver(f"{a.url}/whatsapp/webhook", wa.text_message(n, "buenas"))
              for n in newcomers),
            wa.deliver(f"{a.url}/whatsapp/webhook", again))
        assert statuses == [200] * 5
        events = matrix_events(40)
        assert await a.transaction("before-kill", events) == 200
        assert a.proc is not None
        a.proc.kill()  # SIGKILL: no cleanup, the lock goes with the database session
        killed_at = time.monotonic()
        assert await a.wait_exit() == -9
        wa._faults.clear()
        # Unfinished: rows not processed yet, or sends to WhatsApp not done (A's worker
        # may have processed every row by now; the notices it queued cannot have left).
        left = (await _scalar(db, "SELECT count(*) FROM inbound WHERE status = 'pending'")
                + await _scalar(db, "SELECT count(*) FROM outbox WHERE status <> 'sent'"))
        assert left > 0, "A finished everything before the kill; the test proves nothing"

        await b.wait_role("active", timeout=TAKEOVER_LIMIT + 30)

        async def started() -> bool:
            return (await b.get("/ready"))[1].get("started") is True
        await eventually(started, "B started", TAKEOVER_LIMIT + 30)
        takeover = time.monotonic() - killed_at
        print(f"\ntakeover after SIGKILL: {takeover:.2f}s ({left} inbound rows or sends "
              "were pending at the kill)")
        assert takeover < TAKEOVER_LIMIT

        # --- B did all of it, each thing once -------------------------------------------
        for n in newcomers:
            await wa.wait_for_sent(notice_to(n), timeout=60)
        await eventually(lambda: db.messages.by_wamid(index.wamid(again["messages"][0]["id"])),
                         "the message relayed by B through the ghost device A created")

        async def settled() -> bool:
            busy = await _scalar(db, "SELECT count(*) FROM inbound WHERE status IN "
                                     "('pending', 'failed')")
            queued = await _scalar(db, "SELECT count(*) FROM outbox WHERE status <> 'sent'")
            return busy == 0 and queued == 0
        await eventually(settled, "queues drained")
        assert await _scalar(db, "SELECT count(*) FROM inbound WHERE source = 'matrix' "
                                 "AND status = 'done'") == len(events)
        for who in (first, *newcomers):
            assert sum(notice_to(who)(s) for s in wa.sent) == 1, "a notice sent twice"
        assert (await b.metrics())["civic_bridge_active[]"] == 1

        # --- The killed process comes back (its supervisor restarts it): standby -------
        await a.start()
        await a.wait_role("standby")

        # --- B's lock connection is cut: B stops and exits 3, A takes over --------------
        async with db.engine.connect() as conn:
            cut = (await conn.execute(text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = :name AND datname = current_database() AND pid IN "
                "(SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted)"),
                {"name": APPLICATION_NAME})).scalar()
        assert cut == 1
        cut_at = time.monotonic()
        assert await b.wait_exit() == 3
        print(f"B noticed the cut lock connection and exited after "
              f"{time.monotonic() - cut_at:.2f}s")
        await a.wait_role("active")
        assert a.proc is not None
        a.proc.terminate()
        assert await a.wait_exit() == 0
    finally:
        await db.close()

    # --- Logs: JSON, one object per line; roles as expected; no identifiers -----------
    for p in (a, b):
        for line in p.lines:
            record = json.loads(line)
            assert {"ts", "level", "logger", "msg"} <= record.keys(), line
        for who in (first, *newcomers):
            assert not any(who.wa_id in line or who.user_id in line for line in p.lines)
    elected, device = b.logged("elected: this process"), b.logged("device open")
    assert b.logged("standby: another bridge process") is not None
    assert elected is not None and device is not None and elected < device, (
        "the standby opened a device before it was elected")
    # No overlap after the cut: B had stopped before A, which waited out its grace
    # period after winning the lock, started (same clock, ISO timestamps sort).
    lost_at = b.logged("leader lock lost: stopping")
    assert lost_at is not None
    stopped = b.lines[lost_at]
    a_elected = [line for line in a.lines if "elected: this process" in line][-1]
    assert json.loads(stopped)["ts"] < json.loads(a_elected)["ts"]
