"""`civic-bridge demo`: a throwaway Synapse, the WhatsApp Cloud API simulator and the
bridge, all on 127.0.0.1 with SQLite, plus a staff account and a portal to try, and a
notice of availability sent to a second citizen who subscribed to notices.

Everything lives in one directory (default ./demo-data) and is reused by the next run,
so only the first run creates accounts; `--fresh` starts over. Ctrl-C (or SIGTERM,
SIGHUP) stops the bridge, the simulator and Synapse, in that order, and exits 0.
"""

from __future__ import annotations

import asyncio
import fcntl
import io
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import yaml

from bridge.app import Listeners
from bridge.config import Config, LoggingConfig
from bridge.db.engine import upgrade
from bridge.devtools import demo_client
from bridge.devtools.demo_notices import NoticesStep, NoticesStepError, notices_config
from bridge.devtools.demo_state import (
    BUSINESS_NUMBER,
    PHONE_NUMBER_ID,
    SERVER_NAME,
    STAFF_LOCALPART,
    DemoState,
    DemoStateError,
    choose_ports,
    leftover_synapse,
    load,
    new_key,
    reusable,
    save,
    stop_leftover,
    wipe,
)
from bridge.devtools.demo_text import Print, banner, quote
from bridge.devtools.demo_watch import RelayWatcher, stop_task
from bridge.devtools.simulator import CloudAPISimulator
from bridge.devtools.synapse import LocalSynapse, LocalSynapseError, default_venv_path
from bridge.homeserver.settings import module_entry
from bridge.logsetup import RedactingFilter, TextFormatter, setup_logging
from bridge.registration import registration_yaml
from bridge.services import Bridge
from bridge.whatsapp.consent import OPT_IN_BUTTON

FIRST_MESSAGE = "Hola, ¿me pueden ayudar?"
STEP_TIMEOUT = 120.0  # per start-up step; generous for a busy 2-core machine


class DemoError(RuntimeError):
    """The demo cannot start; the message says why and what to do."""


@dataclass(frozen=True)
class DemoOptions:
    directory: Path
    port_base: int
    fresh: bool = False


def bridge_config(state: DemoState, directory: Path, shared_secret: str) -> dict[str, Any]:
    """The bridge's config: fresh secrets (kept in demo.json), SQLite, WhatsApp and
    notices on."""
    s = state.secrets
    return {
        "homeserver": {"url": state.homeserver_url, "domain": SERVER_NAME},
        "appservice": {"listen_host": "127.0.0.1", "listen_port": state.ports.bridge,
                       "as_token": s["as_token"], "hs_token": s["hs_token"],
                       "store_dir": str(directory / "store"),
                       # One process: every log line goes to the demo's log file.
                       "ingest": "thread"},
        "metrics": {"listen_host": "127.0.0.1", "listen_port": state.ports.metrics},
        "database": {"url": f"sqlite+aiosqlite:///{directory / 'bridge.db'}"},
        "privacy": {"data_key": s["data_key"], "index_key": s["index_key"]},
        "audit": {"key": s["audit_key"]},
        "whatsapp": {"enabled": True, "api_base": state.api_base,
                     "phone_number_id": PHONE_NUMBER_ID, "access_token": s["access_token"],
                     "app_secret": s["app_secret"], "verify_token": s["verify_token"]},
        "consent": {"agency_name": "el Ayuntamiento de Ejemplo (demo)"},
        "notices": notices_config(),
        "portals": {"staff": [state.staff_user_id]},
        "admin": {"listen_host": "127.0.0.1", "listen_port": state.ports.admin,
                  "token": s["admin_token"], "users": [state.staff_user_id]},
        "invites": {"registration_shared_secret": shared_secret},
        "logging": {"level": "INFO", "format": "text"},
        # The walkthrough skips Element's verification: let the demo's one staff
        # session read what came before it. Production keeps `cross-signed`.
        "e2ee": {"forward_keys_to": "all"},
    }


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


class Demo:
    """The running demo: Synapse subprocess, simulator and bridge in this process."""

    def __init__(self, opts: DemoOptions, out: Print) -> None:
        self.opts = opts
        self.dir = opts.directory
        self.out = out
        self.state: DemoState | None = None
        self.synapse: LocalSynapse | None = None
        self.sim: CloudAPISimulator | None = None
        self.listeners: Listeners | None = None
        self.bridge: Bridge | None = None
        self.watcher: RelayWatcher | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._log: IO[str] | None = None
        self._console: logging.Handler | None = None

    def line(self, text: str) -> None:
        """A live progress line."""
        self.out(f"  {time.strftime('%H:%M:%S')}  {text}")

    async def start(self) -> None:
        self.out(f"civic-bridge demo · data in {self.dir}")
        state = self.state = await asyncio.to_thread(self._prepare_directory)
        self._setup_logging(state)
        if not (default_venv_path() / "bin" / "python").exists():
            self.out("  … building Synapse's own virtualenv (first run only, about a minute)")
        registration = self.dir / "registration.yaml"
        synapse = self.synapse = LocalSynapse(self.dir / "synapse", SERVER_NAME,
                                              [registration], port=state.ports.synapse)
        await asyncio.to_thread(synapse.write_config)
        config = await asyncio.to_thread(self._write_configs, state, registration)
        # The policy module, as `civic-bridge homeserver-config` prints it (it needs the
        # bridge's config, which needs Synapse's shared secret: hence the second write).
        synapse.settings = {"modules": [module_entry(config)]}
        await asyncio.to_thread(synapse.write_config)
        self.out(f"  … starting Synapse, a throwaway homeserver, on {synapse.url}")
        started = time.monotonic()
        await synapse.start(timeout=STEP_TIMEOUT)
        state.synapse_pid = synapse.pid
        await asyncio.to_thread(save, self.dir, state)
        self.out(f"  ✔ Synapse            {synapse.url}  "
                 f"(ready in {time.monotonic() - started:.0f} s)")

        sim = self.sim = CloudAPISimulator(
            access_token=state.secrets["access_token"], app_secret=state.secrets["app_secret"],
            phone_number_id=PHONE_NUMBER_ID, display_phone_number=BUSINESS_NUMBER)
        await sim.start(port=state.ports.simulator)
        self.out(f"  ✔ WhatsApp simulator {state.api_base}  (stands in for Meta's Cloud API)")

        await self._start_bridge(config)
        await self._staff_account(state, synapse)
        await self._portal(state)
        await self._notices(state)
        state.pid = os.getpid()
        await asyncio.to_thread(save, self.dir, state)
        self.out(banner(state, self.dir))

    def _prepare_directory(self) -> DemoState:
        self.dir.mkdir(parents=True, exist_ok=True)
        if (pid := leftover_synapse(self.dir)) is not None:
            self.out(f"  … stopping the Synapse an earlier, interrupted demo left running "
                     f"(pid {pid})")
            stop_leftover(pid)
        previous = None if self.opts.fresh else load(self.dir)
        if previous is None or not reusable(self.dir):
            wipe(self.dir)
            previous = None
        ports = choose_ports(self.opts.port_base)
        state = previous or DemoState.new(ports)
        state.ports, state.pid = ports, None
        # A demo kept from before audit.key existed gets one now, kept for later runs.
        state.secrets.setdefault("audit_key", new_key())
        save(self.dir, state)
        return state

    def _write_configs(self, state: DemoState, registration: Path) -> Config:
        """config.yaml (for reference; the demo never reads it) and the AS registration."""
        assert self.synapse is not None
        hs = yaml.safe_load(self.synapse.config_path.read_text(encoding="utf-8"))
        raw = bridge_config(state, self.dir, str(hs["registration_shared_secret"]))
        config = Config.model_validate(raw)
        _write_private(self.dir / "config.yaml",
                       "# Written by `civic-bridge demo` on every start, for reference.\n"
                       + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
        _write_private(registration, registration_yaml(config))
        return config

    def _setup_logging(self, state: DemoState) -> None:
        """Full bridge log in DIR/bridge.log; warnings and errors also on the console."""
        self._log = (self.dir / "bridge.log").open("a", encoding="utf-8")
        secret_values = [*state.secrets.values(), state.staff_password]
        setup_logging(LoggingConfig(level="INFO"), secrets=secret_values, stream=self._log)
        console = self._console = logging.StreamHandler(sys.stderr)
        console.setLevel(logging.WARNING)
        console.setFormatter(TextFormatter())
        console.addFilter(RedactingFilter(secret_values))
        # The bridge's own warnings; libraries (nio's key chatter) only when it is serious.
        console.addFilter(lambda r: r.name.startswith("bridge") or r.levelno >= logging.ERROR)
        logging.getLogger().addHandler(console)

    async def _start_bridge(self, config: Config) -> None:
        assert self.sim is not None
        await upgrade(config.database.url)
        self.listeners = Listeners(config)
        await self.listeners.setup()
        bridge = self.bridge = self.listeners.bridge
        # Synapse on SQLite numbers appservice transactions from 1 again after each restart
        # (its sequence is seeded from the table of *pending* transactions), so the ids the
        # bridge remembers from the last run would make it skip new transactions as
        # repeats. The demo restarts both together: forget them before Synapse can push.
        await bridge.db.transactions.purge(datetime.now(UTC) + timedelta(days=1))
        await self.listeners.bind()
        await asyncio.wait_for(bridge.ready.wait(), STEP_TIMEOUT)
        self.out(f"  ✔ Bridge             http://127.0.0.1:{config.appservice.listen_port}  "
                 f"(SQLite {self.dir / 'bridge.db'})")
        self.watcher = RelayWatcher(bridge, self.sim, self.line, self._citizen_reads)
        await self.watcher.prime()
        self._watch_task = asyncio.create_task(self.watcher.run(), name="demo progress")

    async def _staff_account(self, state: DemoState, synapse: LocalSynapse) -> None:
        status, _ = await synapse.request("GET", "/_matrix/client/v3/register/available"
                                          f"?username={STAFF_LOCALPART}")
        if status == 200:
            await synapse.register_user(STAFF_LOCALPART, state.staff_password)
            self.out(f"  ✔ Staff account      {state.staff_user_id}  (created)")
            return
        try:  # kept from the last run: check the saved password, then drop the session
            _, token, _ = await synapse.login(STAFF_LOCALPART, state.staff_password)
        except LocalSynapseError:
            raise DemoError(f"the saved password for {state.staff_user_id} no longer works; "
                            "start over with `civic-bridge demo --fresh`") from None
        await synapse.request("POST", "/_matrix/client/v3/logout", {}, token=token)
        self.out(f"  ✔ Staff account      {state.staff_user_id}  (kept from the last run)")

    async def _portal(self, state: DemoState) -> None:
        """Make sure the simulated citizen has opted in and has an open portal."""
        b = self.bridge
        assert b is not None
        index = b.privacy.index.digest(state.citizen.user_id)
        citizen = await b.db.citizens.by_index(index)
        room_id = (await b.portals.room_of(citizen)
                   if citizen and citizen.consent_state == "granted" else None)
        if room_id is None:
            await self._citizen_opts_in(citizen.consent_state if citizen else "unknown")
            citizen = await b.db.citizens.by_index(index)
            room_id = await b.portals.room_of(citizen) if citizen else None
        assert citizen is not None and room_id is not None
        room = await b.db.rooms.get(room_id)
        ghost = await b.db.ghosts.get(citizen.ghost_user_id) if citizen.ghost_user_id else None
        state.portal_room_id, state.portal_name = room_id, room.name if room else None
        state.pseudonym = ghost.display_name if ghost else None
        self.out(f"  ✔ Portal             {room_id}  ({state.portal_name})")

    async def _notices(self, state: DemoState) -> None:
        """The second citizen subscribes to notices (once); a notice is sent (each run)."""
        assert self.bridge is not None and self.sim is not None and self.watcher is not None
        step = NoticesStep(self.bridge, self.sim, state, self.out, self._deliver,
                           self.watcher.drained, STEP_TIMEOUT, str(self.dir / "bridge.log"))
        try:
            await step.run()
        finally:  # the reference counter too, so a re-run does not repeat it
            await asyncio.to_thread(save, self.dir, state)

    async def _citizen_opts_in(self, consent_state: str) -> None:
        b, sim, state = self.bridge, self.sim, self.state
        assert b is not None and sim is not None and state is not None and self.watcher
        user = demo_client.simulated_user(state)
        self.out(f"  … a simulated citizen writes {quote(FIRST_MESSAGE)} on WhatsApp "
                 "and accepts the privacy notice:")
        first: str | None = None
        if consent_state != "prompted":  # otherwise the notice is out and a message held
            value = sim.text_message(user, FIRST_MESSAGE)
            first = value["messages"][0]["id"]
            await self._deliver(value)
            await sim.wait_for_sent(lambda s: s.get("type") == "interactive",
                                    timeout=STEP_TIMEOUT)
        await self._deliver(sim.button_reply(user, OPT_IN_BUTTON, "Acepto"))

        async def relayed() -> bool:
            citizen = await b.db.citizens.by_index(b.privacy.index.digest(user.user_id))
            if citizen is None or await b.portals.room_of(citizen) is None:
                return False
            return first is None or \
                await b.db.messages.by_wamid(b.privacy.index.wamid(first)) is not None

        deadline = time.monotonic() + STEP_TIMEOUT
        while not await relayed():
            if time.monotonic() > deadline:
                raise DemoError(f"the portal was not ready after {STEP_TIMEOUT:.0f} s; "
                                f"see {self.dir / 'bridge.log'}")
            await asyncio.sleep(0.2)
        await self.watcher.drained()

    async def _deliver(self, value: dict[str, Any]) -> None:
        assert self.sim is not None and self.state is not None
        status = await self.sim.deliver(self.state.webhook_url, value)
        if status != 200:
            raise DemoError(f"the bridge answered a simulated webhook with HTTP {status}; "
                            f"see {self.dir / 'bridge.log'}")

    async def _citizen_reads(self, wamid: str) -> None:
        """The simulated phone reports a staff reply delivered, then read (as Meta does)."""
        assert self.sim is not None and self.state is not None
        user = demo_client.simulated_user(self.state)
        for status in ("delivered", "read"):
            await self.sim.deliver(self.state.webhook_url,
                                   self.sim.status_update(wamid, status, user))

    async def close(self) -> None:
        """Stop everything that was started, in reverse order; never raises."""
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("progress display", lambda: stop_task(self._watch_task)),
            ("bridge", lambda: self.listeners.stop() if self.listeners else _nothing()),
            ("WhatsApp simulator", lambda: self.sim.stop() if self.sim else _nothing()),
            ("Synapse", lambda: self.synapse.stop() if self.synapse else _nothing()),
        ]
        for name, step in steps:
            try:
                await step()
            except Exception as exc:
                self.out(f"  ! stopping the {name} failed: {type(exc).__name__}: {exc}")
        if self.state is not None and self.state.pid in (os.getpid(), None):
            self.state.pid = self.state.synapse_pid = None
            await asyncio.to_thread(save, self.dir, self.state)
        root = logging.getLogger()
        for handler in root.handlers[:]:
            if handler is self._console or getattr(handler, "stream", None) is self._log:
                root.removeHandler(handler)
        if self._log is not None:
            self._log.close()


async def _nothing() -> None:
    return None


async def run(opts: DemoOptions, out: Print) -> int:
    """Start the demo, wait for a stop signal, stop everything; the exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    demo = Demo(opts, out)
    starting = asyncio.create_task(demo.start(), name="demo start")
    stopping = asyncio.create_task(stop.wait(), name="demo stop signal")
    code = 0
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()
            await stopping
        out("\nStopping the demo …")
    except (DemoError, DemoStateError, NoticesStepError, LocalSynapseError, TimeoutError,
            OSError) as exc:
        what = str(exc) or type(exc).__name__
        print(f"demo: {what}", file=sys.stderr)
        code = 1
    finally:
        for task in (starting, stopping):
            task.cancel()
        await asyncio.gather(starting, stopping, return_exceptions=True)
        await demo.close()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    if code == 0:
        out("Stopped: bridge, WhatsApp simulator and Synapse. Data kept in "
            f"{opts.directory} for the next run (`--fresh` starts over).")
    return code


def _out(text: str) -> None:
    print(text, flush=True)


def _locked(directory: Path) -> IO[str] | None:
    """An exclusive lock on the directory for this process's lifetime, or None if taken."""
    directory.mkdir(parents=True, exist_ok=True)
    lock = (directory / ".demo.lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        return None
    return lock


def main(directory: str, port_base: int, fresh: bool) -> int:
    """Entry point for `civic-bridge demo`."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True, errors="replace")
    path = Path(directory).expanduser().absolute()
    lock = _locked(path)
    if lock is None:
        print(f"demo: another demo is already running with {path}; stop it (Ctrl-C in its "
              "terminal) or use another --dir", file=sys.stderr)
        return 1
    try:
        return asyncio.run(run(DemoOptions(path, port_base, fresh), _out))
    except KeyboardInterrupt:  # before the signal handlers were in place
        return 0
    finally:
        lock.close()
