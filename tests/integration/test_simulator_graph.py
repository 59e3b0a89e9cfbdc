"""GraphClient against the Cloud API simulator over real loopback HTTP, and
simulator-built webhooks through the signature check and parse_webhook."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bridge.devtools.simulator import SENT_PATH, CloudAPISimulator, SimulatedUser
from bridge.whatsapp.graph import GraphClient, GraphError, MediaIntegrityError, Recipient
from bridge.whatsapp.webhook_parse import parse_webhook

TOKEN = "EAAG-test-access-token-0123456789abcdef"
SECRET = "app-secret-0123456789abcdef"
PHONE_ID = "106540352242922"
NUMBER = "34600111222"
BSUID = "ES.13491208655302741918"
ANA = SimulatedUser(wa_id=NUMBER, user_id=BSUID, name="Ana")
USERNAME_ONLY = SimulatedUser(wa_id=None, user_id="ES.99887766554433", name="Bea",
                              username="bea.m")


@asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def sim() -> AsyncIterator[tuple[CloudAPISimulator, str]]:
    simulator = CloudAPISimulator(TOKEN, SECRET, PHONE_ID, "+34 910 000 000")
    api_base = await simulator.start()
    yield simulator, api_base
    await simulator.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def simulator(sim: tuple[CloudAPISimulator, str]) -> CloudAPISimulator:
    return sim[0]


@pytest.fixture
def graph(sim: tuple[CloudAPISimulator, str], session: aiohttp.ClientSession) -> GraphClient:
    return GraphClient(session, api_base=sim[1], phone_number_id=PHONE_ID, access_token=TOKEN)


TO = Recipient(wa_id=NUMBER, user_id=BSUID)


# -- sending ---------------------------------------------------------------------------


async def test_send_text_recorded(graph: GraphClient, simulator: CloudAPISimulator) -> None:
    wamid = await graph.send_text(TO, "Hola, le atendemos", reply_to="wamid.IN")
    assert wamid.startswith("wamid.") and simulator.sent_ids == [wamid]
    assert simulator.sent == [{
        "messaging_product": "whatsapp", "recipient_type": "individual", "to": NUMBER,
        "type": "text", "text": {"body": "Hola, le atendemos"},
        "context": {"message_id": "wamid.IN"}}]
    assert simulator.requests[-1] == ("POST", f"/v23.0/{PHONE_ID}/messages", 200)


async def test_bsuid_only_recipient_uses_recipient_field(
        graph: GraphClient, simulator: CloudAPISimulator) -> None:
    await graph.send_text(Recipient(user_id=BSUID), "hola")
    body = simulator.sent[0]
    assert body["recipient"] == BSUID and "to" not in body
    assert repr(Recipient(user_id=BSUID)) == "Recipient(<redacted>)"
    with pytest.raises(ValueError, match="wa_id or a user_id"):
        Recipient()


async def test_send_media(graph: GraphClient, simulator: CloudAPISimulator) -> None:
    await graph.send_media(TO, "image", "111", caption="plano")
    await graph.send_media(TO, "document", "222", caption="resolución", filename="res.pdf")
    await graph.send_media(TO, "audio", "333")
    assert simulator.sent[0]["image"] == {"id": "111", "caption": "plano"}
    assert simulator.sent[1]["document"] == {"id": "222", "caption": "resolución",
                                             "filename": "res.pdf"}
    assert simulator.sent[2]["type"] == "audio" and simulator.sent[2]["audio"] == {"id": "333"}
    with pytest.raises(ValueError):
        await graph.send_media(TO, "sticker", "4", caption="no")
    with pytest.raises(ValueError):
        await graph.send_media(TO, "gif", "4")


async def test_send_reaction_template_buttons(graph: GraphClient,
                                              simulator: CloudAPISimulator) -> None:
    await graph.send_reaction(TO, "wamid.IN", "👍")
    components = [{"type": "body", "parameters": [{"type": "text", "text": "Ayuntamiento"}]}]
    await graph.send_template(TO, "aviso_puesta_disposicion", "es", components)
    await graph.send_buttons(TO, "¿Acepta?", [("consent_yes", "ACEPTO"), ("consent_no", "BAJA")])
    reaction, template, buttons = simulator.sent
    assert reaction["reaction"] == {"message_id": "wamid.IN", "emoji": "👍"}
    assert template["template"] == {"name": "aviso_puesta_disposicion",
                                    "language": {"code": "es", "policy": "deterministic"},
                                    "components": components}
    assert buttons["interactive"] == {
        "type": "button", "body": {"text": "¿Acepta?"},
        "action": {"buttons": [{"type": "reply", "reply": {"id": "consent_yes", "title": "ACEPTO"}},
                               {"type": "reply", "reply": {"id": "consent_no", "title": "BAJA"}}]}}


@pytest.mark.parametrize("buttons", [[], [("a", "1"), ("b", "2"), ("c", "3"), ("d", "4")],
                                     [("a", "x" * 21)], [("a", "1"), ("a", "2")]])
async def test_send_buttons_rejects_invalid_locally(
        graph: GraphClient, simulator: CloudAPISimulator, buttons: list[tuple[str, str]]) -> None:
    with pytest.raises(ValueError):
        await graph.send_buttons(TO, "body", buttons)
    assert simulator.requests == []


async def test_mark_read(graph: GraphClient, simulator: CloudAPISimulator) -> None:
    await graph.mark_read("wamid.IN", typing=True)
    assert simulator.sent == [{"messaging_product": "whatsapp", "status": "read",
                               "message_id": "wamid.IN", "typing_indicator": {"type": "text"}}]


async def test_wait_for_sent(graph: GraphClient, simulator: CloudAPISimulator) -> None:
    waiter = asyncio.create_task(simulator.wait_for_sent(lambda b: b.get("type") == "reaction"))
    await graph.send_text(TO, "uno")
    await asyncio.sleep(0)
    assert not waiter.done()
    await graph.send_reaction(TO, "wamid.X", "❤️")
    assert (await waiter)["reaction"]["emoji"] == "❤️"
    with pytest.raises(TimeoutError):
        await simulator.wait_for_sent(lambda b: b.get("type") == "template", timeout=0.05)


async def _post(sim: tuple[CloudAPISimulator, str], session: aiohttp.ClientSession,
                path: str, *, content_type: str | None = None, **kwargs: Any
                ) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    if content_type:
        headers["Content-Type"] = content_type
    async with session.post(f"{sim[1]}/{PHONE_ID}/{path}", headers=headers, **kwargs) as resp:
        return resp.status, await resp.json()


def _assert_graph_refusal(status: int, answer: Any, code: int) -> dict[str, Any]:
    """Graph's own error shape: HTTP 400, an OAuthException with code, message, details
    and a trace id, and nothing else."""
    assert status == 400
    assert set(answer) == {"error"}
    error = answer["error"]
    assert set(error) == {"message", "type", "code", "error_data", "fbtrace_id"}
    assert (error["type"], error["code"]) == ("OAuthException", code)
    assert error["message"].startswith(f"(#{code}) ")
    assert error["error_data"]["messaging_product"] == "whatsapp"
    assert isinstance(error["fbtrace_id"], str) and error["fbtrace_id"]
    details: dict[str, Any] = error["error_data"]
    return details


@pytest.mark.parametrize(("payload", "code", "details"), [
    ({"messaging_product": "whatsapp", "to": NUMBER, "type": "interactive", "interactive": {
        "type": "button", "body": {"text": "x"}, "action": {"buttons": [
            {"type": "reply", "reply": {"id": str(i), "title": "t"}} for i in range(4)]}}},
     131009, "buttons must have at most 3"),
    ({"messaging_product": "whatsapp", "to": NUMBER, "type": "text", "text": {"body": ""}},
     131009, "text.body"),
    ({"messaging_product": "sms", "to": NUMBER, "text": {"body": "x"}}, 131009,
     "messaging_product"),
    ({"messaging_product": "whatsapp", "type": "text", "text": {"body": "x"}}, 131008,
     "to or recipient"),
    ({"messaging_product": "whatsapp", "to": NUMBER, "type": "image",
      "image": {"id": "1", "link": "https://x"}}, 100, "only one of"),
    ({"messaging_product": "whatsapp", "to": NUMBER, "type": "text",
      "text": {"body": "x", "caption": "y"}}, 100, "caption is not a parameter"),
    ({"messaging_product": "whatsapp", "status": "delivered", "message_id": "w"}, 131009,
     "status"),
    ({"messaging_product": "whatsapp", "status": "read"}, 131008, "message_id is required"),
    ({"messaging_product": "whatsapp", "to": NUMBER, "text": {"body": "x"},
      "biz_opaque_callback_data": "x" * 513}, 131009, "biz_opaque_callback_data"),
    ({"messaging_product": "whatsapp", "to": NUMBER, "text": {"body": "x"},
      "biz_opaque_callback_data": {"id": 1}}, 131009, "biz_opaque_callback_data"),
    (["not", "an", "object"], 100, "JSON object"),
])
async def test_simulator_refuses_malformed_sends_as_graph_does(
        sim: tuple[CloudAPISimulator, str], session: aiohttp.ClientSession,
        payload: Any, code: int, details: str) -> None:
    status, answer = await _post(sim, session, "messages", json=payload)
    assert details in _assert_graph_refusal(status, answer, code)["details"]
    assert sim[0].sent == []
    assert sim[0].requests[-1] == ("POST", f"/v23.0/{PHONE_ID}/messages", 400)


async def test_simulator_refuses_a_body_that_is_not_json(
        sim: tuple[CloudAPISimulator, str], session: aiohttp.ClientSession) -> None:
    status, answer = await _post(sim, session, "messages", data=b"{messaging_product",
                                 content_type="application/json")
    _assert_graph_refusal(status, answer, 100)


async def test_refused_send_becomes_a_permanent_graph_error(
        graph: GraphClient, simulator: CloudAPISimulator) -> None:
    """A body Meta would refuse fails the bridge's send for good (no retry), with Graph's
    code, and the refusal does not echo the text."""
    with pytest.raises(GraphError) as info:
        await graph.send_text(TO, "Mi expediente 2024/00017 " * 200)  # over 4,096
    assert (info.value.status, info.value.code, info.value.retryable) == (400, 131009, False)
    assert "2024/00017" not in str(info.value)
    assert simulator.sent == []


async def test_simulator_checks_the_upload_form(
        sim: tuple[CloudAPISimulator, str], session: aiohttp.ClientSession) -> None:
    form = aiohttp.FormData()
    form.add_field("messaging_product", "whatsapp")
    form.add_field("type", "application/pdf")
    status, answer = await _post(sim, session, "media", data=form)  # no file part
    assert "file is required" in _assert_graph_refusal(status, answer, 131008)["details"]
    assert sim[0].media == {}


async def test_callback_data_sent_and_echoed_in_statuses(
        graph: GraphClient, simulator: CloudAPISimulator,
        receiver: tuple[Receiver, str]) -> None:
    """`biz_opaque_callback_data` goes on the send and comes back on every status of
    that message (and only that message)."""
    rec, url = receiver
    wamid = await graph.send_text(TO, "hola", callback_data="cb1.42")
    other = await graph.send_reaction(TO, "wamid.IN", "👍")
    assert simulator.sent[0]["biz_opaque_callback_data"] == "cb1.42"
    assert "biz_opaque_callback_data" not in simulator.sent[1]
    for status in ("sent", "delivered", "read"):
        await simulator.deliver(url, simulator.status_update(wamid, status, ANA))
        (s,) = parse_webhook(json.loads(rec.raw[-1]), PHONE_ID).statuses
        assert (s.wamid, s.status, s.callback_data) == (wamid, status, "cb1.42")
    await simulator.deliver(url, simulator.status_update(other, "read", ANA))
    assert parse_webhook(json.loads(rec.raw[-1]), PHONE_ID).statuses[0].callback_data is None
    assert await graph.send_template(TO, "aviso", "es", callback_data="x" * 512)
    with pytest.raises(ValueError, match="callback data"):
        await graph.send_text(TO, "hola", callback_data="x" * 513)


async def test_held_send_is_recorded_before_it_is_answered(
        graph: GraphClient, simulator: CloudAPISimulator) -> None:
    release = simulator.hold_next_send(lambda body: body.get("type") == "text")
    send = asyncio.create_task(graph.send_text(TO, "retenido", callback_data="cb1.7"))
    await simulator.wait_for_sent(lambda body: body.get("type") == "text")
    await asyncio.sleep(0.2)
    assert not send.done()
    release.set()
    assert await send == simulator.sent_ids[-1]
    assert simulator.callback_data[simulator.sent_ids[-1]] == "cb1.7"


async def test_held_upload_is_stored_only_once_released(
        graph: GraphClient, simulator: CloudAPISimulator) -> None:
    hold = simulator.hold_next_upload()
    upload = asyncio.create_task(graph.upload_media(b"%PDF-1.4", "application/pdf", "a.pdf"))
    await asyncio.wait_for(hold.arrived.wait(), 5)
    await asyncio.sleep(0.2)
    assert not upload.done() and not simulator.media
    hold.release.set()
    media_id = await upload
    assert simulator.media[media_id].data == b"%PDF-1.4"
    # Only the next upload was held.
    assert await graph.upload_media(b"x", "application/pdf", "b.pdf") in simulator.media


async def test_wrong_phone_number_id(sim: tuple[CloudAPISimulator, str],
                                     session: aiohttp.ClientSession) -> None:
    graph = GraphClient(session, api_base=sim[1], phone_number_id="999", access_token=TOKEN)
    with pytest.raises(GraphError) as info:
        await graph.send_text(TO, "hola")
    assert (info.value.code, info.value.subcode, info.value.retryable) == (100, 33, False)


# -- media -----------------------------------------------------------------------------


async def test_upload_info_download_delete(graph: GraphClient,
                                           simulator: CloudAPISimulator) -> None:
    data = bytes(range(256)) * 1000
    media_id = await graph.upload_media(data, "application/pdf", "resolucion.pdf")
    info = await graph.media_info(media_id)
    assert info.mime_type == "application/pdf" and info.file_size == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert info.url.startswith("http://127.0.0.1:")
    assert await graph.download_media(media_id) == (data, "application/pdf")
    assert simulator.media[media_id].filename == "resolucion.pdf"
    await graph.delete_media(media_id)
    with pytest.raises(GraphError) as exc:
        await graph.media_info(media_id)
    assert exc.value.code == 100 and not exc.value.retryable


async def test_download_preloaded_media(graph: GraphClient, simulator: CloudAPISimulator) -> None:
    media_id = simulator.add_media(b"\xff\xd8jpeg", "image/jpeg")
    assert await graph.download_media(media_id) == (b"\xff\xd8jpeg", "image/jpeg")


async def test_download_needs_token(sim: tuple[CloudAPISimulator, str],
                                    graph: GraphClient, session: aiohttp.ClientSession) -> None:
    media_id = sim[0].add_media(b"secret scan", "image/png")
    info = await graph.media_info(media_id)
    async with session.get(info.url) as resp:
        assert resp.status == 401


async def test_tampered_media_fails_integrity(graph: GraphClient,
                                              simulator: CloudAPISimulator) -> None:
    media_id = simulator.add_media(b"original bytes", "image/jpeg")
    simulator.tamper_media(media_id)
    with pytest.raises(MediaIntegrityError) as info:
        await graph.download_media(media_id)
    assert not info.value.retryable and info.value.permanent_title


async def test_download_size_limit(graph: GraphClient, simulator: CloudAPISimulator) -> None:
    media_id = simulator.add_media(b"x" * 2048, "image/jpeg")
    with pytest.raises(GraphError, match="larger than allowed"):
        await graph.download_media(media_id, max_bytes=1024)


# -- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "http_status", "subcode", "retryable"), [
    (190, 401, 463, False),
    (100, 400, None, False),
    (130429, 429, None, True),
    (131056, 400, None, True),
    (131047, 400, None, False),
    (131026, 400, None, False),
    (132001, 404, None, False),
    (131000, 500, None, True),
    (2, 503, None, True),
])
async def test_injected_errors_map_to_graph_error(
        graph: GraphClient, simulator: CloudAPISimulator,
        code: int, http_status: int, subcode: int | None, retryable: bool) -> None:
    simulator.fail_next(code, http_status, subcode=subcode)
    with pytest.raises(GraphError) as info:
        await graph.send_text(TO, "hola")
    err = info.value
    assert (err.status, err.code, err.subcode, err.retryable) == (
        http_status, code, subcode, retryable)
    assert (err.permanent_title is None) == retryable
    assert err.fbtrace_id
    assert simulator.sent == []
    # The fault is used up: the next call goes through.
    assert (await graph.send_text(TO, "hola")).startswith("wamid.")


async def test_fault_count(graph: GraphClient, simulator: CloudAPISimulator) -> None:
    simulator.fail_next(130429, 429, count=2)
    for _ in range(2):
        with pytest.raises(GraphError):
            await graph.mark_read("wamid.IN")
    await graph.mark_read("wamid.IN")
    assert [r.status for r in simulator.requests] == [429, 429, 200]


async def test_24h_window_error_title(graph: GraphClient, simulator: CloudAPISimulator) -> None:
    simulator.fail_next(131047, 400)
    with pytest.raises(GraphError) as info:
        await graph.send_text(TO, "fuera de plazo")
    assert info.value.permanent_title is not None and "template" in info.value.permanent_title


async def test_bad_token_is_permanent_190(sim: tuple[CloudAPISimulator, str],
                                          session: aiohttp.ClientSession) -> None:
    graph = GraphClient(session, api_base=sim[1], phone_number_id=PHONE_ID,
                        access_token="EAAG-wrong-token-000000000000")
    with pytest.raises(GraphError) as info:
        await graph.send_text(TO, "hola")
    assert (info.value.status, info.value.code, info.value.retryable) == (401, 190, False)
    assert "wrong-token" not in str(info.value)
    assert sim[0].sent == [] and sim[0].requests[-1].status == 401


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_network_error_is_retryable(session: aiohttp.ClientSession) -> None:
    graph = GraphClient(session, api_base=f"http://127.0.0.1:{_closed_port()}/v23.0",
                        phone_number_id=PHONE_ID, access_token=TOKEN)
    with pytest.raises(GraphError) as info:
        await graph.send_text(TO, "hola")
    assert (info.value.status, info.value.code, info.value.retryable) == (None, None, True)
    assert "network error" in info.value.message


async def test_non_json_gateway_error_is_retryable(session: aiohttp.ClientSession) -> None:
    app = web.Application()

    async def bad_gateway(_: web.Request) -> web.Response:
        return web.Response(status=502, text="<html>Bad Gateway</html>",
                            content_type="text/html")

    app.router.add_post("/v23.0/{phone}/messages", bad_gateway)
    async with serve(app) as url:
        graph = GraphClient(session, api_base=f"{url}/v23.0", phone_number_id=PHONE_ID,
                            access_token=TOKEN)
        with pytest.raises(GraphError) as info:
            await graph.send_text(TO, "hola")
    assert (info.value.status, info.value.code, info.value.retryable) == (502, None, True)


async def test_timeout_is_retryable(session: aiohttp.ClientSession) -> None:
    app = web.Application()

    async def hang(_: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response({})

    app.router.add_post("/v23.0/{phone}/messages", hang)
    async with serve(app) as url:
        graph = GraphClient(session, api_base=f"{url}/v23.0", phone_number_id=PHONE_ID,
                            access_token=TOKEN, timeout=aiohttp.ClientTimeout(total=0.2))
        with pytest.raises(GraphError) as info:
            await graph.send_text(TO, "hola")
    assert (info.value.status, info.value.code, info.value.retryable) == (None, None, True)


async def test_error_messages_leak_no_recipient_token_or_body(
        graph: GraphClient, simulator: CloudAPISimulator) -> None:
    body = "Mi expediente es el 2024/00017 y vivo en Calle Mayor 3"
    # A hostile or careless upstream echoing everything back.
    simulator.fail_next(100, 400, message=f"bad to={NUMBER} +34 600 111 222 {BSUID} "
                                          f"token={TOKEN} text={body}")
    with pytest.raises(GraphError) as info:
        await graph.send_text(TO, body)
    shown = " ".join([str(info.value), repr(info.value), info.value.message])
    for secret in (NUMBER, "600 111 222", BSUID, TOKEN, body):
        assert secret not in shown
    assert info.value.code == 100


async def test_network_error_message_has_no_secrets(session: aiohttp.ClientSession) -> None:
    graph = GraphClient(session, api_base=f"http://127.0.0.1:{_closed_port()}/v23.0",
                        phone_number_id=PHONE_ID, access_token=TOKEN)
    with pytest.raises(GraphError) as info:
        await graph.send_text(TO, "cuerpo privado")
    for secret in (NUMBER, TOKEN, "cuerpo privado"):
        assert secret not in str(info.value)


# -- webhooks --------------------------------------------------------------------------


@dataclass
class Receiver:
    """A stand-in for the bridge's webhook route: check the signature, then parse."""

    verify_token: str = "verify-token-0123456789"
    raw: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/whatsapp/webhook", self.handshake)
        app.router.add_post("/whatsapp/webhook", self.receive)
        return app

    async def handshake(self, request: web.Request) -> web.Response:
        q = request.query
        if q.get("hub.mode") == "subscribe" and q.get("hub.verify_token") == self.verify_token:
            return web.Response(text=q.get("hub.challenge", ""))
        return web.Response(status=403)

    async def receive(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.raw.append(raw)
        self.headers.append(dict(request.headers))
        given = request.headers.get("X-Hub-Signature-256", "")
        expected = "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return web.Response(status=401)
        return web.Response(text="ok")


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    rec = Receiver()
    async with serve(rec.app()) as url:
        yield rec, f"{url}/whatsapp/webhook"


async def test_deliver_signs_raw_bytes(simulator: CloudAPISimulator,
                                       receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    value = simulator.text_message(ANA, "¿Cuándo abre la oficina? ñ €")
    assert await simulator.deliver(url, value) == 200
    raw = rec.raw[-1]
    mac = hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
    assert rec.headers[-1]["X-Hub-Signature-256"] == f"sha256={mac}"
    assert json.loads(raw) == simulator.envelope(value)
    assert raw.isascii()  # non-ASCII is escaped, as Meta sends it
    assert await simulator.deliver(url, value, signing="forged") == 401
    assert await simulator.deliver(url, value, signing="missing") == 401
    assert "X-Hub-Signature-256" not in rec.headers[-1]


async def test_verify_handshake(simulator: CloudAPISimulator,
                                receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    assert await simulator.verify_handshake(url, rec.verify_token, "1158201444") == (
        200, "1158201444")
    status, _ = await simulator.verify_handshake(url, "wrong-token")
    assert status == 403
    status, _ = await simulator.verify_handshake(url, rec.verify_token, mode="unsubscribe")
    assert status == 403


def _builders(sim: CloudAPISimulator) -> list[tuple[str, dict[str, Any], Callable[[Any], bool]]]:
    media_id = sim.add_media(b"%PDF-1.7", "application/pdf")
    return [
        ("text", sim.text_message(ANA, "hola", context_id="wamid.OUT"),
         lambda m: m.text == "hola" and m.context_id == "wamid.OUT"),
        ("text", sim.text_message(USERNAME_ONLY, "sin número", forwarded=True),
         lambda m: m.sender.wa_id is None and m.sender.key == USERNAME_ONLY.user_id
         and m.sender.username == "bea.m" and m.forwarded),
        ("document", sim.media_message(ANA, "document", media_id, caption="c",
                                       filename="a.pdf"),
         lambda m: m.media.id == media_id and m.media.filename == "a.pdf"
         and m.media.sha256 == hashlib.sha256(b"%PDF-1.7").hexdigest() and m.caption == "c"),
        ("image", sim.media_message(ANA, "image", "555", mime_type="image/jpeg"),
         lambda m: m.media.mime_type == "image/jpeg"),
        ("video", sim.media_message(ANA, "video", "556", mime_type="video/mp4"),
         lambda m: m.media.id == "556"),
        ("sticker", sim.media_message(ANA, "sticker", "557", mime_type="image/webp"),
         lambda m: m.media.id == "557"),
        ("audio", sim.media_message(ANA, "audio", "558", mime_type="audio/ogg", voice=True),
         lambda m: m.media.voice),
        ("location", sim.location_message(ANA, 40.4, -3.7, name="Sol"),
         lambda m: m.location.latitude == 40.4 and m.location.name == "Sol"),
        ("reaction", sim.reaction_message(ANA, "wamid.OUT", "👍"),
         lambda m: m.reaction.emoji == "👍" and not m.reaction.removed),
        ("reaction", sim.reaction_message(ANA, "wamid.OUT", ""), lambda m: m.reaction.removed),
        ("button", sim.button_reply(ANA, "consent_yes", "ACEPTO", "wamid.NOTICE"),
         lambda m: m.button_id == "consent_yes" and m.raw_type == "interactive"),
        ("button", sim.button_reply(ANA, "row", "Cita", kind="list_reply"),
         lambda m: m.button_id == "row"),
        ("button", sim.button_reply(ANA, "STOP", "Baja", kind="template"),
         lambda m: m.button_id == "STOP" and m.raw_type == "button"),
        ("edit", sim.edit_message(ANA, "wamid.ORIG", "corregido"),
         lambda m: m.edit.original_message_id == "wamid.ORIG" and m.edit.text == "corregido"),
        ("revoke", sim.revoke_message(ANA, "wamid.ORIG"), lambda m: m.revoke_of == "wamid.ORIG"),
        ("system", sim.system_message(ANA, new_wa_id="34600999888", new_user_id="ES.NEW"),
         lambda m: m.system.new_wa_id == "34600999888" and m.system.new_user_id == "ES.NEW"),
        ("unsupported", sim.unsupported_message(ANA),
         lambda m: m.errors[0].code == 131051),
        ("unsupported", sim.unsupported_message(ANA, "hologram"),
         lambda m: m.raw_type == "hologram"),
    ]


async def test_builders_round_trip_through_parser(simulator: CloudAPISimulator,
                                                  receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    for kind, value, check in _builders(simulator):
        assert await simulator.deliver(url, value) == 200
        batch = parse_webhook(json.loads(rec.raw[-1]), PHONE_ID)
        assert batch.ignored == (), kind
        (message,) = batch.messages
        assert message.kind == kind, (kind, message.raw_type)
        assert message.wamid == value["messages"][0]["id"]
        assert message.sender.profile_name in ("Ana", "Bea")
        assert check(message), kind


async def test_status_builders_round_trip(simulator: CloudAPISimulator,
                                          receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    for status in ("sent", "delivered", "read"):
        await simulator.deliver(url, simulator.status_update("wamid.OUT", status, ANA))
        (s,) = parse_webhook(json.loads(rec.raw[-1]), PHONE_ID).statuses
        assert (s.wamid, s.status, s.recipient_key, s.errors) == ("wamid.OUT", status, BSUID, ())
    value = simulator.status_update("wamid.OUT", "failed", USERNAME_ONLY,
                                    errors=[(131047, "Re-engagement message")])
    await simulator.deliver(url, value)
    (s,) = parse_webhook(json.loads(rec.raw[-1]), PHONE_ID).statuses
    assert s.status == "failed" and s.recipient_wa_id is None
    assert [(e.code, e.title) for e in s.errors] == [(131047, "Re-engagement message")]


async def test_other_phone_number_and_field_ignored(simulator: CloudAPISimulator,
                                                    receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    await simulator.deliver(url, simulator.text_message(ANA, "hola"), field="account_update")
    assert parse_webhook(json.loads(rec.raw[-1]), PHONE_ID).messages == ()
    await simulator.deliver(url, simulator.text_message(ANA, "hola"))
    assert parse_webhook(json.loads(rec.raw[-1]), "other-number").messages == ()


async def test_sent_listing_reads_from_where_a_poller_left_off(
        graph: GraphClient, sim: tuple[CloudAPISimulator, str],
        session: aiohttp.ClientSession) -> None:
    """`GET /_simulator/sent?after=K` (for a benchmark running the simulator in its own
    process): the sends after the first K, how many there are in all, and when the last
    was accepted (`time.monotonic()`, one clock for every process on the machine)."""
    for n in range(3):
        before = time.monotonic()
        await graph.send_text(TO, f"m{n}")
    after = time.monotonic()
    url = sim[1].rsplit("/", 1)[0] + SENT_PATH
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with session.get(url, params={"after": "1"}, headers=auth) as resp:
        data = await resp.json()
    assert data["total"] == 3
    assert before <= data["last_at"] <= after
    assert [e["body"]["text"]["body"] for e in data["sent"]] == ["m1", "m2"]
    assert all(e["wamid"].startswith("wamid.") for e in data["sent"])
    async with session.get(url, params={"after": "x"}, headers=auth) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == 100
