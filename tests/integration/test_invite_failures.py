"""Invite-link redemption that fails half-way: the link's use comes back, a half-made
account is deactivated, the citizen gets an HTML page in their language saying to try
again, and the link's token is never logged."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from bridge.invites.accounts import PATH as REGISTER_PATH
from bridge.invites.accounts import SynapseRegistrar
from bridge.invites.forms import SignupForm
from bridge.invites.service import InviteLinks, LinkUnusable
from bridge.matrix.api import MatrixAPI
from tests.fixtures.bridge import BridgeHarness
from tests.fixtures.citizens import citizen_room, invite_link, submit_form
from tests.fixtures.faultproxy import FaultProxy

pytestmark = pytest.mark.integration
PASSWORD = "una-clave-bastante-larga"


@pytest_asyncio.fixture(loop_scope="session")
async def proxy(bridge: BridgeHarness) -> AsyncIterator[FaultProxy]:
    p = FaultProxy(bridge.synapse.synapse.url)
    await p.start()
    yield p
    await p.stop()


def is_register(request: web.Request) -> bool:
    return request.method == "POST" and request.path == REGISTER_PATH


def is_invite(request: web.Request) -> bool:
    return request.method == "POST" and request.path.endswith("/invite")


async def uses_of(h: BridgeHarness, url: str) -> int:
    from bridge.invites.service import token_hash
    link = await h.running.bridge.db.invites.by_hash(token_hash(url.rsplit("/", 1)[1]))
    assert link is not None
    return link.uses


@pytest.mark.parametrize("fault", ["register", "invite"])
async def test_a_cut_during_redemption_gives_the_use_back_and_removes_the_account(
        bridge: BridgeHarness, proxy: FaultProxy, fault: str) -> None:
    """Synapse makes the account (and, for "invite", the invite) but the answer never
    arrives: the bridge must not leave the account behind nor keep the link's use."""
    h, b = bridge, bridge.running.bridge
    url = await invite_link(h, await citizen_room(h))
    token = url.rsplit("/", 1)[1]
    proxy.drop_after = [is_register if fault == "register" else is_invite]
    async with aiohttp.ClientSession() as http:
        cfg = b.config
        links = InviteLinks(
            cfg, b.db, MatrixAPI(http, proxy.url, cfg.appservice.as_token), b.rooms,
            b.ghosts.bot, b.privacy,
            SynapseRegistrar(http, proxy.url, cfg.invites.registration_shared_secret))
        form = SignupForm("", PASSWORD, PASSWORD, consent=True, lang="es")
        with pytest.raises(LinkUnusable) as failed:
            await links.redeem(token, form)
    assert failed.value.problem == "failed"
    assert await uses_of(h, url) == 0
    registered = [body for m, p, body in proxy.seen if p == REGISTER_PATH and m == "POST"]
    localpart = registered[-1]["username"]
    status, body = await h.synapse.synapse.request("POST", "/_matrix/client/v3/login", {
        "type": "m.login.password", "password": PASSWORD,
        "identifier": {"type": "m.id.user", "user": localpart}})
    # Deactivated and erased: its password is gone, so the login is refused.
    assert status == 403, body
    entry = (await b.db.audit.list(limit=1))[0]
    assert entry.action == "invite_link.redeem" and entry.result.startswith("error ")
    assert entry.reason == f"account @{localpart}:localhost deactivated"
    assert not any(token in line for line in h.log_lines)
    # The same single-use link still works.
    status, page = await submit_form(url, PASSWORD)
    assert status == 200, page


async def test_synapse_down_shows_a_page_to_retry_and_logs_no_token(
        bridge: BridgeHarness) -> None:
    h = bridge
    url = await invite_link(h, await citizen_room(h))
    token = url.rsplit("/", 1)[1]
    await h.synapse.synapse.stop()
    try:
        status, page = await submit_form(url, PASSWORD, lang="en")
    finally:
        await h.synapse.synapse.start()
    assert status == 503
    assert "<html" in page and "We could not create your account" in page
    assert await uses_of(h, url) == 0
    assert not any(token in line for line in h.log_lines)
    for _ in range(50):  # the bridge reconnects by itself
        status, page = await submit_form(url, PASSWORD)
        if status == 200:
            break
        await asyncio.sleep(0.5)
    assert status == 200, page
