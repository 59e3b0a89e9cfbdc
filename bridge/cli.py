"""Command line: `civic-bridge COMMAND` (same as `python -m bridge`)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import os
import secrets
import shlex
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from bridge.config import Config, load_config
from bridge.errors import ConfigError, SchemaError

if TYPE_CHECKING:
    from bridge.leader import Election

log = logging.getLogger("bridge")
# `run` exits with this status after losing the leader lock (bridge.leader).
EXIT_LEADERSHIP_LOST = 3


def load_or_exit(path: str) -> Config:
    """The config at `path`, or exit 2 after one line per problem on stderr."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"config error: {line}", file=sys.stderr)
        raise SystemExit(2) from None


@contextmanager
def _database_errors(config_path: str, url: str) -> Iterator[None]:
    """Turn a database that is unusable (wrong schema, unreachable) into one line and exit 2."""
    from sqlalchemy.exc import SQLAlchemyError

    from bridge.db.engine import FIX_COMMAND, safe_url

    try:
        yield
    except SchemaError as exc:
        fix = f"civic-bridge migrate -c {shlex.quote(config_path)}"
        print(f"database error: {str(exc).replace(FIX_COMMAND, fix)}", file=sys.stderr)
        raise SystemExit(2) from None
    except (OSError, SQLAlchemyError) as exc:
        # The driver's own message, without SQLAlchemy's SQL echo and link.
        detail = getattr(exc, "orig", None) or exc
        print(f"database error: cannot use {safe_url(url)}: {detail}", file=sys.stderr)
        raise SystemExit(2) from None


def _key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def init_config(domain: str, homeserver: str,
                db_path: str = "civic-bridge.db") -> dict[str, object]:
    """A complete, working config with fresh secrets (WhatsApp off until filled in)."""
    return {
        "homeserver": {"url": homeserver, "domain": domain},
        "appservice": {"listen_host": "127.0.0.1", "listen_port": 29340,
                       "as_token": secrets.token_urlsafe(32),
                       "hs_token": secrets.token_urlsafe(32),
                       "bot_localpart": "civicbridge", "ghost_prefix": "cb_",
                       "store_dir": "./store"},
        "database": {"url": f"sqlite+aiosqlite:///{db_path}"},
        "privacy": {"data_key": _key(), "index_key": _key(),
                    "pseudonym_template": "Ciudadano/a {code}"},
        "audit": {"key": _key()},
        "whatsapp": {"enabled": False},
        "admin": {"listen_host": "127.0.0.1", "listen_port": 29341,
                  "token": secrets.token_urlsafe(32), "users": []},
        "portals": {"staff": []},
        "rooms": {"federate": False},
        "logging": {"level": "INFO", "format": "text"},
        "metrics": {"enabled": True, "listen_host": "127.0.0.1", "listen_port": 29342},
    }


def _write_new(path: Path, text: str) -> None:
    # O_EXCL: never overwrite; 0600: the files hold secrets.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def cmd_init(args: argparse.Namespace) -> int:
    from bridge.config import parse_config
    from bridge.registration import registration_yaml

    directory = Path(args.dir)
    cfg_path, reg_path = directory / "config.yaml", directory / "registration.yaml"
    existing = [str(p) for p in (cfg_path, reg_path) if p.exists()]
    if existing:
        print(f"refusing to overwrite {', '.join(existing)}; remove them or use another --dir",
              file=sys.stderr)
        return 1
    raw = init_config(args.domain, args.homeserver)
    try:
        # Validate before touching the disk: a bad --domain/--homeserver writes nothing.
        config = parse_config(raw, directory)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"config error: {line}", file=sys.stderr)
        return 2
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _write_new(cfg_path, "# civic-bridge configuration; see config.example.yaml "
                   "for every key.\n" + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
        _write_new(reg_path, registration_yaml(config))
    except OSError as exc:
        print(f"cannot write {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"wrote {cfg_path} and {reg_path}\n"
          f"next: add {reg_path} to Synapse's app_service_config_files, then\n"
          f"  civic-bridge migrate -c {cfg_path}\n  civic-bridge run -c {cfg_path}")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_or_exit(args.config)
    print(f"{args.config}: ok")
    from bridge.homeserver.cli import warn_without_policy_module

    warn_without_policy_module(config)  # warns, never fails: the config itself is fine
    # Not visible from here (Synapse advertises neither switch): said once, not guessed.
    print("note: E2EE without polling needs the homeserver to send to-device events and "
          "key counts to the bridge (MSC2409/MSC3202, docs/e2ee.md); "
          "`civic-bridge check-homeserver --homeserver-config homeserver.yaml` checks "
          "the settings, `run` tests them at start and otherwise falls back to /sync "
          "with a warning")
    return 0


def cmd_registration(args: argparse.Namespace) -> int:
    from bridge.registration import registration_yaml

    text = registration_yaml(load_or_exit(args.config))
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        out = Path(args.output)
        try:
            # Never world-readable, not even for a moment: it holds both tokens.
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)  # an existing file keeps its old mode otherwise
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as exc:
            print(f"cannot write {out}: {exc.strerror}", file=sys.stderr)
            return 1
        print(f"wrote {out}")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from bridge.db import Database
    from bridge.db.engine import upgrade
    from bridge.legacy_wamids import key_legacy_wamids
    from bridge.privacy import Privacy
    from bridge.whatsapp.outbound import adopt_legacy_holds

    config = load_or_exit(args.config)

    async def run() -> dict[str, int]:
        await upgrade(config.database.url)
        # The data part of revision 0010, which needs the keys (bridge.legacy_wamids).
        async with await Database.open(config.database.url) as db:
            privacy = Privacy.from_config(config.privacy)
            await adopt_legacy_holds(db, privacy.cipher)  # the data part of 0015
            return await key_legacy_wamids(db, privacy)

    with _database_errors(args.config, config.database.url):
        keyed = asyncio.run(run())
    print("database schema is current")
    if any(keyed.values()):
        print(f"wamids stored in clear, now keyed: {sum(keyed.values())}")
    return 0


def cmd_rekey(args: argparse.Namespace) -> int:
    from bridge.auditchain import AuditKeys
    from bridge.db import Database
    from bridge.privacy import Privacy
    from bridge.rekey import RekeyReport, rekey_database

    config = load_or_exit(args.config)

    async def run() -> RekeyReport:
        db = await Database.open(config.database.url, audit_keys=AuditKeys.from_base64(
            config.audit.key, config.audit.previous_keys))
        try:
            privacy = Privacy.from_config(config.privacy)
            report = await rekey_database(db, privacy.cipher, privacy.index)
            await db.audit.seal()
            await db.audit.append("cli", "privacy.rekey", "stored data",
                                  "ok" if report.complete else "incomplete", report.summary())
            return report
        finally:
            await db.close()

    with _database_errors(args.config, config.database.url):
        report = asyncio.run(run())
    for line in report.lines():
        print(line)
    if not report.complete:
        print("some values still need a previous key: keep privacy.previous_data_keys and "
              "privacy.previous_index_keys until this reports none", file=sys.stderr)
        return 1
    print("every value is under the current keys: privacy.previous_data_keys and "
          "privacy.previous_index_keys can be removed")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    """One retention purge now, as the running bridge does every ten minutes; exit 1 if a
    step failed (the log says which)."""
    from datetime import UTC, datetime

    from bridge.retention import PurgeReport
    from bridge.services import build_bridge

    config = load_or_exit(args.config)

    async def run() -> PurgeReport:
        # The composition root, not started: no devices, no workers, no leader lock.
        bridge = await build_bridge(config)
        try:
            return await bridge.retention_job(offline=True).run(datetime.now(UTC),
                                                                dry_run=args.dry_run)
        finally:
            await bridge.close()

    with _database_errors(args.config, config.database.url):
        report = asyncio.run(run())
    print("\n".join(report.lines()))
    if args.dry_run:
        print("dry run: nothing was deleted")
    return 1 if report.failed else 0


async def check_database(url: str) -> None:
    """Raise SchemaError, with the fix, unless the database is ours and current."""
    from bridge.db import Database

    db = await Database.open(url)
    await db.close()


async def serve(config: Config, stop: asyncio.Event, election: Election) -> None:
    """Serve until `stop`; raise LeadershipLost if the leader lock is lost first.
    `election` was claimed already (cmd_run)."""
    from bridge.app import Listeners
    from bridge.leader import LeadershipLost

    # The public app's setup opens the database (refusing a wrong schema) before any
    # port is bound.
    listeners = Listeners(config, election=election)
    try:
        await listeners.start()
    except BaseException:
        await election.release()  # no Bridge may exist to give the claimed lock up
        raise
    bridge = listeners.bridge
    freeze = asyncio.create_task(_freeze_when_ready(bridge.ready))
    waits = [asyncio.create_task(stop.wait()), asyncio.create_task(bridge.lost.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in [*waits, freeze]:
            task.cancel()
        await listeners.stop()
    if bridge.lost.is_set():
        raise LeadershipLost(bridge.stop_reason)


async def _freeze_when_ready(ready: asyncio.Event) -> None:
    """Once started, the heap built so far is frozen (bridge.heap)."""
    from bridge.heap import freeze_startup_heap

    await ready.wait()
    freeze_startup_heap()


def cmd_run(args: argparse.Namespace) -> int:
    from bridge.logsetup import setup_logging

    config = load_or_exit(args.config)
    setup_logging(config.logging, secrets=config.secret_values())

    async def main() -> None:
        from bridge.leader import election_for

        # First of all: after a crash a new leader waits a grace (bridge.leader), which
        # then runs while the rest loads (the database check, the bridge, its services).
        election = election_for(config.database.url)
        await election.claim()
        try:
            # Before anything else (port, homeserver): a wrong database is the commonest
            # first-run mistake, and its message names the command that fixes it.
            with _database_errors(args.config, config.database.url):
                await check_database(config.database.url)
        except BaseException:
            await election.release()  # never led: nothing is recorded
            raise
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, stop, election)

    try:
        asyncio.run(main())
    except SchemaError as exc:
        print(f"database error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        # Imported here, not before the claim: they load much of the bridge.
        from bridge.leader import LeadershipLost
        from bridge.matrix.storekey import StoreKeyError

        if isinstance(exc, StoreKeyError):
            print(f"key error: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, LeadershipLost):
            # Not 0: the supervisor (systemd Restart=on-failure, Kubernetes) must start
            # us again, as a standby.
            log.error("exiting with status %d: %s", EXIT_LEADERSHIP_LOST, exc)
            return EXIT_LEADERSHIP_LOST
        raise
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="civic-bridge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="write config.yaml and registration.yaml with fresh secrets")
    p.add_argument("--dir", default=".")
    p.add_argument("--domain", default="localhost", help="the homeserver's server name")
    p.add_argument("--homeserver", default="http://127.0.0.1:8008",
                   help="how the bridge reaches the homeserver")
    p.set_defaults(func=cmd_init)

    for name, func, text in (
        ("check-config", cmd_check_config, "validate a config file; prints every problem"),
        ("migrate", cmd_migrate, "create or upgrade the database schema"),
        ("run", cmd_run, "run the bridge"),
        ("rekey", cmd_rekey, "re-seal stored data and re-hash citizens under the current "
                             "privacy keys (run with the bridge stopped)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("-c", "--config", default="config.yaml")
        p.set_defaults(func=func)

    p = sub.add_parser("purge", help="delete what is past its retention period now "
                                     "(one line per table)")
    p.add_argument("-c", "--config", default="config.yaml")
    p.add_argument("--dry-run", action="store_true",
                   help="only count what would be deleted; change nothing")
    p.set_defaults(func=cmd_purge)

    p = sub.add_parser("registration", help="write the Synapse appservice registration")
    p.add_argument("-c", "--config", default="config.yaml")
    p.add_argument("-o", "--output", default=None, help="file (default: stdout)")
    p.set_defaults(func=cmd_registration)

    _add_demo_parser(sub)

    from bridge.admin.cli import add_admin_parser

    add_admin_parser(sub)

    from bridge.homeserver.cli import add_homeserver_parsers

    add_homeserver_parsers(sub)
    return parser


def cmd_demo(args: argparse.Namespace) -> int:
    if args.demo_action is not None:  # light: no bridge, no Synapse
        from bridge.devtools.demo_client import main as client_main

        return client_main(args.demo_action, args.dir, args.text)
    from bridge.devtools.demo import main as demo_main

    return demo_main(args.dir, args.port_base, args.fresh)


def _add_demo_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from bridge.devtools.demo_state import DEFAULT_DIR, DEFAULT_PORT_BASE

    p = sub.add_parser(
        "demo", help="local demo: throwaway Synapse + WhatsApp simulator + the bridge",
        description="Start a throwaway Synapse, the WhatsApp Cloud API simulator and the "
                    "bridge on 127.0.0.1 (SQLite), with a staff account and a portal to try. "
                    "Ctrl-C stops everything. `demo send`/`demo reply` talk to a running demo.")
    p.add_argument("--dir", default=DEFAULT_DIR,
                   help=f"where the demo keeps its data between runs (default: ./{DEFAULT_DIR})")
    p.add_argument("--port-base", type=int, default=DEFAULT_PORT_BASE,
                   help="Synapse on this port; the bridge, the simulator, the bridge's admin "
                        "API and its metrics on the next four, "
                        f"where free (default: {DEFAULT_PORT_BASE})")
    p.add_argument("--fresh", action="store_true",
                   help="throw away the previous run's data and start over")
    p.set_defaults(func=cmd_demo, demo_action=None)
    actions = p.add_subparsers(dest="demo_action", metavar="{send,reply}")
    for name, text in (("send", "the simulated citizen writes TEXT on WhatsApp"),
                       ("reply", "the demo staff user answers TEXT in the portal (E2EE)")):
        a = actions.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        a.add_argument("text", metavar="TEXT")
        # SUPPRESS: without --dir here, the value given before the action stands.
        a.add_argument("--dir", default=argparse.SUPPRESS,
                       help="the running demo's directory (default: ./demo-data)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result
