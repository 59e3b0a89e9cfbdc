"""A throwaway single-process Synapse on loopback, used by the tests and `civic-bridge demo`.

Synapse lives in its own cached virtualenv because its dependency pins clash with ours.
The generated config follows docs/notes on Synapse for tests: client API only, no
federation, SQLite, no rate limits, and the appservice flags the bridge relies on.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import hmac
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import yaml

from bridge.homeserver.settings import MODULE_SOURCE, ModuleInstallError, install_module

SYNAPSE_REQUIREMENT = "matrix-synapse==1.163.2"  # what the suite and docs/design/ were run against
POSTGRES_REQUIREMENT = "psycopg2>=2.9,<3"
VENV_ENV = "CIVIC_BRIDGE_SYNAPSE_VENV"

JsonDict = dict[str, Any]


class LocalSynapseError(RuntimeError):
    """Building, starting or talking to the local Synapse failed; the message says why."""


def default_venv_path() -> Path:
    env = os.environ.get(VENV_ENV)
    return Path(env) if env else Path.home() / ".cache" / "civic-bridge" / "synapse-venv"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"(no {path.name})"
    return "\n".join(text.splitlines()[-lines:])


def _importable(python: Path, module: str) -> bool:
    return python.exists() and subprocess.run(
        [python, "-c", f"import {module}"], capture_output=True, check=False).returncode == 0


def _module_digest() -> str:
    """A hash of the policy module's source: a changed module is installed again."""
    digest = hashlib.sha256()
    files = [MODULE_SOURCE / "pyproject.toml",
             *sorted((MODULE_SOURCE / "civic_bridge_synapse").glob("*.py"))]
    for file in files:
        if file.is_file():
            digest.update(str(file.relative_to(MODULE_SOURCE)).encode() + b"\0")
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def _ensure_policy_module(venv: Path) -> None:
    """Install civic-bridge's Synapse module (synapse_module/) into `venv` unless this
    very version is there already: the same step `homeserver-config --synapse-python`
    runs for operators. Call with the venv's lock held."""
    # The stamp lives in the venv (gone with it) and is written only after
    # install_module has imported the module there.
    stamp = venv / f".civic-bridge-synapse-{_module_digest()}"
    if stamp.exists():
        return
    try:
        install_module(venv / "bin" / "python")
    except ModuleInstallError as exc:
        raise LocalSynapseError(str(exc)) from None
    for old in venv.glob(".civic-bridge-synapse-*"):
        old.unlink()
    stamp.touch()


def ensure_synapse_venv(path: Path | None = None, postgres: bool = False,
                        policy_module: bool = True) -> Path:
    """Return a virtualenv with `matrix-synapse` in it, building it first if needed.

    `policy_module` also installs (or refreshes) the project's Synapse module.

    `postgres` adds psycopg2 (built from source: Synapse's dependency check wants that
    distribution, not psycopg2-binary; needs libpq's headers). Blocking (a first build
    takes tens of seconds): call it before the event loop runs or through
    `asyncio.to_thread`. A lock file keeps concurrent processes from building the same
    venv twice; pip's output goes to `<venv>-install.log`.
    """
    venv = (path or default_venv_path()).expanduser().absolute()
    venv.parent.mkdir(parents=True, exist_ok=True)
    python = venv / "bin" / "python"
    log = venv.with_name(venv.name + "-install.log")
    with venv.with_name(f".{venv.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        steps = []
        if not _importable(python, "synapse"):
            steps = [[sys.executable, "-m", "venv", "--clear", str(venv)],
                     [str(python), "-m", "pip", "install", SYNAPSE_REQUIREMENT]]
        if postgres and not (steps == [] and _importable(python, "psycopg2")):
            steps.append([str(python), "-m", "pip", "install", POSTGRES_REQUIREMENT])
        if not steps:
            if policy_module:
                _ensure_policy_module(venv)
            return venv
        failed = ""
        with log.open("w", encoding="utf-8") as out:
            for step in steps:
                out.write(f"$ {' '.join(step)}\n")
                out.flush()
                if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT,
                                  check=False).returncode != 0:
                    failed = " ".join(step[2:])
                    break
        if failed or not _importable(python, "synapse"):
            failed = f"`{failed or 'python -c import synapse'}` failed"
            raise LocalSynapseError(f"could not build the Synapse virtualenv {venv}: {failed}; "
                                    f"full log: {log}\n{_tail(log, 15)}")
        if policy_module:
            _ensure_policy_module(venv)
    return venv


def _rate_limits() -> JsonDict:
    """Every rc_* limit Synapse 1.13x-1.16x knows, set far beyond what a test does."""
    unlimited = {"per_second": 10_000, "burst_count": 100_000}
    flat = ("rc_message", "rc_registration", "rc_registration_token_validity",
            "rc_admin_redaction", "rc_joins_per_room", "rc_key_requests",
            "rc_3pid_validation", "rc_third_party_invite", "rc_media_create",
            "rc_delayed_event_mgmt", "rc_room_creation", "rc_reports",
            "rc_user_directory", "rc_profile")
    nested = {"rc_login": ("address", "account", "failed_attempts"),
              "rc_joins": ("local", "remote"),
              "rc_invites": ("per_room", "per_user", "per_issuer"),
              "rc_presence": ("per_user",)}
    return {**{key: dict(unlimited) for key in flat},
            **{key: {sub: dict(unlimited) for sub in subs} for key, subs in nested.items()}}


class LocalSynapse:
    """One Synapse process on 127.0.0.1 with its config, database and logs in `workdir`.

    The signing key and secrets are generated once per workdir and kept on reruns.
    Use `async with LocalSynapse(...)` or `start()`/`stop()`.
    """

    def __init__(self, workdir: Path, server_name: str = "localhost",
                 registration_files: Sequence[Path] = (), port: int | None = None,
                 venv: Path | None = None, access_log: Path | None = None,
                 postgres_dsn: str | None = None,
                 settings: Mapping[str, Any] | None = None,
                 metrics_port: int | None = None) -> None:
        self.workdir = Path(workdir).absolute()
        # Written over the generated homeserver.yaml last, e.g. the policy module's
        # `modules:` entry from bridge.homeserver.settings (what homeserver-config prints).
        self.settings: dict[str, Any] = dict(settings or {})
        # Synapse's Prometheus endpoint (/_synapse/metrics) on this port, if given.
        self.metrics_port = metrics_port
        # Synapse's own database: SQLite in the workdir, or this PostgreSQL database
        # (libpq URL; it must be empty, UTF8 with C collation, as Synapse requires).
        self._postgres_dsn = postgres_dsn
        # Every request with its CPU time, for profiling (benchmarks); off by default.
        self._access_log = Path(access_log).absolute() if access_log else None
        self._server_name = server_name
        self._registration_files = [Path(p).absolute() for p in registration_files]
        self.port = port or free_port()
        self.config_path = self.workdir / "homeserver.yaml"
        self.log_path = self.workdir / "homeserver.log"  # Synapse's log, WARNING and up
        self.output_path = self.workdir / "synapse.out"  # stdout+stderr: start-up failures
        self._venv = venv
        self._python: Path | None = None
        self._shared_secret: str | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def server_name(self) -> str:
        return self._server_name

    @property
    def pid(self) -> int | None:
        """The Synapse process id while it runs (Synapse writes no pid file in the foreground)."""
        return self._process.pid if self._process is not None else None

    def _venv_python(self) -> Path:
        if self._python is None:
            venv = ensure_synapse_venv(self._venv, postgres=self._postgres_dsn is not None)
            self._python = venv / "bin" / "python"
        return self._python

    def _database_config(self) -> JsonDict:
        if self._postgres_dsn is None:
            return {"name": "sqlite3", "args": {"database": str(self.workdir / "homeserver.db")}}
        return {"name": "psycopg2", "args": {"dsn": self._postgres_dsn, "cp_min": 5,
                                             "cp_max": 10}}

    def write_config(self) -> Path:
        """Generate (first time) and patch homeserver.yaml. Blocking."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.config_path.exists():
            result = subprocess.run(
                [self._venv_python(), "-m", "synapse.app.homeserver",
                 "--server-name", self._server_name, "--config-path", str(self.config_path),
                 "--data-directory", str(self.workdir), "--generate-config",
                 "--report-stats=no"],
                cwd=self.workdir, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise LocalSynapseError(f"synapse --generate-config failed:\n{result.stderr}")
        config = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))
        if config.get("server_name") != self._server_name:
            raise LocalSynapseError(f"{self.workdir} holds a Synapse for "
                                    f"{config.get('server_name')!r}; use another workdir")
        self._shared_secret = config.get("registration_shared_secret") or secrets.token_hex(32)
        log_config = self.workdir / "log.config.yaml"
        handlers = {"file": {"class": "logging.FileHandler", "formatter": "plain",
                             "filename": str(self.log_path), "encoding": "utf8"}}
        loggers = {}
        if self._access_log is not None:
            handlers["access"] = {**handlers["file"], "filename": str(self._access_log)}
            loggers["synapse.access"] = {"level": "INFO", "handlers": ["access"],
                                         "propagate": False}
        log_config.write_text(yaml.safe_dump({
            "version": 1,
            "formatters": {"plain": {"format": "%(asctime)s %(name)s %(levelname)s %(message)s"}},
            "handlers": handlers, "loggers": loggers,
            "root": {"level": "WARNING", "handlers": ["file"]},
            "disable_existing_loggers": False,
        }), encoding="utf-8")
        config.update({
            "pid_file": str(self.workdir / "homeserver.pid"),
            "listeners": [{"port": self.port, "bind_addresses": ["127.0.0.1"], "type": "http",
                           "resources": [{"names": ["client"]}]},
                          *([{"port": self.metrics_port, "bind_addresses": ["127.0.0.1"],
                              "type": "metrics"}] if self.metrics_port else [])],
            "enable_metrics": self.metrics_port is not None,
            "database": self._database_config(),
            "log_config": str(log_config),
            "media_store_path": str(self.workdir / "media_store"),
            "max_upload_size": "50M", "url_preview_enabled": False,
            "report_stats": False,
            "enable_registration": True,
            "enable_registration_without_verification": True,
            "registration_shared_secret": self._shared_secret,
            "bcrypt_rounds": 4,  # password hashing dominated user setup (~0.4 s a call)
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "federation_domain_whitelist": [],
            "presence": {"enabled": False},
            "app_service_config_files": [str(p) for p in self._registration_files],
            # Lets the bridge tell Matrix reporters about their reports (docs/moderation.md).
            "server_notices": {"system_mxid_localpart": "server",
                               "system_mxid_display_name": "Avisos del servidor",
                               "room_name": "Avisos del servidor"},
            "experimental_features": {"msc2409_to_device_messages_enabled": True,
                                      "msc3202_transaction_extensions": True},
            **_rate_limits(),
            **self.settings,
        })
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        return self.config_path

    async def start(self, timeout: float = 60) -> None:  # noqa: ASYNC109
        """Write the config if not done yet, launch Synapse and wait until it answers."""
        if self._process is not None:
            raise LocalSynapseError("already started")
        if self._shared_secret is None:
            await asyncio.to_thread(self.write_config)
        python = await asyncio.to_thread(self._venv_python)  # may build the venv
        out = await asyncio.to_thread(self.output_path.open, "ab")
        try:
            self._process = await asyncio.create_subprocess_exec(
                python, "-m", "synapse.app.homeserver", "-c", str(self.config_path),
                cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT)
        finally:
            out.close()
        self._session = aiohttp.ClientSession()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not await self._answers():
            if self._process.returncode is not None:
                await self._fail(f"exited with code {self._process.returncode}")
            if loop.time() > deadline:
                await self._fail(f"did not answer within {timeout:g} s")
            await asyncio.sleep(0.1)

    async def _answers(self) -> bool:
        assert self._session is not None
        try:
            async with self._session.get(f"{self.url}/_matrix/client/versions",
                                         timeout=aiohttp.ClientTimeout(total=2)) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _fail(self, problem: str) -> NoReturn:
        await self.stop()
        tails = await asyncio.to_thread(
            lambda: f"--- {self.output_path}:\n{_tail(self.output_path)}\n"
                    f"--- {self.log_path}:\n{_tail(self.log_path)}")
        raise LocalSynapseError(f"Synapse on {self.url} {problem}\n{tails}")

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if Synapse is still running after 10 s."""
        process, self._process = self._process, None
        if process is not None:
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), 10)
                except TimeoutError:
                    process.kill()
            await process.wait()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> LocalSynapse:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def request(self, method: str, path: str, body: JsonDict | None = None,
                      token: str | None = None) -> tuple[int, JsonDict]:
        """One client-API call; returns (HTTP status, JSON body) without raising on errors."""
        if self._session is None:
            raise LocalSynapseError("not started")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self._session.request(method, self.url + path, json=body,
                                         headers=headers) as resp:
            data: JsonDict = await resp.json(content_type=None)
            return resp.status, data

    async def _call(self, method: str, path: str, body: JsonDict | None = None) -> JsonDict:
        status, data = await self.request(method, path, body)
        if status == 200:
            return data
        raise LocalSynapseError(f"{method} {path}: HTTP {status} {data.get('errcode')}: "
                                f"{data.get('error')}")

    async def register_user(self, localpart: str, password: str, admin: bool = False) -> str:
        """Create a user with the shared-secret admin API; returns the MXID."""
        assert self._shared_secret is not None
        path = "/_synapse/admin/v1/register"
        nonce = (await self._call("GET", path))["nonce"]
        mac = hmac.new(self._shared_secret.encode(), digestmod=hashlib.sha1)
        mac.update(b"\x00".join(part.encode() for part in
                                (nonce, localpart, password, "admin" if admin else "notadmin")))
        data = await self._call("POST", path, {"nonce": nonce, "username": localpart,
                                               "password": password, "admin": admin,
                                               "mac": mac.hexdigest()})
        return str(data["user_id"])

    async def login(self, localpart: str, password: str,
                    device_id: str | None = None) -> tuple[str, str, str]:
        """Password login; returns (user_id, access_token, device_id)."""
        body: JsonDict = {"type": "m.login.password", "password": password,
                          "identifier": {"type": "m.id.user", "user": localpart}}
        if device_id is not None:
            body["device_id"] = device_id
        data = await self._call("POST", "/_matrix/client/v3/login", body)
        return str(data["user_id"]), str(data["access_token"]), str(data["device_id"])
