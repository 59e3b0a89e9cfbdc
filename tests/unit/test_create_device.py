"""MatrixAPI.create_device: MSC4190 `PUT /devices/{id}`, and the appservice login only
for a homeserver that refuses it (a stand-in homeserver, since Synapse 1.163 never does)."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bridge.matrix.api import MatrixAPI, MatrixError
from bridge.types import UserID

GHOST = UserID("@cb_ghost:agency.example")


async def _api(aiohttp_server: Any, put_status: int, login: dict[str, Any] | None,
               seen: list[str]) -> tuple[MatrixAPI, aiohttp.ClientSession]:
    async def put_device(request: web.Request) -> web.Response:
        seen.append(f"PUT {request.match_info['device']} {request.query.get('user_id')}")
        assert request.headers["Authorization"] == "Bearer as-token"
        if put_status >= 400:
            return web.json_response({"errcode": "M_UNRECOGNIZED"}, status=put_status)
        return web.json_response({}, status=put_status)

    async def do_login(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(f"LOGIN {body['device_id']} {body['identifier']['user']}")
        if login is None:
            return web.json_response({"errcode": "M_APPSERVICE_LOGIN_UNSUPPORTED"},
                                     status=400)
        return web.json_response(login)

    app = web.Application()
    app.router.add_put("/_matrix/client/v3/devices/{device}", put_device)
    app.router.add_post("/_matrix/client/v3/login", do_login)
    server = await aiohttp_server(app)
    http = aiohttp.ClientSession()
    return MatrixAPI(http, str(server.make_url("")), "as-token"), http


async def test_put_devices_creates_without_login(aiohttp_server: Any) -> None:
    seen: list[str] = []
    api, http = await _api(aiohttp_server, 201, {"access_token": "t"}, seen)
    try:
        await api.create_device(GHOST, "CBDEVICE")
    finally:
        await http.close()
    assert seen == [f"PUT CBDEVICE {GHOST}"]


async def test_without_msc4190_the_login_creates_the_device_once(aiohttp_server: Any) -> None:
    seen: list[str] = []
    api, http = await _api(aiohttp_server, 404, {"access_token": "dropped"}, seen)
    try:
        await api.create_device(GHOST, "CBDEVICE")
    finally:
        await http.close()
    assert seen == [f"PUT CBDEVICE {GHOST}", "LOGIN CBDEVICE cb_ghost"]


async def test_refused_both_ways_names_msc4190(aiohttp_server: Any) -> None:
    seen: list[str] = []
    api, http = await _api(aiohttp_server, 400, None, seen)
    try:
        with pytest.raises(MatrixError, match="MSC4190"):
            await api.create_device(GHOST, "CBDEVICE")
    finally:
        await http.close()
