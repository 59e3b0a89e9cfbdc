"""Ask the running homeserver what its config file cannot show for sure.

The policy module answers `GET /_civic_bridge/policy` (bridge's as_token) on every
Synapse listener; a 404 there means Synapse runs without it. Registration is asked
directly: `POST /register` with no auth answers 403 when it is closed.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from bridge.config import Config
from bridge.homeserver.checks import Check
from bridge.matrix.api import MatrixAPI, MatrixError

POLICY_PATH = "/_civic_bridge/policy"
TIMEOUT = aiohttp.ClientTimeout(total=5)
NO_MODULE = ("the homeserver runs without civic-bridge's policy module: citizens can "
             "create rooms, invite and rename themselves freely; install it with "
             "`civic-bridge homeserver-config` (docs/moderation.md)")


def module_warning(status: int, body: Any, config: Config) -> str | None:
    """What is wrong with the module, from the answer to GET /_civic_bridge/policy."""
    if status == 404:
        return NO_MODULE
    if status != 200 or not isinstance(body, dict):
        return f"could not ask the homeserver about its policy module (HTTP {status})"
    prefix, ghost = config.invites.localpart_prefix, config.appservice.ghost_prefix
    if prefix not in (body.get("citizen_prefixes") or []):
        return (f"the homeserver's policy module does not treat {prefix!r} "
                "(invites.localpart_prefix) as citizens; regenerate its config with "
                "`civic-bridge homeserver-config`")
    if ghost not in (body.get("ghost_prefixes") or []):
        return (f"the homeserver's policy module does not know the ghost prefix "
                f"{ghost!r}; regenerate its config with `civic-bridge homeserver-config`")
    return None


async def _get_json(session: aiohttp.ClientSession, method: str, url: str,
                    **kwargs: Any) -> tuple[int, Any]:
    async with session.request(method, url, timeout=TIMEOUT, **kwargs) as resp:
        try:
            return resp.status, await resp.json(content_type=None)
        except ValueError:
            return resp.status, None


async def policy_module_warning(session: aiohttp.ClientSession, config: Config) -> str | None:
    """None when the module is loaded with this bridge's prefixes, else the warning.
    Network errors propagate: the caller knows whether the homeserver must be up."""
    status, body = await _get_json(
        session, "GET", config.homeserver.url.rstrip("/") + POLICY_PATH,
        headers={"Authorization": f"Bearer {config.appservice.as_token}"})
    return module_warning(status, body, config)


async def api_module_warning(api: MatrixAPI, config: Config) -> str | None:
    """`policy_module_warning` through the bridge's own homeserver client (for /ready)."""
    try:
        body: Any = await api.request("GET", POLICY_PATH)
        status = 200
    except MatrixError as exc:
        status, body = exc.status, None
    return module_warning(status, body, config)


async def live_checks(config: Config) -> list[Check]:
    """What the running homeserver says: reachable, registration closed, module loaded."""
    base = config.homeserver.url.rstrip("/")
    async with aiohttp.ClientSession() as session:
        try:
            status, _ = await _get_json(session, "GET", base + "/_matrix/client/versions")
        except (aiohttp.ClientError, TimeoutError) as exc:
            return [Check("homeserver (live)", False, f"{base} unreachable "
                          f"({type(exc).__name__})", "start Synapse or fix homeserver.url")]
        checks = [Check("homeserver (live)", status == 200, f"{base} answers HTTP {status}",
                        "check homeserver.url")]
        status, _ = await _get_json(session, "POST", base + "/_matrix/client/v3/register",
                                    json={})
        closed = status == 403
        checks.append(Check("registration (live)", closed,
                            "closed" if closed else f"open (HTTP {status})",
                            "set `enable_registration: false` and restart Synapse"))
        warning = await policy_module_warning(session, config)
        checks.append(Check("policy module (live)", warning is None,
                            "loaded, with the bridge's prefixes" if warning is None
                            else warning.split(";")[0],
                            "install and configure it with `civic-bridge homeserver-config`, "
                            "then restart Synapse"))
    return checks
