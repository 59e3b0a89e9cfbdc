"""What `civic-bridge demo` keeps in its directory between runs, and the files it owns.

`demo.json` (mode 0600) holds the demo's secrets, ports, the staff login and the
simulated citizens (one who chats, one who only takes notices), so `demo send` / `demo
reply` in a second terminal can find the running demo and a second `demo` run reuses the
same Synapse, accounts, portal and notices subscription.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import string
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "demo.json"
FORMAT = 1
DEFAULT_DIR = "demo-data"
# Synapse's usual port; the bridge, the simulator, the admin API and the metrics listener
# take the next four.
DEFAULT_PORT_BASE = 8008
STAFF_LOCALPART = "staff"
SERVER_NAME = "localhost"
PHONE_NUMBER_ID = "109876543210"
BUSINESS_NUMBER = "+34 900 000 000"
# Everything the demo creates in its directory; `--fresh` removes exactly these.
OWNED = ("synapse", "store", "staff-cli", "bridge.db", "bridge.db-wal", "bridge.db-shm",
         "bridge.log", "config.yaml", "registration.yaml", STATE_FILE)


class DemoStateError(RuntimeError):
    """The demo directory cannot be used; the message says what to do."""


def new_key() -> str:
    """A fresh 32-byte key, base64 (as config keys are written)."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


_key = new_key


def _digits(n: int) -> str:
    return "".join(secrets.choice(string.digits) for _ in range(n))


@dataclass
class Ports:
    synapse: int
    bridge: int
    simulator: int
    # The bridge's admin and metrics listeners (0 in a demo.json from before they had
    # their own; the next start chooses them).
    admin: int = 0
    metrics: int = 0


@dataclass
class Citizen:
    """A simulated WhatsApp user. Its number lives only here, never on screen."""

    wa_id: str
    user_id: str
    name: str

    @classmethod
    def new(cls, name: str = "Lucía (demo)") -> Citizen:
        bsuid = "ES." + "".join(secrets.choice(string.ascii_letters + string.digits)
                                for _ in range(20))
        return cls(wa_id="346" + _digits(8), user_id=bsuid, name=name)


def _notices_citizen() -> Citizen:
    return Citizen.new("Javier (demo)")


@dataclass
class DemoState:
    """The contents of `demo.json`."""

    ports: Ports
    citizen: Citizen
    secrets: dict[str, str]
    staff_password: str
    staff_user_id: str = f"@{STAFF_LOCALPART}:{SERVER_NAME}"
    portal_room_id: str | None = None
    portal_name: str | None = None
    pseudonym: str | None = None  # the citizen's display name in Matrix
    # The second citizen, who only takes notices of availability (no ghost, no portal).
    notices_citizen: Citizen = field(default_factory=_notices_citizen)
    notices_code: str | None = None  # their subscription code
    notices_pseudonym: str | None = None  # the pseudonym the notice log shows
    notices_sent: int = 0  # the demo's own notices so far: each run uses a new reference
    pid: int | None = None  # set while a demo is running
    synapse_pid: int | None = None  # its Synapse, so a killed demo's leftover can be found

    @classmethod
    def new(cls, ports: Ports) -> DemoState:
        return cls(ports=ports, citizen=Citizen.new(), staff_password=secrets.token_urlsafe(12),
                   secrets={"as_token": secrets.token_hex(32), "hs_token": secrets.token_hex(32),
                            "admin_token": secrets.token_urlsafe(32),
                            "data_key": _key(), "index_key": _key(), "audit_key": _key(),
                            "access_token": secrets.token_urlsafe(24),
                            "app_secret": secrets.token_hex(16),
                            "verify_token": secrets.token_urlsafe(16)})

    # URLs derived from the ports, so there is one source of truth.
    @property
    def homeserver_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.synapse}"

    @property
    def bridge_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.bridge}"

    @property
    def admin_url(self) -> str:
        """The admin listener (`/admin/v1/...`)."""
        return f"http://127.0.0.1:{self.ports.admin}"

    @property
    def webhook_url(self) -> str:
        return f"{self.bridge_url}/whatsapp/webhook"

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.ports.simulator}/v23.0"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["format"] = FORMAT
        data["urls"] = {"homeserver": self.homeserver_url, "bridge": self.bridge_url,
                        "webhook": self.webhook_url, "simulator_api_base": self.api_base,
                        "admin_api": f"{self.admin_url}/admin/v1"}  # for humans
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DemoState:
        if data.get("format") != FORMAT:
            raise ValueError("unknown format")
        return cls(ports=Ports(**data["ports"]), citizen=Citizen(**data["citizen"]),
                   secrets=dict(data["secrets"]), staff_password=str(data["staff_password"]),
                   staff_user_id=str(data["staff_user_id"]),
                   portal_room_id=data.get("portal_room_id"),
                   portal_name=data.get("portal_name"), pseudonym=data.get("pseudonym"),
                   # absent in a directory from before the demo showed notices
                   notices_citizen=Citizen(**data["notices_citizen"])
                   if data.get("notices_citizen") else _notices_citizen(),
                   notices_code=data.get("notices_code"),
                   notices_pseudonym=data.get("notices_pseudonym"),
                   notices_sent=int(data.get("notices_sent") or 0),
                   pid=data.get("pid"), synapse_pid=data.get("synapse_pid"))


def load(directory: Path) -> DemoState | None:
    """The saved state, or None if there is none (or it is unreadable)."""
    try:
        return DemoState.from_json(json.loads((directory / STATE_FILE).read_text("utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save(directory: Path, state: DemoState) -> None:
    """Atomically replace demo.json; owner-only, as it holds secrets."""
    tmp = directory / f".{STATE_FILE}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(state.to_json(), f, indent=2)
    tmp.replace(directory / STATE_FILE)


def load_running(directory: Path) -> DemoState:
    """The state of a demo that is running now, for `demo send` / `demo reply`."""
    state = load(directory)
    if state is None or state.pid is None or not pid_alive(state.pid):
        raise DemoStateError(f"no demo is running in {directory}; start one first with "
                             f"`civic-bridge demo` (or `./scripts/demo`) in another terminal")
    return state


def reusable(directory: Path) -> bool:
    """True if an earlier run left a complete demo (state, Synapse DB, bridge DB)."""
    return (load(directory) is not None
            and (directory / "synapse" / "homeserver.db").exists()
            and (directory / "bridge.db").exists())


def wipe(directory: Path) -> None:
    """Remove what the demo created in `directory`, and nothing else."""
    for name in OWNED:
        path = directory / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leftover_synapse(directory: Path) -> int | None:
    """The pid of a Synapse that a killed demo left running on this directory."""
    state = load(directory)
    if state is None or state.synapse_pid is None:
        return None
    try:
        cmdline = Path(f"/proc/{state.synapse_pid}/cmdline").read_bytes()
    except OSError:
        return None
    config = str(directory / "synapse" / "homeserver.yaml").encode()
    return state.synapse_pid if config in cmdline.split(b"\0") else None


def stop_leftover(pid: int, wait: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it is still there after `wait` seconds. Blocking."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + wait
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers will bind: the last run's connections in TIME_WAIT do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def choose_ports(base: int) -> Ports:
    """base, base+1, ... base+4 where free (predictable URLs), else any free ports."""
    from bridge.devtools.synapse import free_port  # keeps `civic-bridge --help` light

    taken: set[int] = set()

    def pick(preferred: int) -> int:
        port = preferred if 0 < preferred < 65536 and port_free(preferred) else free_port()
        while port in taken:
            port = free_port()
        taken.add(port)
        return port

    return Ports(synapse=pick(base), bridge=pick(base + 1), simulator=pick(base + 2),
                 admin=pick(base + 3), metrics=pick(base + 4))
