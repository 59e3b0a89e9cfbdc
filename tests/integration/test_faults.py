"""Fault injection: nothing lost, nothing duplicated, nothing stuck.

A real `civic-bridge run` process, its own real Synapse, the Cloud API simulator behind a
chaos proxy, and SQLite or PostgreSQL. Citizens write (text and an image each) and the
service desk answers while, in turn:

(a) Synapse is stopped for 30 s and started again (half the citizens opt in meanwhile,
    so their portals are created only after the outage);
(b) the Graph API answers 429 or 500 to a third of the calls and drops the connection
    on a tenth (the proxy drops before forwarding: Graph never saw those calls);
(c) the bridge is SIGKILLed three times at random points and restarted;
(d) PostgreSQL restarts once (PostgreSQL run only).

The test drives the bridge as Meta and Synapse do: a webhook the bridge did not answer
with 200 is delivered again, and every message Graph accepted gets a `sent` status
(echoing its `biz_opaque_callback_data`), which is how a send cut short by a SIGKILL
is settled without being sent twice. Afterwards: every inbound message is in its
portal exactly once, in order per citizen, decryptable by the staff member; every staff
reply reached Graph exactly once; no queue holds anything.

The CI run is small; `bench/faults.py` runs the full size (1,000 inbound messages from
20 citizens, 200 replies) through the same code with `CIVIC_BRIDGE_FAULT_SCALE=full`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import secrets
import shutil
import string
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from nio import EncryptionError, Event, MegolmEvent, RoomMessageText
from sqlalchemy import text

from bridge.config import ENV_PREFIX
from bridge.db import Database, upgrade
from bridge.devtools.simulator import CloudAPISimulator, SimulatedUser
from bridge.devtools.synapse import LocalSynapse, LocalSynapseError, free_port
from bridge.registration import registration_yaml
from bridge.whatsapp.consent import OPT_IN_BUTTON
from tests.fixtures.db import PgServer
from tests.fixtures.staff import StaffClient, staff_client
from tests.fixtures.synapse import build_test_config, other_free_port

pytestmark = [pytest.mark.integration, pytest.mark.faults]

PHONE_NUMBER_ID = "109876543210"
FULL = os.environ.get("CIVIC_BRIDGE_FAULT_SCALE") == "full"
CITIZENS = 20 if FULL else 6
MESSAGES = 50 if FULL else 12   # inbound texts per citizen, the first one held before opt-in
REPLIES = 10 if FULL else 3     # staff replies per citizen
OUTAGE_SECONDS = 30.0
KILLS = 3
SETTLE_SECONDS = 600 if FULL else 240


@dataclass
class Figures:
    """What the run measured, printed at the end (see `-s` or bench/faults.py)."""

    started: float = field(default_factory=time.monotonic)
    webhook_retries: int = 0
    chaos_failed: int = 0
    chaos_dropped: int = 0
    kills: list[float] = field(default_factory=list)
    pending_at_kill: list[int] = field(default_factory=list)
    settle_seconds: float = 0.0

    def report(self, backend: str, inbound: int, replies: int) -> str:
        return json.dumps({
            "backend": backend, "inbound": inbound, "staff_replies": replies,
            "webhook_redeliveries": self.webhook_retries,
            "graph_calls_failed": self.chaos_failed, "graph_calls_dropped": self.chaos_dropped,
            "kills_at_s": [round(k, 1) for k in self.kills],
            "inbound_pending_at_kills": self.pending_at_kill,
            "settle_s": round(self.settle_seconds, 1),
            "total_s": round(time.monotonic() - self.started, 1),
            "lost": 0, "duplicated": 0,  # asserted before this is printed
        })


class ChaosProxy:
    """Forwards Graph API calls to the simulator; fails or drops a share of them."""

    def __init__(self, target: str, figures: Figures, seed: int) -> None:
        self.target = target.rstrip("/")
        self.figures = figures
        self.rng = random.Random(seed)
        self.fail_ratio = 0.0
        self.drop_ratio = 0.0
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self._http = aiohttp.ClientSession()
        host, port = self._runner.addresses[0][:2]
        return f"http://{host}:{port}"

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        draw = self.rng.random()
        if draw < self.drop_ratio:
            self.figures.chaos_dropped += 1
            assert request.transport is not None
            request.transport.abort()  # RST: the client sees the connection die
            return web.Response(status=499)
        if draw < self.drop_ratio + self.fail_ratio:
            self.figures.chaos_failed += 1
            status, code = self.rng.choice([(429, 130429), (500, 1), (503, 2)])
            return web.json_response({"error": {
                "message": "chaos", "type": "OAuthException", "code": code,
                "fbtrace_id": "Achaos"}}, status=status)
        assert self._http is not None
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() in ("authorization", "content-type")}
        async with self._http.request(request.method, self.target + request.path_qs,
                                      data=await request.read(), headers=headers) as resp:
            return web.Response(body=await resp.read(), status=resp.status,
                                content_type=resp.content_type)


class BridgeProcess:
    """`python -m bridge run` as a subprocess, under a supervisor that starts it again
    whenever it exits (SIGKILL, or exit 3 when its leader lock connection is lost)."""

    def __init__(self, config_path: Path, url: str, http: aiohttp.ClientSession) -> None:
        self.config_path = config_path
        self.url = url
        self.http = http
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self.starts = 0
        self._readers: list[asyncio.Task[None]] = []

    async def _launch(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "run", "-c", str(self.config_path),
            cwd=self.config_path.parent, env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        self.starts += 1
        self._readers.append(asyncio.create_task(self._read(self.proc)))

    async def supervise(self) -> None:
        """Runs until cancelled."""
        while True:
            if self.proc is None or self.proc.returncode is not None:
                await self._launch()
            await asyncio.sleep(0.2)

    async def ready(self) -> bool:
        if self.proc is None or self.proc.returncode is not None:
            return False
        try:
            async with self.http.get(self.url + "/ready",
                                     timeout=aiohttp.ClientTimeout(total=3)) as resp:
                body = await resp.json(content_type=None)
                return resp.status == 200 and body.get("started") is True
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return False

    async def wait_ready(self) -> None:
        try:
            await eventually(self.ready, "the bridge to be ready", 120)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; its last log lines:\n"
                                 + "".join(self.lines[-30:])) from None

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            self.lines.append(line.decode(errors="replace"))

    async def kill(self) -> None:
        """SIGKILL; the supervisor (if running) starts it again."""
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()

    async def close(self) -> None:
        await self.kill()
        await asyncio.gather(*self._readers, return_exceptions=True)


# Background tasks of the running test (Meta's status sender, the desk, the supervisor):
# one that dies must fail the test at once, not leave it waiting for what it would do.
BACKGROUND: list[asyncio.Task[None]] = []


def check_background() -> None:
    for task in BACKGROUND:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise AssertionError(f"background task {task.get_name()} died") \
                from task.exception()


async def eventually(check: Callable[[], Awaitable[Any]], what: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := await check()):
        check_background()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.2)
    return result


def phase(figures: Figures, name: str) -> None:
    print(f"[{time.monotonic() - figures.started:6.1f} s] {name}", flush=True)


def new_citizen(i: int) -> SimulatedUser:
    digits = "".join(secrets.choice(string.digits) for _ in range(8))
    bsuid = "ES." + "".join(secrets.choice(string.ascii_letters) for _ in range(20))
    return SimulatedUser(wa_id=f"346{digits}", user_id=bsuid, name=f"Vecina {i}")


class Meta:
    """The WhatsApp side as Meta runs it: redelivers webhooks until answered 200 and
    reports a `sent` status for every message Graph accepted."""

    def __init__(self, wa: CloudAPISimulator, bridge: BridgeProcess,
                 http: aiohttp.ClientSession, figures: Figures,
                 citizens: dict[str, SimulatedUser]) -> None:
        self.wa = wa
        self.bridge = bridge
        self.http = http
        self.figures = figures
        self.by_number = citizens
        self._statused = 0

    async def deliver(self, value: dict[str, Any]) -> None:
        body = json.dumps(self.wa.envelope(value), separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json",
                   "X-Hub-Signature-256": self.wa.sign(body)}
        deadline = time.monotonic() + 180
        while True:
            try:
                async with self.http.post(self.bridge.url + "/whatsapp/webhook", data=body,
                                          headers=headers,
                                          timeout=aiohttp.ClientTimeout(total=10)) as resp:
                    # 5xx: the bridge is starting, standing by or lost its database;
                    # a 4xx would mean it refused a valid webhook for good.
                    assert resp.status == 200 or resp.status >= 500, (
                        f"webhook answered {resp.status}")
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            self.figures.webhook_retries += 1
            if time.monotonic() > deadline:
                raise AssertionError("the webhook was not accepted for 180 s")
            await asyncio.sleep(0.3)

    async def statuses(self) -> None:
        """Runs until cancelled: a `sent` status for each accepted message, in order."""
        while True:
            while self._statused < len(self.wa.sent):
                body = self.wa.sent[self._statused]
                wamid = self.wa.sent_ids[self._statused]
                self._statused += 1
                who = self.by_number.get(str(body.get("to", "")))
                if wamid is not None and who is not None:
                    await self.deliver(self.wa.status_update(wamid, "sent", who))
            await asyncio.sleep(0.2)


class Desk:
    """The service-desk staff member: joins every portal, answers, reads everything."""

    def __init__(self, staff: StaffClient, synapse: LocalSynapse) -> None:
        self.staff = staff
        self.synapse = synapse
        self.portal_of: dict[int, str] = {}  # citizen index -> portal room

    async def sync_and_join(self) -> None:
        """Runs until cancelled; rides out Synapse outages."""
        while True:
            try:
                await self.staff.sync_once(timeout_ms=1000)
                # Every pending invite, not only this sync's: a join that failed (Synapse
                # restarting) is tried again.
                for room_id in list(self.staff.client.invited_rooms):
                    await self.staff.join(room_id)
                for room_id in set(self.staff.client.rooms) - set(self.portal_of.values()):
                    for event in await self.history(room_id):
                        if isinstance(event, RoomMessageText) and " m000" in event.body:
                            self.portal_of[int(event.body.split()[0][1:])] = room_id
            except (AssertionError, LocalSynapseError, aiohttp.ClientError, TimeoutError):
                await asyncio.sleep(1)

    async def reply(self, room_id: str, body: str) -> None:
        """Send `body` encrypted; first make sure the room is encrypted on the server, not
        only that this client's /sync has caught up with its state."""
        for _ in range(20):
            room = self.staff.client.rooms.get(room_id)
            if room is not None and room.encrypted:
                await self.staff.send_text(room_id, body)
                return
            status, _state = await self.synapse.request(
                "GET", f"/_matrix/client/v3/rooms/{room_id}/state/m.room.encryption/",
                token=self.staff.client.access_token)
            if status == 404:
                raise AssertionError(f"{room_id} has no m.room.encryption on the server")
            await asyncio.sleep(0.5)  # /sync has not brought the state yet
        raise AssertionError(f"{room_id}: the desk's /sync never showed it encrypted")

    async def history(self, room_id: str) -> list[Event]:
        """The whole room timeline, oldest first, read with /messages (a /sync timeline
        can be gappy). Undecryptable events stay MegolmEvent."""
        token = self.staff.client.access_token
        events: list[Event] = []
        start: str | None = None
        while True:
            query = "dir=b&limit=500" + (f"&from={start}" if start else "")
            status, page = await self.synapse.request(
                "GET", f"/_matrix/client/v3/rooms/{room_id}/messages?{query}", token=token)
            if status != 200:
                raise AssertionError(f"/messages answered {status}")
            for raw in page.get("chunk", []):
                event = Event.parse_event(raw)
                if isinstance(event, MegolmEvent):
                    event.room_id = room_id
                    with contextlib.suppress(EncryptionError):  # stays a MegolmEvent
                        event = self.staff.client.decrypt_event(event)
                events.append(event)
            start = page.get("end")
            if not start or not page.get("chunk"):
                break
        events.reverse()
        return events


async def _scalar(db: Database, sql: str) -> int:
    async with db.engine.connect() as conn:
        return int((await conn.execute(text(sql))).scalar() or 0)


async def _queues(db: Database) -> str:
    """Where things stand, for a failure message (counts only)."""
    async with db.engine.connect() as conn:
        inbound = (await conn.execute(text(
            "SELECT source, status, count(*) FROM inbound GROUP BY source, status"))).all()
        outbox = (await conn.execute(text(
            "SELECT status, count(*) FROM outbox GROUP BY status"))).all()
    return f"inbound {[tuple(r) for r in inbound]}, outbox {[tuple(r) for r in outbox]}"


async def _restart_postgres(db_url: str) -> str:
    """Restart the local PostgreSQL cluster; where that is not ours to restart (a remote
    server in $CIVIC_BRIDGE_TEST_PG), cut every connection to the bridge's database."""
    clusters = Path("/etc/postgresql")
    if shutil.which("pg_ctlcluster") and clusters.is_dir() and os.geteuid() == 0:
        version = sorted(p.name for p in clusters.iterdir())[-1]
        proc = await asyncio.create_subprocess_exec(
            "pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        return "restarted"
    db = await Database.open(db_url)
    try:
        async with db.engine.connect() as conn:
            await conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                    "WHERE datname = current_database() "
                                    "AND pid <> pg_backend_pid()"))
    finally:
        await db.close()
    return "connections cut"


@pytest.fixture(scope="module")
async def own_synapse(tmp_path_factory: pytest.TempPathFactory
                      ) -> AsyncIterator[tuple[LocalSynapse, Path]]:
    """A Synapse of this module's own: the test stops it, and the session's is shared."""
    workdir = tmp_path_factory.mktemp("faults")
    hs_port = free_port()
    as_port = other_free_port(hs_port)
    config = build_test_config(f"http://127.0.0.1:{hs_port}", as_port, workdir)
    registration = workdir / "registration.yaml"
    registration.write_text(registration_yaml(config), encoding="utf-8")
    server = LocalSynapse(workdir / "synapse", registration_files=[registration], port=hs_port)
    (workdir / "config.json").write_text(config.model_dump_json(), encoding="utf-8")
    await server.start()
    try:
        yield server, workdir
    finally:
        await server.stop()


# The whole run has a deadline of its own: pytest-timeout's signal can land in a
# background task and leave the test waiting (seen once).
RUN_DEADLINE = 1800 if FULL else 600


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> tuple[str, PgServer | None]:
    # Sync, so that only the chosen backend's session fixture is asked for.
    if request.param == "postgresql":
        return "postgresql", request.getfixturevalue("pg_server")
    return "sqlite", None


@pytest.mark.timeout(RUN_DEADLINE + 120)
async def test_nothing_lost_or_duplicated_under_faults(
        backend: tuple[str, PgServer | None], own_synapse: tuple[LocalSynapse, Path],
        tmp_path: Path) -> None:
    async with asyncio.timeout(RUN_DEADLINE):
        await _fault_run(*backend, own_synapse, tmp_path)


async def _fault_run(backend: str, pg: PgServer | None,
                     own_synapse: tuple[LocalSynapse, Path], tmp_path: Path) -> None:
    synapse, workdir = own_synapse
    base = json.loads((workdir / "config.json").read_text(encoding="utf-8"))
    if pg is not None:
        db_url = await pg.create()
    else:
        db_url = f"sqlite+aiosqlite:///{tmp_path / 'bridge.db'}"
    await upgrade(db_url)
    figures = Figures()
    seed = secrets.randbits(32)
    print(f"\nfault run seed {seed}")
    rng = random.Random(seed)
    wa = CloudAPISimulator(access_token=secrets.token_urlsafe(24),
                           app_secret=secrets.token_hex(16), phone_number_id=PHONE_NUMBER_ID,
                           display_phone_number="+34 900 000 000")
    api_base = await wa.start()
    proxy = ChaosProxy(api_base.rsplit("/", 1)[0], figures, seed)
    proxy_base = await proxy.start() + "/" + api_base.rsplit("/", 1)[1]
    desk_user = await staff_client(synapse, "desk", store_root=tmp_path / "nio")
    # nio retries through an outage with a backoff that grows to a minute: keep it short.
    desk_user.client.config = dataclasses.replace(desk_user.client.config,
                                                  max_timeout_retry_wait_time=2)
    port = base["appservice"]["listen_port"]
    raw = {
        "homeserver": base["homeserver"],
        "appservice": {**{k: base["appservice"][k] for k in ("as_token", "hs_token")},
                       "listen_host": "127.0.0.1", "listen_port": port,
                       "ghost_prefix": f"cb_f{secrets.token_hex(2)}",
                       "store_dir": str(tmp_path / "store")},
        "database": {"url": db_url},
        "privacy": {k: base["privacy"][k] for k in ("data_key", "index_key")},
        "audit": {"key": base["audit"]["key"]},
        "admin": {"token": base["admin"]["token"], "users": [desk_user.user_id],
                  "listen_port": base["admin"]["listen_port"]},
        "metrics": {"listen_port": base["metrics"]["listen_port"]},
        "portals": {"staff": [desk_user.user_id]},
        "whatsapp": {"enabled": True, "api_base": proxy_base, "phone_number_id": PHONE_NUMBER_ID,
                     "access_token": wa.access_token, "app_secret": wa.app_secret,
                     "verify_token": secrets.token_urlsafe(16),
                     "outbox_confirm_window_seconds": 60},
        "logging": {"level": "INFO", "format": "json"},
    }
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    http = aiohttp.ClientSession()
    bridge = BridgeProcess(config_path, f"http://127.0.0.1:{port}", http)
    citizens = [new_citizen(i) for i in range(CITIZENS)]
    sent_texts = {i: [f"c{i} m{j:03d}" for j in range(MESSAGES)] for i in range(CITIZENS)}
    replies = {i: [f"reply c{i} r{k:02d}" for k in range(REPLIES)] for i in range(CITIZENS)}
    tasks: list[asyncio.Task[None]] = []
    db: Database | None = None
    desk = Desk(desk_user, synapse)
    BACKGROUND.clear()
    try:
        tasks.append(asyncio.create_task(bridge.supervise(), name="supervisor"))
        BACKGROUND.extend(tasks)
        await bridge.wait_ready()
        db = await Database.open(db_url)
        meta = Meta(wa, bridge, http, figures, {c.wa_id or "": c for c in citizens})
        tasks += [asyncio.create_task(meta.statuses(), name="statuses"),
                  asyncio.create_task(desk.sync_and_join(), name="desk")]
        BACKGROUND[:] = tasks
        phase(figures, "bridge ready; opting in the first half")
        cursor = dict.fromkeys(range(CITIZENS), 0)

        async def write(i: int, count: int, pace: float = 0.0) -> None:
            """Citizen i sends its next `count` texts, one after the other (`pace`: up
            to that many seconds between two, so that faults land mid-traffic)."""
            for _ in range(count):
                if pace:
                    await asyncio.sleep(rng.uniform(0, pace))
                j = cursor[i]
                if j >= MESSAGES:
                    return
                cursor[i] += 1
                await meta.deliver(wa.text_message(citizens[i], sent_texts[i][j]))

        async def opt_in(i: int) -> None:
            await write(i, 1)  # first contact: held until consent
            await wa.wait_for_sent(lambda s, c=citizens[i]: s.get("type") == "interactive"
                                   and s.get("to") == c.wa_id, timeout=120)
            await meta.deliver(wa.button_reply(citizens[i], OPT_IN_BUTTON, "Acepto"))

        async def image(i: int) -> None:
            media_id = wa.add_media(secrets.token_bytes(2048), "image/jpeg")
            await meta.deliver(wa.media_message(citizens[i], "image", media_id,
                                                caption=f"c{i} foto"))

        half = CITIZENS // 2
        per_round = max(1, (MESSAGES - 1) // 4)
        await asyncio.gather(*(opt_in(i) for i in range(half)))

        # (a) Synapse down for 30 s: messages, images and opt-ins keep arriving.
        phase(figures, "(a) Synapse stopped")
        await synapse.stop()
        outage = asyncio.gather(*(write(i, per_round) for i in range(half)),
                                *(image(i) for i in range(half)),
                                *(opt_in(i) for i in range(half, CITIZENS)))
        await asyncio.sleep(OUTAGE_SECONDS)
        await outage
        await synapse.start()
        phase(figures, "(a) Synapse started again")
        try:
            await eventually(lambda: asyncio.sleep(0, len(desk.portal_of) == CITIZENS),
                             "every portal, with the first message, to reach the desk", 180)
        except AssertionError as exc:
            failures = [line for line in bridge.lines
                        if '"level": "WARNING"' in line or '"level": "ERROR"' in line]
            raise AssertionError(f"{exc}: {len(desk.portal_of)} of {CITIZENS}; joined "
                                 f"{len(desk_user.client.rooms)}, invited "
                                 f"{len(desk_user.client.invited_rooms)}; "
                                 f"{await _queues(db)}; the bridge's last warnings:\n"
                                 + "".join(failures[-15:])) from None

        # (b) Graph fails a third of the calls and drops a tenth, from now on.
        proxy.fail_ratio, proxy.drop_ratio = 1 / 3, 1 / 10
        phase(figures, "(b) Graph failing a third, dropping a tenth")

        async def answer(i: int, count: int, start: int) -> None:
            for body in replies[i][start:start + count]:
                await desk.reply(desk.portal_of[i], body)

        half_replies = (REPLIES + 1) // 2
        await asyncio.gather(*(write(i, per_round) for i in range(CITIZENS)),
                             *(image(i) for i in range(half, CITIZENS)),
                             *(answer(i, half_replies, 0) for i in range(CITIZENS)))

        # (c) three SIGKILLs at random points while both directions are busy.
        phase(figures, "(c) SIGKILLs")
        async def killer() -> None:
            for _ in range(KILLS):
                await asyncio.sleep(rng.uniform(0.5, 3.0))
                assert db is not None
                figures.pending_at_kill.append(await _scalar(
                    db, "SELECT count(*) FROM inbound WHERE status = 'pending'"))
                figures.kills.append(time.monotonic() - figures.started)
                await bridge.kill()
                await asyncio.sleep(0.5)
                await bridge.wait_ready()
        await asyncio.gather(killer(),
                             *(write(i, per_round, pace=3.0) for i in range(CITIZENS)),
                             *(answer(i, REPLIES - half_replies, half_replies)
                               for i in range(CITIZENS)))

        # (d) PostgreSQL restarts once while the rest arrives.
        phase(figures, "(d) the rest, PostgreSQL restarting once")
        async def pg_restart() -> None:
            if backend == "postgresql":
                await asyncio.sleep(rng.uniform(0.2, 1.5))
                print(f"postgresql {await _restart_postgres(db_url)}")
                assert db is not None
                await db.engine.dispose()  # our own pooled connections died with it
        await asyncio.gather(pg_restart(),
                             *(write(i, MESSAGES, pace=0.5) for i in range(CITIZENS)))
        proxy.fail_ratio = proxy.drop_ratio = 0.0

        # --- Settle, then check every message, each way --------------------------------
        assert db is not None
        phase(figures, "settling")
        settle_start = time.monotonic()

        async def settled() -> bool:
            busy = await _scalar(db, "SELECT count(*) FROM inbound WHERE status <> 'done'")
            queued = await _scalar(db, "SELECT count(*) FROM outbox WHERE status <> 'sent'")
            replied = sum(1 for s in wa.sent if str(s.get("text", {}).get("body", ""))
                          .startswith("reply "))
            return busy == 0 and queued == 0 and replied >= CITIZENS * REPLIES
        try:
            await eventually(settled, "every queue to drain", SETTLE_SECONDS)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {await _queues(db)}") from None
        figures.settle_seconds = time.monotonic() - settle_start

        for i, citizen in enumerate(citizens):
            room = desk.portal_of[i]
            events = await desk.history(room)
            undecryptable = [e.event_id for e in events if isinstance(e, MegolmEvent)]
            assert not undecryptable, f"citizen {i}: staff cannot decrypt {undecryptable}"
            texts = [e.body for e in events if isinstance(e, RoomMessageText)
                     and e.body.startswith(f"c{i} m")]
            assert texts == sent_texts[i], (
                f"citizen {i}: portal has {len(texts)} of {MESSAGES} messages "
                f"(missing {sorted(set(sent_texts[i]) - set(texts))[:5]}, duplicated "
                f"{[t for t in set(texts) if texts.count(t) > 1][:5]}, or out of order)")
            images = [e for e in events if e.source.get("content", {}).get("msgtype") == "m.image"]
            assert len(images) == 1, f"citizen {i}: {len(images)} images in the portal"
            got = [s["text"]["body"] for s in wa.sent if s.get("to") == citizen.wa_id
                   and s.get("type") == "text"
                   and str(s["text"].get("body", "")).startswith("reply ")]
            assert sorted(got) == replies[i], f"citizen {i}: Graph got {got}"
        print(figures.report(backend, CITIZENS * MESSAGES, CITIZENS * REPLIES)
              + f" bridge starts: {bridge.starts}")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await bridge.close()
        if db is not None:
            await db.close()
        await desk_user.close()
        await http.close()
        await proxy.stop()
        await wa.stop()
        if not synapse.pid:
            await synapse.start()
