"""`civic-bridge homeserver-config` and `civic-bridge check-homeserver`.

Exit codes: 0 done / every check passed, 1 a check failed or the install failed,
2 usage or config error (as the other commands).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import yaml

from bridge.cli import load_or_exit
from bridge.config import Config


def cmd_homeserver_config(args: argparse.Namespace) -> int:
    from bridge.homeserver.settings import ModuleInstallError, homeserver_yaml, install_module

    config = load_or_exit(args.config)
    if args.synapse_python:
        try:
            install_module(Path(args.synapse_python))
        except ModuleInstallError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"installed civic-bridge-synapse into {args.synapse_python}'s environment",
              file=sys.stderr)
    sys.stdout.write(homeserver_yaml(config))
    return 0


def warn_without_policy_module(config: Config) -> None:
    """check-config's homeserver probe: a warning on stderr when the homeserver runs
    without the policy module; a note on stdout when it cannot be asked."""
    import aiohttp

    from bridge.homeserver.probe import policy_module_warning

    async def probe() -> str | None:
        async with aiohttp.ClientSession() as session:
            return await policy_module_warning(session, config)

    try:
        warning = asyncio.run(probe())
    except (aiohttp.ClientError, TimeoutError, OSError):
        print(f"note: homeserver {config.homeserver.url} not reachable; its policy module "
              "was not checked (`civic-bridge check-homeserver` does, once it runs)")
        return
    if warning is not None:
        print(f"warning: {warning}", file=sys.stderr)


def _read_homeserver_yaml(path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        print(f"cannot read {path}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if not isinstance(data, dict):
        print(f"{path}: not a YAML mapping", file=sys.stderr)
        raise SystemExit(2)
    return data


def cmd_check_homeserver(args: argparse.Namespace) -> int:
    from bridge.homeserver.checks import check_homeserver_config
    from bridge.homeserver.probe import live_checks

    config = load_or_exit(args.config)
    if not args.homeserver_config and args.no_live:
        print("nothing to check: give --homeserver-config, or drop --no-live",
              file=sys.stderr)
        return 2
    checks = []
    if args.homeserver_config:
        hs = _read_homeserver_yaml(args.homeserver_config)
        checks += check_homeserver_config(hs, config)
    if not args.no_live:
        checks += asyncio.run(live_checks(config))
    for check in checks:
        print(check.line())
    failed = sum(not c.ok for c in checks)
    print(f"{failed} of {len(checks)} checks failed" if failed else
          f"all {len(checks)} checks passed")
    return 1 if failed else 0


def add_homeserver_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "homeserver-config",
        help="print the homeserver.yaml settings (policy module, hardening) to merge",
        description="Print the YAML to merge into Synapse's homeserver.yaml: the policy "
                    "module's `modules:` entry derived from this config, and the hardening "
                    "settings `check-homeserver` verifies. With --synapse-python, first "
                    "install the module into that interpreter's environment.")
    p.add_argument("-c", "--config", default="config.yaml")
    p.add_argument("--synapse-python", metavar="PATH", default=None,
                   help="Synapse's python (e.g. /opt/synapse/bin/python): install the "
                        "module there with pip")
    p.set_defaults(func=cmd_homeserver_config)

    p = sub.add_parser(
        "check-homeserver", help="check the homeserver's settings the bridge relies on",
        description="One line per setting, OK or FAIL with the fix; exit 1 if any fails. "
                    "Reads Synapse's config file (--homeserver-config) and asks the "
                    "running homeserver (homeserver.url) unless --no-live.")
    p.add_argument("-c", "--config", default="config.yaml")
    p.add_argument("--homeserver-config", metavar="PATH", default=None,
                   help="Synapse's homeserver.yaml")
    p.add_argument("--no-live", action="store_true",
                   help="do not contact the homeserver (config file only)")
    p.set_defaults(func=cmd_check_homeserver)
