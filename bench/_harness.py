"""Shared setup for the benchmarks in this directory (not a benchmark itself).

A throwaway Synapse (`bridge.devtools.LocalSynapse`) with the bridge's appservice
registration, the bridge in-process on the appservice port, E2EE matrix-nio users, CPU
accounting for this process and Synapse, and a `main()` helper that removes everything
also on Ctrl-C or SIGTERM. Scripts run as `python bench/<name>.py`, so they import this
module as `_harness` (their directory is first on `sys.path`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import nio
from aiohttp import web

from bridge.app import BRIDGE, make_app, serve_public
from bridge.config import Config, parse_config
from bridge.db.engine import upgrade
from bridge.devtools.synapse import LocalSynapse, free_port
from bridge.heap import freeze_startup_heap
from bridge.registration import registration_yaml
from bridge.services import Bridge

T = TypeVar("T")
ENCRYPTION_STATE = {"type": "m.room.encryption", "state_key": "",
                    "content": {"algorithm": "m.megolm.v1.aes-sha2"}}


class BenchError(RuntimeError):
    pass


def check(response: object, expected: type, what: str) -> Any:
    """nio returns error responses instead of raising."""
    if not isinstance(response, expected):
        raise BenchError(f"{what} failed: {response}")
    return response


def random_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def bench_config(homeserver_url: str, as_port: int, workdir: Path, admin: str,
                 extra: dict[str, Any] | None = None) -> Config:
    """A bridge Config with fresh secrets for a homeserver on `localhost`.

    `extra` adds (or replaces) whole config sections, e.g. `whatsapp` and `portals`.
    """
    raw: dict[str, Any] = {
        "homeserver": {"url": homeserver_url, "domain": "localhost"},
        "appservice": {"listen_host": "127.0.0.1", "listen_port": as_port,
                       "as_token": secrets.token_hex(32), "hs_token": secrets.token_hex(32),
                       "store_dir": str(workdir / "store"),
                       # A/B of the crypto store's journal (wal, the default, or delete)
                       "store_journal": os.environ.get("CIVIC_BRIDGE_BENCH_STORE_JOURNAL", "wal"),
                       # A/B of the public listener: its own process (the default) or a thread
                       "ingest": os.environ.get("CIVIC_BRIDGE_BENCH_INGEST", "process")},
        "database": {"url": f"sqlite+aiosqlite:///{workdir / 'bridge.db'}"},
        "privacy": {"data_key": random_key(), "index_key": random_key()},
        "audit": {"key": random_key()},
        "admin": {"token": secrets.token_hex(32), "users": [admin]},
        "logging": {"level": "WARNING"},
    }
    return parse_config(raw | (extra or {}), base=workdir)


# Synapse's own store with --synapse-db postgresql (trust auth on loopback, as in CI).
SYNAPSE_PG = os.environ.get("CIVIC_BRIDGE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")


async def synapse_database(stack: AsyncExitStack) -> str:
    """A new PostgreSQL database for Synapse (UTF8, C collation); dropped when `stack` closes."""
    import asyncpg  # the bridge's own PostgreSQL driver, here only for admin statements

    name = f"cb_bench_synapse_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(f"{SYNAPSE_PG}/postgres", timeout=5)
    try:
        await admin.execute(f"CREATE DATABASE {name} ENCODING 'UTF8' LC_COLLATE 'C' "
                            "LC_CTYPE 'C' TEMPLATE template0")
    finally:
        await admin.close()

    async def drop() -> None:
        conn = await asyncpg.connect(f"{SYNAPSE_PG}/postgres", timeout=5)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await conn.close()

    stack.push_async_callback(drop)
    return f"{SYNAPSE_PG}/{name}"


async def start_synapse(workdir: Path, config: Config, hs_port: int,
                        stack: AsyncExitStack, access_log: Path | None = None,
                        synapse_db: str = "sqlite") -> LocalSynapse:
    """Synapse on `hs_port` with the bridge's registration; stopped when `stack` closes.

    `synapse_db` is Synapse's own store: "sqlite" (a file in `workdir`) or "postgresql"
    (a throwaway database, as production Synapse runs).
    """
    dsn = await synapse_database(stack) if synapse_db == "postgresql" else None
    registration = workdir / "registration.yaml"
    registration.write_text(registration_yaml(config), encoding="utf-8")
    registration.chmod(0o600)
    synapse = LocalSynapse(workdir / "synapse", registration_files=[registration], port=hs_port,
                           access_log=access_log, postgres_dsn=dsn)
    stack.push_async_callback(synapse.stop)
    await synapse.start()
    return synapse


async def start_bridge(config: Config, stack: AsyncExitStack) -> Bridge:
    """The bridge in-process on the appservice port, as `civic-bridge run` would start
    it, without the admin and metrics listeners (the benches read the Bridge itself)."""
    await upgrade(config.database.url)
    app = make_app(config)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    server = await serve_public(app, "127.0.0.1", config.appservice.listen_port)
    stack.push_async_callback(server.stop)
    bridge = app[BRIDGE]
    await asyncio.wait_for(bridge.ready.wait(), 60)
    freeze_startup_heap()  # as `civic-bridge run` does once ready
    return bridge


class NioUser:
    """A registered user with one E2EE nio device; key upkeep done by hand after each sync."""

    def __init__(self, client: nio.AsyncClient) -> None:
        self.client = client

    @classmethod
    async def create(cls, synapse: LocalSynapse, localpart: str, store: Path,
                     store_sync_tokens: bool = True) -> NioUser:
        """`store_sync_tokens=False` spares a blocking SQLite commit per /sync."""
        password = secrets.token_urlsafe(16)
        user_id = await synapse.register_user(localpart, password)
        store.mkdir(parents=True)
        client = nio.AsyncClient(synapse.url, user_id, store_path=str(store),
                                 config=nio.AsyncClientConfig(encryption_enabled=True,
                                                              store_sync_tokens=store_sync_tokens))
        user = cls(client)
        try:
            check(await client.login(password, device_name=f"bench {localpart}"),
                  nio.LoginResponse, "login")
            await user.sync()  # uploads device and one-time keys
        except BaseException:
            await client.close()
            raise
        return user

    @property
    def user_id(self) -> str:
        return str(self.client.user_id)

    async def sync(self, timeout_ms: int = 0,
                   sync_filter: dict[str, Any] | None = None) -> nio.SyncResponse:
        resp = check(await self.client.sync(timeout=timeout_ms, sync_filter=sync_filter),
                     nio.SyncResponse, f"sync of {self.user_id}")
        await self.upkeep(resp)
        return resp

    async def upkeep(self, resp: nio.SyncResponse) -> None:
        """What nio's sync_forever does after each sync and a manual sync() does not."""
        c = self.client
        if c.olm.account.shared and not resp.device_key_count.signed_curve25519:
            c.olm.uploaded_key_count = 0  # nio ignores a server count of 0
        if c.should_upload_keys:
            check(await c.keys_upload(), nio.KeysUploadResponse, "keys_upload")
        if c.should_query_keys:
            check(await c.keys_query(), nio.KeysQueryResponse, "keys_query")
        if c.should_claim_keys:
            check(await c.keys_claim(c.get_users_for_key_claiming()),
                  nio.KeysClaimResponse, "keys_claim")
        for sent in await c.send_to_device_messages():
            check(sent, nio.ToDeviceResponse, "to_device")

    async def join(self, room_id: str) -> None:
        check(await self.client.join(room_id), nio.JoinResponse, "join")
        for _ in range(20):
            await self.sync(timeout_ms=500)
            room = self.client.rooms.get(room_id)
            if room is not None and room.encrypted:
                return
        raise BenchError(f"{self.user_id}: {room_id} never showed up encrypted in /sync")

    async def send(self, room_id: str, content: dict[str, Any]) -> None:
        check(await self.client.room_send(room_id, "m.room.message", content,
                                          ignore_unverified_devices=True),
              nio.RoomSendResponse, "room_send")

    async def close(self) -> None:
        await self.client.close()


STAFF_SYNC_TIMEOUT_MS = 200
STAFF_FILTER: dict[str, Any] = {
    "presence": {"not_types": ["*"]},
    "account_data": {"not_types": ["*"]},
    "room": {"timeline": {"limit": 400}, "ephemeral": {"not_types": ["*"]},
             "account_data": {"not_types": ["*"]}},
}


class StaffObserver:
    """A staff device syncing continuously in the background, handing every timeline
    event it can read to `take` (a subclass decides what to note) as soon as the /sync
    response that made it readable arrives: its own event, or a later room key for it.

    `failures_tolerated`: failed syncs in a row (2 s apart) before the loop gives up; a
    long run may see a busy Synapse fail one now and then.
    """

    def __init__(self, staff: NioUser, failures_tolerated: int = 1) -> None:
        self.staff = staff
        self.failures_tolerated = failures_tolerated
        self.limited = 0  # timelines with a gap: messages may have been skipped
        self.syncs = 0
        self.sync_errors = 0
        self._undecrypted: list[nio.MegolmEvent] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def undecryptable(self) -> int:
        return len(self._undecrypted)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="staff sync")

    def check_running(self) -> None:
        if self._task is not None and self._task.done():
            self._task.result()  # re-raise what stopped the sync loop
            raise BenchError("staff sync loop stopped")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def wants(self, room_id: str) -> bool:
        return True

    def take(self, event: nio.Event, room_id: str, now: float) -> None:
        raise NotImplementedError

    def synced(self) -> None:
        """Called after each sync's events were taken."""

    async def _run(self) -> None:
        client = self.staff.client
        failures = 0
        while True:
            resp = await client.sync(timeout=STAFF_SYNC_TIMEOUT_MS, sync_filter=STAFF_FILTER)
            if not isinstance(resp, nio.SyncResponse):
                failures += 1
                self.sync_errors += 1
                if failures >= self.failures_tolerated:
                    raise BenchError(f"staff sync failed {failures} times in a row: {resp}")
                await asyncio.sleep(2.0)
                continue
            failures = 0
            now = time.perf_counter()
            self.syncs += 1
            # nio has processed to-device room keys and decrypted what it could.
            for room_id, info in resp.rooms.join.items():
                if not self.wants(room_id):
                    continue
                self.limited += bool(info.timeline.limited)
                for event in info.timeline.events:
                    self._take(event, room_id, now)
            if self._undecrypted:  # a room key may have come in this sync
                pending, self._undecrypted = self._undecrypted, []
                for event in pending:
                    try:
                        self._take(client.decrypt_event(event), event.room_id, now)
                    except nio.EncryptionError:
                        self._undecrypted.append(event)
            self.synced()
            await self.staff.upkeep(resp)

    def _take(self, event: nio.Event, room_id: str, now: float) -> None:
        if isinstance(event, nio.MegolmEvent):
            event.room_id = room_id
            self._undecrypted.append(event)
        else:
            self.take(event, room_id, now)


def child_pids(marker: bytes) -> list[int]:
    """This process's children whose command line holds `marker`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and marker in cmdline:
            found.append(int(stat.parent.name))
    return found


def synapse_pid() -> int | None:
    """Our Synapse child process (LocalSynapse keeps its handle private)."""
    return next(iter(child_pids(b"synapse.app.homeserver")), None)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far; NaN once it is gone."""
    try:  # utime and stime are fields 14 and 15, after the ")" of the name
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


class CPU:
    """CPU seconds used so far by this process (bridge + nio clients) with the bridge's
    ingest process (bridge.web.ingest_child), and by Synapse."""

    def __init__(self, synapse_pid: int | None) -> None:
        self._synapse = synapse_pid

    def now(self) -> tuple[float, float]:
        ingest = sum(cpu_seconds(pid) for pid in child_pids(b"bridge.web.ingest_child"))
        return (time.process_time() + ingest,
                cpu_seconds(self._synapse) if self._synapse else float("nan"))


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


@contextmanager
def temp_workdir() -> Iterator[Path]:
    """A temporary directory, removed at exit whatever happens."""
    workdir = Path(tempfile.mkdtemp(prefix="civic-bench-"))
    try:
        yield workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not verbose:
        logging.getLogger("nio").setLevel(logging.ERROR)


def run_guarded(main: Callable[[], Awaitable[T]]) -> T | None:
    """asyncio.run(main()); None (after saying so) if interrupted by Ctrl-C or SIGTERM.

    Interruption cancels the task, so `async with` / `finally` blocks (Synapse, the
    bridge, temporary files) are unwound before this returns.
    """
    async def guarded() -> T:
        task = asyncio.current_task()
        assert task is not None
        # SIGTERM cleans up like Ctrl-C does (asyncio.run cancels the task on SIGINT).
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await main()

    try:
        return asyncio.run(guarded())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; Synapse stopped and temporary files removed", file=sys.stderr)
        return None


def add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--verbose", action="store_true", help="bridge and nio logs at INFO")


def run_and_report(args: argparse.Namespace, run: Callable[[], Awaitable[dict[str, Any]]],
                   print_table: Callable[[dict[str, Any]], None]) -> int:
    """Run a benchmark (cleaning up on Ctrl-C) and print its report; the exit status."""
    setup_logging(args.verbose)
    report = run_guarded(run)
    if report is None:
        return 130
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0
