"""A local simulator of the WhatsApp Cloud API, for tests and `civic-bridge demo`.

It answers the Graph endpoints the bridge uses (send, mark read, media upload /
lookup / download / delete) with the validation and error shapes of the real API:
every request body is checked against Meta's contract (`bridge.whatsapp.contract`) and
refused as Graph refuses it (400, codes 100 / 131008 / 131009). It records what it
accepted, lets a test inject Graph errors or hold a send's answer or a media upload,
and delivers webhooks signed the way Meta signs them (HMAC-SHA256 of the
raw body with the app secret). Statuses it builds echo the send's
`biz_opaque_callback_data`, as Meta does. `GET /_simulator/sent` (not part of Graph;
same bearer token) lists what it accepted, for a test that runs it in another process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import aiohttp
from aiohttp import web

from bridge.whatsapp import contract

OBJECT = "whatsapp_business_account"
DOWNLOAD_PATH = "/whatsapp_business/attachments/"
SENT_PATH = "/_simulator/sent"
_DEFAULT_MESSAGES = {
    100: "(#100) Invalid parameter",
    190: "Invalid OAuth access token - Cannot parse access token",
    130429: "(#130429) Rate limit hit",
    131026: "(#131026) Message undeliverable",
    131047: "(#131047) Re-engagement message",
    131056: "(#131056) (Business Account, Consumer Account) pair rate limit hit",
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class SimulatedUser:
    """A WhatsApp user; `wa_id` None models a username-only user without a number."""

    wa_id: str | None
    user_id: str
    name: str
    username: str | None = None


class RequestRecord(NamedTuple):
    method: str
    path: str
    status: int


@dataclass
class _Fault:
    code: int
    http_status: int
    count: int
    subcode: int | None
    message: str | None


@dataclass
class _Hold:
    release: asyncio.Event
    timeout: float
    predicate: Callable[[dict[str, Any]], bool]


@dataclass
class UploadHold:
    """A media upload held by `hold_next_upload`."""

    arrived: asyncio.Event  # set once the upload has been received
    release: asyncio.Event  # set it to store and answer the upload
    timeout: float


@dataclass
class _Media:
    data: bytes
    mime_type: str
    sha256: str
    filename: str | None = None
    report_size: bool = True  # False: no file_size, and the download is chunked


def _graph_error(http_status: int, code: int, message: str, subcode: int | None = None,
                 details: str | None = None) -> web.Response:
    error: dict[str, Any] = {"message": message, "type": "OAuthException", "code": code,
                             "fbtrace_id": "A" + secrets.token_urlsafe(16)}
    if subcode is not None:
        error["error_subcode"] = subcode
    if details:
        error["error_data"] = {"messaging_product": "whatsapp", "details": details}
    return web.json_response({"error": error}, status=http_status)


def _refuse(refusal: contract.GraphContractError) -> web.Response:
    """Graph's answer to a request that breaks its contract (bridge.whatsapp.contract)."""
    return _graph_error(400, refusal.code, refusal.message, details=refusal.details)


def new_wamid(counterpart: str | None) -> str:
    """A message id shaped like Meta's: base64 of a small structure that embeds the
    counterpart's number (or BSUID) and a random message id, e.g.
    ``wamid.HBgLMzQ2MDAxMTIyMzMVAgASGBQ...``. Realistic on purpose: whoever keeps a
    wamid keeps the number inside it, which the privacy tests check for."""
    who = (counterpart or "").lstrip("+").encode()[:255]
    message_id = secrets.token_hex(10).upper().encode()
    raw = (b"\x1c\x18" + bytes([len(who)]) + who + b"\x15\x02\x00\x12\x18"
           + bytes([len(message_id)]) + message_id + b"\x00")
    return "wamid." + base64.b64encode(raw).decode()


class CloudAPISimulator:
    """The fake Cloud API server plus controls for tests (faults, recordings, webhooks)."""

    version = "v23.0"

    def __init__(self, access_token: str, app_secret: str, phone_number_id: str,
                 display_phone_number: str, *, waba_id: str = "102290129340398") -> None:
        self.access_token = access_token
        self.app_secret = app_secret
        self.phone_number_id = phone_number_id
        self.display_phone_number = display_phone_number
        self.waba_id = waba_id
        self.sent: list[dict[str, Any]] = []
        self.sent_ids: list[str | None] = []  # wamid per `sent` entry (None for mark-read)
        self.last_sent_at = 0.0  # time.monotonic() of the last: a benchmark's finish line
        self.requests: list[RequestRecord] = []
        self.media: dict[str, _Media] = {}
        self.deleted_media: dict[str, _Media] = {}  # what DELETE /{media-id} removed
        self.callback_data: dict[str, str] = {}  # wamid -> biz_opaque_callback_data sent
        self.clock: Callable[[], float] = time.time  # timestamps of built payloads
        self._faults: deque[_Fault] = deque()
        self._holds: list[_Hold] = []
        self._upload_holds: deque[UploadHold] = deque()
        self._sent_event = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.app = web.Application(middlewares=[self._middleware],
                                   client_max_size=110 * 1024 * 1024)
        version = r"{version:v\d+\.\d+}"
        self.app.router.add_post(f"/{version}/{{phone_number_id}}/messages", self._messages)
        self.app.router.add_post(f"/{version}/{{phone_number_id}}/media", self._upload)
        self.app.router.add_get(f"/{version}/{{media_id}}", self._media_info)
        self.app.router.add_delete(f"/{version}/{{media_id}}", self._media_delete)
        self.app.router.add_get(DOWNLOAD_PATH, self._download)
        self.app.router.add_get(SENT_PATH, self._sent)

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on host:port (0 = any free port); returns the api_base incl. version."""
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        return f"http://{bound_host}:{bound_port}/{self.version}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- test controls ---------------------------------------------------------------

    def fail_next(self, code: int, http_status: int, count: int = 1,
                  subcode: int | None = None, message: str | None = None) -> None:
        """Answer the next `count` Graph API calls with this Graph error."""
        self._faults.append(_Fault(code, http_status, count, subcode, message))

    def hold_next_send(self, predicate: Callable[[dict[str, Any]], bool] = lambda _: True,
                       timeout: float = 30.0) -> asyncio.Event:
        """Accept and record the next message send matching `predicate`, but hold its
        HTTP answer until the returned event is set (or `timeout` seconds pass): a client
        that goes away meanwhile never learns the wamid, as in a crash mid-send."""
        release = asyncio.Event()
        self._holds.append(_Hold(release, timeout, predicate))
        return release

    def hold_next_upload(self, timeout: float = 30.0) -> UploadHold:
        """Hold the next media upload, received but neither stored nor answered, until
        released (or `timeout` seconds pass): a client can be stopped mid-upload."""
        hold = UploadHold(asyncio.Event(), asyncio.Event(), timeout)
        self._upload_holds.append(hold)
        return hold

    def add_media(self, data: bytes, mime_type: str, filename: str | None = None, *,
                  report_size: bool = True) -> str:
        """Store media as if a user had sent it; returns its media id.

        `report_size=False` leaves `file_size` out of the lookup and streams the
        download chunked, without Content-Length: only the bytes tell the size."""
        media_id = str(10**15 + secrets.randbelow(9 * 10**15))
        self.media[media_id] = _Media(data, mime_type, hashlib.sha256(data).hexdigest(), filename,
                                      report_size)
        return media_id

    def tamper_media(self, media_id: str) -> None:
        """Change the stored bytes but not the reported sha256 (an integrity failure)."""
        item = self.media[media_id]
        item.data = bytes([item.data[0] ^ 0xFF]) + item.data[1:] if item.data else b"\x00"

    async def wait_for_sent(self, predicate: Callable[[dict[str, Any]], bool] = lambda _: True,
                            timeout: float = 5.0,  # noqa: ASYNC109 - test convenience
                            ) -> dict[str, Any]:
        """The first accepted send body matching `predicate`, waiting for it if needed."""
        seen = 0
        async with asyncio.timeout(timeout):
            while True:
                for body in self.sent[seen:]:
                    if predicate(body):
                        return body
                seen = len(self.sent)
                self._sent_event.clear()
                await self._sent_event.wait()

    # -- HTTP ------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await self._dispatch(request, handler)
        except web.HTTPException as exc:
            self.requests.append(RequestRecord(request.method, request.path, exc.status))
            raise
        self.requests.append(RequestRecord(request.method, request.path, response.status))
        return response

    async def _dispatch(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._faults and request.path not in (DOWNLOAD_PATH, SENT_PATH):
            fault = self._faults[0]
            fault.count -= 1
            if fault.count <= 0:
                self._faults.popleft()
            return _graph_error(fault.http_status, fault.code,
                                fault.message or _DEFAULT_MESSAGES.get(fault.code, "Error"),
                                fault.subcode)
        auth = request.headers.get("Authorization", "")
        expected = f"Bearer {self.access_token}"
        if not hmac.compare_digest(auth.encode(), expected.encode()):
            return _graph_error(401, 190, _DEFAULT_MESSAGES[190])
        return await handler(request)

    def _check_phone(self, request: web.Request) -> web.Response | None:
        if request.match_info["phone_number_id"] != self.phone_number_id:
            return _graph_error(400, 100, "Unsupported post request. Object does not exist",
                                subcode=33)
        return None

    async def _messages(self, request: web.Request) -> web.Response:
        if (refused := self._check_phone(request)) is not None:
            return refused
        try:
            body = await request.json()
        except ValueError:
            body = None
        if (refusal := contract.validate_message(body)) is not None:
            return _refuse(refusal)
        if "status" in body:  # mark as read (and maybe show typing)
            self._record(body, None)
            return web.json_response({"success": True})
        to, bsuid, callback = (body.get("to"), body.get("recipient"),
                               body.get("biz_opaque_callback_data"))
        wamid = new_wamid(to if isinstance(to, str) else bsuid if isinstance(bsuid, str)
                          else None)
        if isinstance(callback, str):
            self.callback_data[wamid] = callback
        self._record(body, wamid)
        if (hold := next((h for h in self._holds if h.predicate(body)), None)) is not None:
            self._holds.remove(hold)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hold.release.wait(), hold.timeout)
        contact = ({"input": to, "wa_id": to.lstrip("+")} if isinstance(to, str)
                   else {"input": bsuid, "user_id": bsuid})
        return web.json_response({"messaging_product": "whatsapp", "contacts": [contact],
                                  "messages": [{"id": wamid}]})

    def _record(self, body: dict[str, Any], wamid: str | None) -> None:
        self.sent.append(body)
        self.sent_ids.append(wamid)
        self.last_sent_at = time.monotonic()
        self._sent_event.set()

    async def _sent(self, request: web.Request) -> web.Response:
        """The recorded sends in order: `{"sent": [{"wamid": ..., "body": ...}], "total": N,
        "last_at": T}` (wamid null for a mark-as-read call; T the `time.monotonic()` of the
        last, which is one clock for every process on the machine); `?after=K` leaves out
        the first K, so that a poller reads each send once."""
        try:
            after = max(0, int(request.query.get("after", "0")))
        except ValueError:
            return _refuse(contract.GraphContractError(100, "after: not an integer"))
        return web.json_response({"total": len(self.sent), "last_at": self.last_sent_at,
                                  "sent": [{"wamid": wamid, "body": body}
                                           for wamid, body in zip(self.sent_ids[after:],
                                                                  self.sent[after:],
                                                                  strict=True)]})

    async def _upload(self, request: web.Request) -> web.Response:
        if (refused := self._check_phone(request)) is not None:
            return refused
        form = await request.post()
        upload = form.get("file")
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        if (refusal := contract.validate_upload(
                fields, isinstance(upload, web.FileField))) is not None:
            return _refuse(refusal)
        assert isinstance(upload, web.FileField)
        if self._upload_holds:
            hold = self._upload_holds.popleft()
            hold.arrived.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hold.release.wait(), hold.timeout)
        media_id = self.add_media(upload.file.read(), str(form["type"]), upload.filename)
        return web.json_response({"id": media_id})

    async def _media_info(self, request: web.Request) -> web.Response:
        media_id = request.match_info["media_id"]
        item = self.media.get(media_id)
        if item is None:
            return _graph_error(400, 100, "Unsupported get request. Object does not exist",
                                subcode=33)
        # Points back at this server, the way Graph points at its lookaside CDN.
        url = request.url.origin().with_path(DOWNLOAD_PATH).with_query(
            {"mid": media_id, "hash": secrets.token_hex(8)})
        answer: dict[str, Any] = {"messaging_product": "whatsapp", "url": str(url),
                                  "mime_type": item.mime_type, "sha256": item.sha256,
                                  "file_size": len(item.data), "id": media_id}
        if not item.report_size:
            del answer["file_size"]
        return web.json_response(answer)

    async def _media_delete(self, request: web.Request) -> web.Response:
        media_id = request.match_info["media_id"]
        if (item := self.media.pop(media_id, None)) is None:
            return _graph_error(400, 100, "Unsupported delete request. Object does not exist",
                                subcode=33)
        self.deleted_media[media_id] = item
        return web.json_response({"success": True})

    async def _download(self, request: web.Request) -> web.StreamResponse:
        item = self.media.get(request.query.get("mid", ""))
        if item is None:
            return web.Response(status=404)
        if item.report_size:
            return web.Response(body=item.data, content_type=item.mime_type)
        response = web.StreamResponse(headers={"Content-Type": item.mime_type})
        response.enable_chunked_encoding()
        await response.prepare(request)
        with contextlib.suppress(ConnectionResetError):  # the client may stop reading
            for start in range(0, len(item.data), 64 * 1024):
                await response.write(item.data[start:start + 64 * 1024])
            await response.write_eof()
        return response

    # -- webhooks --------------------------------------------------------------------

    def sign(self, body: bytes) -> str:
        """The X-Hub-Signature-256 header value for `body`."""
        return "sha256=" + hmac.new(self.app_secret.encode(), body, hashlib.sha256).hexdigest()

    def envelope(self, value: dict[str, Any], field: str = "messages") -> dict[str, Any]:
        return {"object": OBJECT,
                "entry": [{"id": self.waba_id, "changes": [{"field": field, "value": value}]}]}

    async def deliver(self, webhook_url: str, value: dict[str, Any], *,
                      signing: Literal["valid", "forged", "missing"] = "valid",
                      field: str = "messages") -> int:
        """POST `value` to the bridge as Meta does; returns the HTTP status it answered."""
        # Serialised once, signed over exactly these bytes (ASCII-escaped like Meta's).
        body = json.dumps(self.envelope(value, field), separators=(",", ":")).encode()
        return await self.deliver_raw(webhook_url, body, signing=signing)

    async def deliver_raw(self, webhook_url: str, body: bytes, *,
                          signing: Literal["valid", "forged", "missing"] = "valid") -> int:
        headers = {"Content-Type": "application/json", "User-Agent": "facebookexternalua"}
        if signing == "valid":
            headers["X-Hub-Signature-256"] = self.sign(body)
        elif signing == "forged":
            forged = hmac.new(secrets.token_bytes(32), body, hashlib.sha256).hexdigest()
            headers["X-Hub-Signature-256"] = "sha256=" + forged
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                session.post(webhook_url, data=body, headers=headers) as resp:
            await resp.read()
            return resp.status

    async def verify_handshake(self, webhook_url: str, verify_token: str,
                               challenge: str | None = None, mode: str = "subscribe"
                               ) -> tuple[int, str]:
        """Meta's subscription check: GET with hub.* params; returns (status, body)."""
        params = {"hub.mode": mode, "hub.verify_token": verify_token,
                  "hub.challenge": challenge or str(secrets.randbelow(10**9))}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session, \
                session.get(webhook_url, params=params) as resp:
            return resp.status, await resp.text()

    # -- inbound payload builders (each returns a change `value`) ------------------------

    def _value(self, sender: SimulatedUser | None = None, **items: Any) -> dict[str, Any]:
        value: dict[str, Any] = {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": self.display_phone_number,
                         "phone_number_id": self.phone_number_id},
        }
        if sender is not None:
            profile = {"name": sender.name}
            if sender.username:
                profile["username"] = sender.username
            contact: dict[str, Any] = {"profile": profile}
            if sender.wa_id:
                contact["wa_id"] = sender.wa_id
            contact["user_id"] = sender.user_id
            value["contacts"] = [contact]
        return value | items

    def _message(self, sender: SimulatedUser, kind: str, payload: dict[str, Any] | None,
                 context_id: str | None = None, forwarded: bool = False, **extra: Any
                 ) -> dict[str, Any]:
        message: dict[str, Any] = {}
        if sender.wa_id:
            message["from"] = sender.wa_id
        message |= {"from_user_id": sender.user_id, "id": new_wamid(sender.wa_id or sender.user_id),
                    "timestamp": str(int(self.clock())), "type": kind}
        if context_id or forwarded:
            context: dict[str, Any] = {}
            if context_id:
                context |= {"from": self.display_phone_number.lstrip("+"), "id": context_id}
            if forwarded:
                context["forwarded"] = True
            message["context"] = context
        if payload is not None:
            message[kind] = payload
        return self._value(sender, messages=[message | extra])

    def text_message(self, sender: SimulatedUser, body: str, context_id: str | None = None,
                     *, forwarded: bool = False) -> dict[str, Any]:
        return self._message(sender, "text", {"body": body}, context_id, forwarded)

    def media_message(self, sender: SimulatedUser, kind: str, media_id: str, *,
                      mime_type: str | None = None, caption: str | None = None,
                      filename: str | None = None, voice: bool = False,
                      context_id: str | None = None) -> dict[str, Any]:
        """A media message; type and sha256 come from stored media when `media_id` is known."""
        stored = self.media.get(media_id)
        payload: dict[str, Any] = {
            "id": media_id,
            "mime_type": mime_type or (stored.mime_type if stored else "application/octet-stream"),
            "sha256": stored.sha256 if stored else hashlib.sha256(media_id.encode()).hexdigest(),
        }
        if caption is not None:
            payload["caption"] = caption
        if filename is not None:
            payload["filename"] = filename
        if kind == "audio":
            payload["voice"] = voice
        return self._message(sender, kind, payload, context_id)

    def location_message(self, sender: SimulatedUser, latitude: float, longitude: float,
                         name: str | None = None, address: str | None = None
                         ) -> dict[str, Any]:
        payload: dict[str, Any] = {"latitude": latitude, "longitude": longitude}
        payload |= {k: v for k, v in (("name", name), ("address", address)) if v is not None}
        return self._message(sender, "location", payload)

    def reaction_message(self, sender: SimulatedUser, message_id: str, emoji: str
                         ) -> dict[str, Any]:
        """A reaction; an empty `emoji` is a removed reaction."""
        return self._message(sender, "reaction", {"message_id": message_id, "emoji": emoji})

    def button_reply(self, sender: SimulatedUser, button_id: str, title: str,
                     context_id: str | None = None, *,
                     kind: Literal["button_reply", "list_reply", "template"] = "button_reply"
                     ) -> dict[str, Any]:
        """A tap on a reply button, a list row, or a template quick-reply button."""
        if kind == "template":
            return self._message(sender, "button", {"payload": button_id, "text": title},
                                 context_id)
        return self._message(sender, "interactive",
                             {"type": kind, kind: {"id": button_id, "title": title}}, context_id)

    def edit_message(self, sender: SimulatedUser, original_id: str, new_body: str
                     ) -> dict[str, Any]:
        inner = {"type": "text", "text": {"body": new_body}}
        return self._message(sender, "edit", {"original_message_id": original_id,
                                              "message": inner})

    def revoke_message(self, sender: SimulatedUser, original_id: str) -> dict[str, Any]:
        return self._message(sender, "revoke", {"original_message_id": original_id})

    def system_message(self, sender: SimulatedUser, new_wa_id: str | None = None,
                       new_user_id: str | None = None,
                       change: str = "user_changed_number") -> dict[str, Any]:
        payload: dict[str, Any] = {"type": change, "body": f"{sender.name} changed their number"}
        if new_wa_id:
            payload["wa_id"] = new_wa_id
        if new_user_id:
            payload["user_id"] = new_user_id
        return self._message(sender, "system", payload)

    def unsupported_message(self, sender: SimulatedUser, kind: str = "unsupported"
                            ) -> dict[str, Any]:
        """An unsupported message, or (with another `kind`) a type from the future."""
        errors = [{"code": 131051, "title": "Message type unknown",
                   "message": "Message type unknown",
                   "error_data": {"details": "Message type is currently not supported."}}]
        return self._message(sender, kind, None if kind == "unsupported" else {}, errors=errors)

    def status_update(self, wamid: str, status: str, recipient: SimulatedUser,
                      errors: list[tuple[int, str]] | None = None,
                      callback_data: Any = None) -> dict[str, Any]:
        """A status of message `wamid`. It echoes the `biz_opaque_callback_data` that
        message was sent with, unless `callback_data` says what to put there instead
        (any JSON value: tests send junk too)."""
        item: dict[str, Any] = {"id": wamid, "status": status,
                                "timestamp": str(int(self.clock()))}
        if callback_data is None:
            callback_data = self.callback_data.get(wamid)
        if callback_data is not None:
            item["biz_opaque_callback_data"] = callback_data
        if recipient.wa_id:
            item["recipient_id"] = recipient.wa_id
        item["recipient_user_id"] = recipient.user_id
        if status != "failed":
            item["conversation"] = {"id": secrets.token_hex(16),
                                    "origin": {"type": "service"}}
            item["pricing"] = {"billable": False, "pricing_model": "PMP",
                               "category": "service"}
        if errors:
            item["errors"] = [{"code": code, "title": title, "message": title,
                               "error_data": {"details": title}} for code, title in errors]
        return self._value(None, statuses=[item])


async def serve(port: int = 0) -> None:
    """Run a simulator on its own, in this process, until cancelled: what a benchmark
    uses to keep Graph's work off the bridge's cores, as Meta's servers are. Its
    credentials come from the environment (`SIMULATOR_ACCESS_TOKEN`,
    `SIMULATOR_APP_SECRET`, `SIMULATOR_PHONE_NUMBER_ID`), never the command line (`ps`
    shows that); prints its api_base on one line once it listens."""
    import os
    sim = CloudAPISimulator(access_token=os.environ["SIMULATOR_ACCESS_TOKEN"],
                            app_secret=os.environ["SIMULATOR_APP_SECRET"],
                            phone_number_id=os.environ["SIMULATOR_PHONE_NUMBER_ID"],
                            display_phone_number="+34 900 000 000")
    print(await sim.start(port=port), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await sim.stop()


if __name__ == "__main__":
    import sys
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
