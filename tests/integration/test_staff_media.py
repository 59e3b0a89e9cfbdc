"""Staff attachments of any size up to WhatsApp's limits reach the citizen intact."""

from __future__ import annotations

import hashlib
import io
import os

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from nio.crypto.attachments import encrypt_attachment

from bridge.matrix.api import MatrixAPI, MatrixError
from bridge.types import UserID
from tests.fixtures.bridge import BridgeHarness
from tests.integration.test_whatsapp import new_citizen, opt_in

pytestmark = pytest.mark.integration


async def test_large_encrypted_attachment_reaches_whatsapp_intact(
        bridge: BridgeHarness) -> None:
    """A 20 MiB file spans many network chunks: all of them must be read (the bytes
    pass the attachment's sha256 check) and reach the simulator unchanged."""
    j = await opt_in(bridge, new_citizen(), "Les envío el expediente")
    try:
        data = os.urandom(20 * 1024 * 1024)
        ciphertext, keys = encrypt_attachment(data)
        async with aiohttp.ClientSession() as http, http.post(
                f"{bridge.synapse.synapse.url}/_matrix/media/v3/upload",
                data=io.BytesIO(ciphertext),
                params={"filename": "expediente.pdf"},
                headers={"Authorization": f"Bearer {j.desk.client.access_token}",
                         "Content-Type": "application/octet-stream"}) as up:
            assert up.status == 200, await up.text()
            mxc = (await up.json())["content_uri"]
        await j.desk.client.room_send(j.room_id, "m.room.message", {
            "msgtype": "m.file", "body": "expediente.pdf", "filename": "expediente.pdf",
            "info": {"mimetype": "application/pdf", "size": len(data)},
            "file": {**keys, "url": mxc}}, ignore_unverified_devices=True)
        doc = await j.sent_to_citizen(lambda s: s.get("type") == "document"
                                      and s["document"].get("filename") == "expediente.pdf")
        got = bridge.wa.media[doc["document"]["id"]].data
        assert len(got) == len(data)
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    finally:
        await j.desk.close()


@pytest.mark.parametrize("declared", [True, False])
async def test_download_reads_everything_up_to_the_cap(declared: bool) -> None:
    """A loopback media server streaming 3 MiB in small writes (with or without a
    Content-Length): all of it comes back, and a cap below its size is a 413."""
    data = os.urandom(3 * 1024 * 1024)

    async def media(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        if declared:
            resp.content_length = len(data)
        await resp.prepare(request)
        for i in range(0, len(data), 100_000):
            await resp.write(data[i:i + 100_000])
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/_matrix/client/v1/media/download/{server}/{media_id}", media)
    async with TestServer(app) as server, aiohttp.ClientSession() as http:
        api = MatrixAPI(http, str(server.make_url("/")), "as-token")
        got = await api.download(UserID("@bot:localhost"), "mxc://localhost/abc", len(data))
        assert got == data
        with pytest.raises(MatrixError) as too_big:
            await api.download(UserID("@bot:localhost"), "mxc://localhost/abc", len(data) - 1)
        assert too_big.value.status == 413
