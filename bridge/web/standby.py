"""Until this process is the elected leader it serves only the operational endpoints.

Everything else (appservice transactions, the WhatsApp webhook, the admin API, invite
pages) answers 503: Synapse retries refused transactions and Meta retries webhook
deliveries, so refusing loses nothing, while a standby that accepted them would act
without the crypto store and beside the active process (see bridge.leader).
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from bridge.errors import Unavailable
from bridge.web.state import PROCESS

ALWAYS_SERVED = frozenset({"/health", "/ready", "/metrics"})


@web.middleware
async def active_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """503 for everything but /health, /ready and /metrics unless the role is active."""
    if request.path not in ALWAYS_SERVED and request.config_dict[PROCESS].role != "active":
        raise Unavailable(f"this bridge process is {request.config_dict[PROCESS].role}, "
                          "not the active one; retry later")
    response: web.StreamResponse = await handler(request)
    return response
