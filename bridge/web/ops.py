"""Operational endpoints: /health (process alive), /ready (DB + homeserver), /metrics.

The probes (`routes`) are on every listener; /metrics (`metrics_routes`) only on the
metrics listener (bridge.app). All three are served in every role (bridge.leader).
`/ready` is 200 on a healthy standby as well, with `"role": "standby"`: a Deployment
counts only Ready pods, and a standby that never became Ready would block every rolling
update (deploy/README.md). Only the active process must also have started.
"""

from __future__ import annotations

import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bridge.web.state import PROCESS

log = logging.getLogger(__name__)
routes = web.RouteTableDef()
metrics_routes = web.RouteTableDef()


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/ready")
async def ready(request: web.Request) -> web.Response:
    bridge = request.config_dict[PROCESS]
    checks = {"started": bridge.ready.is_set(), "database": False, "homeserver": False}
    if bridge.role != "active":
        del checks["started"]  # a standby starts only once elected
    try:
        await bridge.db.ping()
        checks["database"] = True
    except Exception as exc:
        log.warning("readiness: database %s", type(exc).__name__)
    try:
        await bridge.api.versions()
        checks["homeserver"] = True
    except Exception as exc:
        log.warning("readiness: homeserver %s", type(exc).__name__)
    ok = all(checks.values()) and bridge.role != "lost"
    answer: dict[str, object] = {"role": bridge.role, **checks}
    warnings: list[str] = []
    # Warnings, not failures: the bridge works, at a cost. Without the policy module,
    # citizens' accounts are only as limited as Synapse's defaults; without to-device
    # events and key counts in transactions, every E2EE device polls with /sync.
    if (e2ee := bridge.crypto.warning()) is not None:
        warnings.append(e2ee)
    if checks["homeserver"]:
        warning = await _policy_module_warning(request)
        if warning is not None:
            warnings.append(warning)
    if warnings:
        answer["warnings"] = warnings
    return web.json_response(answer, status=200 if ok else 503)


async def _policy_module_warning(request: web.Request) -> str | None:
    from bridge.homeserver.probe import api_module_warning

    bridge = request.config_dict[PROCESS]
    try:
        return await api_module_warning(bridge.api, bridge.config)
    except Exception as exc:
        log.warning("readiness: policy module probe %s", type(exc).__name__)
        return "could not ask the homeserver about its policy module"


@metrics_routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    bridge = request.config_dict[PROCESS]
    if not bridge.config.metrics.enabled:
        raise web.HTTPNotFound()
    bridge.metrics.outbox_depth.set(await bridge.db.outbox.depth())
    body = generate_latest(bridge.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
