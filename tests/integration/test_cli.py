"""The real CLI, as operators run it: `python -m bridge ...` in a subprocess.

init, check-config, registration, migrate and run's refusal of a wrong database, on
SQLite and PostgreSQL. No homeserver: `run` must judge the database before anything else.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import text

from bridge.cli import init_config
from bridge.config import ENV_PREFIX, load_config
from bridge.db import Database, downgrade, schema_status, upgrade
from bridge.db.engine import create_engine
from bridge.devtools.synapse import free_port
from bridge.privacy import Privacy
from tests.fixtures.synapse import other_free_port

DOMAIN = "agency.example"
# Nothing listens here: a command that tries the homeserver would hang or fail differently.
DEAD_HOMESERVER = f"http://127.0.0.1:{free_port()}"
SECRET_PATHS = [("appservice", "as_token"), ("appservice", "hs_token"), ("admin", "token"),
                ("privacy", "data_key"), ("privacy", "index_key"), ("audit", "key")]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def _env() -> dict[str, str]:
    # The developer's own CIVIC_BRIDGE_* secrets must not leak into the commands.
    return {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}


async def cli(*args: str, cwd: Path, timeout: float = 60) -> Result:
    """Run `python -m bridge ARGS` in `cwd` and wait for it to exit."""
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", *args, cwd=cwd, env=_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        pytest.fail(f"civic-bridge {' '.join(args)} still running after {timeout}s:\n"
                    f"{err.decode(errors='replace')[-2000:]}")
    return Result(proc.returncode or 0, out.decode(), err.decode(), time.monotonic() - start)


def assert_no_traceback(result: Result) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _read(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _write(path: Path, data: Any) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


async def _init(tmp: Path, name: str = "conf") -> Path:
    result = await cli("init", "--dir", name, "--domain", DOMAIN,
                       "--homeserver", DEAD_HOMESERVER, cwd=tmp)
    assert result.returncode == 0, result.stderr
    assert_no_traceback(result)
    return tmp / name


# --- init / check-config / registration --------------------------------------------------


async def test_help_lists_every_command(tmp_path: Path) -> None:
    result = await cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    for command in ("init", "check-config", "registration", "migrate", "run"):
        assert re.search(rf"\b{command}\b", result.stdout), command


async def test_init_writes_a_working_config_and_matching_registration(tmp_path: Path) -> None:
    conf = await _init(tmp_path)
    cfg_path, reg_path = conf / "config.yaml", conf / "registration.yaml"
    assert _mode(cfg_path) == 0o600
    assert _mode(reg_path) == 0o600

    check = await cli("check-config", "-c", "conf/config.yaml", cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert check.stderr == ""
    assert "ok" in check.stdout

    cfg = _read(cfg_path)
    assert cfg["homeserver"] == {"url": DEAD_HOMESERVER, "domain": DOMAIN}
    assert cfg["whatsapp"]["enabled"] is False  # off until its secrets are filled in
    for key in ("data_key", "index_key"):
        assert len(base64.b64decode(cfg["privacy"][key], validate=True)) == 32
    assert cfg["privacy"]["data_key"] != cfg["privacy"]["index_key"]
    assert len(base64.b64decode(cfg["audit"]["key"], validate=True)) == 32
    for section, key in (("appservice", "as_token"), ("appservice", "hs_token"),
                         ("admin", "token")):
        assert len(cfg[section][key]) >= 32
    assert len({cfg[s][k] for s, k in SECRET_PATHS}) == len(SECRET_PATHS)

    reg = _read(reg_path)
    assert reg["as_token"] == cfg["appservice"]["as_token"]
    assert reg["hs_token"] == cfg["appservice"]["hs_token"]
    assert reg["url"] == "http://127.0.0.1:29340"
    assert reg["sender_localpart"] == cfg["appservice"]["bot_localpart"]
    [users] = reg["namespaces"]["users"]
    assert users == {"exclusive": True, "regex": r"@cb_.*:agency\.example"}
    for ns in reg["namespaces"]["aliases"]:
        assert ns["exclusive"] is True
    pattern = re.compile(users["regex"])
    assert pattern.fullmatch(f"@cb_q7x2k:{DOMAIN}")
    assert not pattern.fullmatch(f"@alice:{DOMAIN}")
    assert not pattern.fullmatch("@cb_q7x2k:agencyXexample")


async def test_two_inits_generate_different_secrets(tmp_path: Path) -> None:
    one, two = await asyncio.gather(_init(tmp_path, "one"), _init(tmp_path, "two"))
    a, b = _read(one / "config.yaml"), _read(two / "config.yaml")
    for section, key in SECRET_PATHS:
        assert a[section][key] != b[section][key], f"{section}.{key} repeated"


async def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    conf = await _init(tmp_path)
    before = {p.name: p.read_bytes() for p in conf.iterdir()}
    again = await cli("init", "--dir", "conf", "--domain", "other.example", cwd=tmp_path)
    assert again.returncode != 0
    assert "refusing to overwrite" in again.stderr
    assert_no_traceback(again)
    assert {p.name: p.read_bytes() for p in conf.iterdir()} == before

    # One of the two files alone is enough to refuse, and the other is not created.
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "registration.yaml").write_text("# operator's own\n", encoding="utf-8")
    partial = await cli("init", "--dir", "lone", cwd=tmp_path)
    assert partial.returncode != 0
    assert not (lone / "config.yaml").exists()
    assert (lone / "registration.yaml").read_text(encoding="utf-8") == "# operator's own\n"


async def test_init_with_bad_arguments_writes_nothing(tmp_path: Path) -> None:
    result = await cli("init", "--dir", "new", "--domain", "not a domain",
                       "--homeserver", "ftp://matrix.agency.example", cwd=tmp_path)
    assert result.returncode == 2
    assert_no_traceback(result)
    assert [line.split(":", 2)[1].strip() for line in result.err_lines] == [
        "homeserver.url", "homeserver.domain"]
    assert not (tmp_path / "new").exists()


async def test_check_config_prints_one_line_per_problem(tmp_path: Path) -> None:
    conf = await _init(tmp_path)
    cfg = _read(conf / "config.yaml")
    cfg["appservice"]["listen_port"] = "abc"
    cfg["homeserver"]["urll"] = "https://typo.example"
    cfg["privacy"]["index_key"] = base64.b64encode(b"sixteen byte key").decode()
    cfg["admin"]["token"] = "CHANGE_ME_admin_token"
    cfg["whatsapp"] = {"enabled": True}
    _write(conf / "config.yaml", cfg)

    for command in ("check-config", "run"):
        result = await cli(command, "-c", "conf/config.yaml", cwd=tmp_path)
        assert result.returncode == 2, command
        assert_no_traceback(result)
        assert all(line.startswith("config error: ") for line in result.err_lines)
        paths = sorted(line.removeprefix("config error: ").split(":", 1)[0]
                       for line in result.err_lines)
        assert paths == sorted([
            "appservice.listen_port", "homeserver.urll", "privacy.index_key", "admin.token",
            "whatsapp.access_token", "whatsapp.app_secret", "whatsapp.verify_token",
            "whatsapp.phone_number_id",
        ]), command
        assert ("config error: whatsapp.app_secret: missing; set it or "
                "whatsapp.app_secret_file or $CIVIC_BRIDGE_WHATSAPP_APP_SECRET"
                in result.err_lines)
        assert result.stdout == ""


@pytest.mark.parametrize(("content", "expected"), [
    (None, "cannot read: No such file or directory"),
    (b"homeserver: [unclosed\n", "not valid YAML (line 2)"),
    (b"consent:\n  agency_name: C\xe1diz\n", "not UTF-8 text"),
])
async def test_check_config_on_an_unusable_file(tmp_path: Path, content: bytes | None,
                                                 expected: str) -> None:
    if content is not None:
        (tmp_path / "config.yaml").write_bytes(content)
    result = await cli("check-config", "-c", "config.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert_no_traceback(result)
    assert result.err_lines == [f"config error: config.yaml: {expected}"]


async def test_check_config_rejects_the_example_as_is(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "config.example.yaml"
    (tmp_path / "config.yaml").write_bytes(example.read_bytes())
    result = await cli("check-config", "-c", "config.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert_no_traceback(result)
    assert len(result.err_lines) == 6  # the six CHANGE_ME secrets, nothing else
    assert all("still the placeholder" in line for line in result.err_lines)


async def test_registration_regenerates_the_same_registration(tmp_path: Path) -> None:
    conf = await _init(tmp_path)
    out = tmp_path / "out" / "reg.yaml"
    out.parent.mkdir()
    out.write_text("stale\n", encoding="utf-8")
    out.chmod(0o644)  # regenerating must not leave the tokens world-readable
    result = await cli("registration", "-c", "conf/config.yaml", "-o", "out/reg.yaml",
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert _read(out) == _read(conf / "registration.yaml")
    assert _mode(out) == 0o600
    stdout = await cli("registration", "-c", "conf/config.yaml", cwd=tmp_path)
    assert stdout.returncode == 0
    assert yaml.safe_load(stdout.stdout) == _read(conf / "registration.yaml")


# --- migrate and run, on SQLite and PostgreSQL -------------------------------------------


@dataclass
class Deployment:
    """An `init`ed config dir whose database.url points at a fresh, empty database."""

    root: Path  # the commands' CWD
    config_arg: str  # -c as the operator typed it
    url: str  # the resolved URL, for checks from the test

    @property
    def config_path(self) -> Path:
        return self.root / self.config_arg


@pytest.fixture
async def deployment(tmp_path: Path, db_backend: Any, blank_db_url: str) -> Deployment:
    # What `init` writes (its own tests run it as a subprocess; here that would only cost time).
    conf = tmp_path / "conf"
    conf.mkdir()
    cfg = init_config(DOMAIN, DEAD_HOMESERVER)
    if db_backend.name == "sqlite":
        # Relative: resolved against the config's directory, not the CWD.
        url = "sqlite+aiosqlite:///state/bridge.db"
        (conf / "state").mkdir()
    else:
        url = blank_db_url  # a new PostgreSQL database, dropped after the test
    cfg["database"] = {"url": url}
    _write(conf / "config.yaml", cfg)
    return Deployment(tmp_path, "conf/config.yaml",
                      load_config(conf / "config.yaml").database.url)


async def _execute(url: str, statement: str) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(statement))
    finally:
        await engine.dispose()


async def test_migrate_creates_the_schema_and_is_idempotent(deployment: Deployment,
                                                            tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # From another directory: a relative SQLite path must still land next to the config.
    first = await cli("migrate", "-c", str(deployment.config_path), cwd=elsewhere)
    assert first.returncode == 0, first.stderr
    assert_no_traceback(first)
    assert await schema_status(deployment.url) == "current"
    if deployment.url.startswith("sqlite"):
        assert (tmp_path / "conf" / "state" / "bridge.db").is_file()
        assert list(elsewhere.iterdir()) == []
    second = await cli("migrate", "-c", deployment.config_arg, cwd=deployment.root)
    assert second.returncode == 0, second.stderr
    assert await schema_status(deployment.url) == "current"


async def test_migrate_keys_wamids_stored_in_clear_before_0010(deployment: Deployment) -> None:
    """`migrate` from revision 0009 also does the data part of 0010, which needs the
    keys: a wamid the old code kept in clear is a keyed hash afterwards."""
    await upgrade(deployment.url, "0009")
    wamid = "wamid.HBgLMzQ2MDAxMTIyMzMVAgASGBQzRUIwRjJCMjQ4NjA2QzU3MTk0NQA="
    await _execute(deployment.url, "INSERT INTO inbound (source, dedupe_key, lane, payload, "
                   "status, attempts, created_at) VALUES ('whatsapp', 'msg:" + wamid +
                   "', '', 'x', 'done', 0, '2026-12-01 10:00:00')")
    result = await cli("migrate", "-c", deployment.config_arg, cwd=deployment.root)
    assert result.returncode == 0, result.stderr
    assert "wamids stored in clear, now keyed: 1" in result.stdout
    index = Privacy.from_config(load_config(deployment.config_path).privacy).index
    async with await Database.open(deployment.url) as db:
        [item] = await db.inbound.after(0)
        assert item.dedupe_key == f"msg:{index.wamid(wamid)}"


@pytest.mark.parametrize("state", ["empty", "behind", "foreign"])
async def test_run_refuses_a_wrong_database_with_the_fix(deployment: Deployment,
                                                         state: str) -> None:
    if state == "behind":
        await upgrade(deployment.url)
        await downgrade(deployment.url, "base")
    elif state == "foreign":
        await _execute(deployment.url, "CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    assert await schema_status(deployment.url) == state

    result = await cli("run", "-c", deployment.config_arg, cwd=deployment.root, timeout=30)
    assert result.returncode == 2
    assert_no_traceback(result)
    assert result.seconds < 20  # refused up front, no waiting for the dead homeserver
    errors = [line for line in result.err_lines if line.startswith("database error: ")]
    assert len(errors) == 1, result.stderr
    if state == "foreign":
        assert "is not civic-bridge's" in errors[0]
        assert "point database.url at an empty database" in errors[0]
        # ... and migrate will not build our tables next to someone else's.
        migrate = await cli("migrate", "-c", deployment.config_arg, cwd=deployment.root)
        assert migrate.returncode == 2
        assert_no_traceback(migrate)
        assert "is not civic-bridge's" in migrate.stderr
        assert await schema_status(deployment.url) == "foreign"
    else:
        assert errors[0].endswith(f"run: civic-bridge migrate -c {deployment.config_arg}")
    assert "listening on" not in result.stderr


@pytest.mark.parametrize("db_backend", ["sqlite"], indirect=True)  # the check is what varies
async def test_run_starts_on_a_migrated_database(deployment: Deployment) -> None:
    """The counterpart: after `migrate`, `run` gets past the check and serves."""
    cfg = _read(deployment.config_path)
    cfg["appservice"]["listen_port"] = port = free_port()
    cfg["admin"]["listen_port"] = admin_port = other_free_port(port)
    cfg.setdefault("metrics", {})["listen_port"] = other_free_port(port, admin_port)
    _write(deployment.config_path, cfg)
    assert (await cli("migrate", "-c", deployment.config_arg,
                      cwd=deployment.root)).returncode == 0
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "run", "-c", deployment.config_arg,
        cwd=deployment.root, env=_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        seen = b""
        assert proc.stderr is not None
        async with asyncio.timeout(30):
            while b"listening on" not in seen:
                line = await proc.stderr.readline()
                assert line, f"run exited early:\n{seen.decode(errors='replace')}"
                seen += line
        assert f"127.0.0.1:{port}".encode() in seen
        assert b"database error" not in seen
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            rest = await proc.stderr.read()
            assert await proc.wait() == 0, rest.decode(errors="replace")
        assert b"Traceback" not in seen + rest, (seen + rest).decode(errors="replace")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_database_errors_are_one_line_without_password(tmp_path: Path) -> None:
    conf = await _init(tmp_path)
    cfg = _read(conf / "config.yaml")
    cfg["database"]["url"] = f"postgresql+asyncpg://bridge:hunter2pw@127.0.0.1:{free_port()}/cb"
    _write(conf / "config.yaml", cfg)
    for command in ("migrate", "run"):
        result = await cli(command, "-c", "conf/config.yaml", cwd=tmp_path)
        assert result.returncode == 2, command
        assert_no_traceback(result)
        [line] = [x for x in result.err_lines if x.startswith("database error: ")]
        assert line.startswith("database error: cannot use postgresql+asyncpg://bridge:***@")
        assert "hunter2pw" not in result.stderr + result.stdout
