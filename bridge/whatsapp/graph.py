"""The bridge's client for the WhatsApp Cloud API (Meta Graph API).

Thin I/O adapter: it builds request bodies exactly as the wire contract says, and turns
every failure into a `GraphError` that tells the outbox whether to retry. Exception
messages and logs never contain the recipient, the access token or a message body:
Graph's own error text is scrubbed of the values this call knew and of anything that
looks like a phone number or BSUID before it is kept.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import json as jsonlib
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiohttp

from bridge.config import WhatsAppConfig
from bridge.whatsapp.limits import (
    MAX_BUTTON_TITLE,
    MAX_BUTTONS,
    MAX_CALLBACK_DATA,
    MAX_MEDIA_BYTES,
    MEDIA_KINDS,
)

log = logging.getLogger(__name__)

RETRYABLE_CODES: Final = frozenset({130429, 131056})
API_TIMEOUT: Final = aiohttp.ClientTimeout(total=30, connect=10, sock_read=25)
MEDIA_TIMEOUT: Final = aiohttp.ClientTimeout(total=300, connect=10, sock_read=60)
DOWNLOAD_CHUNK: Final = 64 * 1024

# Short, staff-facing explanations of permanent failures (and of the retryable ones,
# for logs). They are ours, so they are safe to show anywhere.
_TITLES: Final[dict[int, str]] = {
    100: "invalid parameter",
    190: "access token invalid or expired",
    130429: "throughput limit reached",
    131026: "message undeliverable to this recipient",
    131047: "more than 24 hours since the citizen's last message; only a template can be sent",
    131048: "spam rate limit reached",
    131051: "unsupported message type",
    131052: "media download failed",
    131053: "media upload failed",
    131056: "too many messages to this recipient",
    131062: "sending by business-scoped user id is not supported for this recipient",
}
_PHONE = re.compile(r"\+?\d(?:[\s\-.]?\d){7,}")
_BSUID = re.compile(r"\b[A-Z]{2}\.(?:ENT\.)?[A-Za-z0-9]{6,}\b")


def error_title(code: int | None) -> str:
    """A short, staff-facing explanation of Graph error `code` (ours: safe anywhere)."""
    if code is None:
        return "request failed"
    if 132000 <= code <= 132016:
        return "template problem (not approved, paused, or wrong parameters)"
    return _TITLES.get(code, "request rejected by WhatsApp")


def _scrub(text: str, known: Iterable[str | None]) -> str:
    for value in known:
        if value and len(value) >= 3:
            text = text.replace(value, "<redacted>")
    text = _BSUID.sub("<redacted>", _PHONE.sub("<redacted>", text))
    return text[:300]


class GraphError(Exception):
    """A Graph API call failed.

    `status` is the HTTP status (None for network errors), `code`/`subcode` Graph's
    error code and subcode when it sent one. `retryable` is true for 429, 5xx, 130429,
    131056 and network errors; otherwise `permanent_title` explains the failure to staff.
    `message` is safe to log.
    """

    def __init__(
        self,
        status: int | None,
        code: int | None,
        subcode: int | None,
        message: str,
        *,
        retryable: bool,
        fbtrace_id: str | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.subcode = subcode
        self.message = message
        self.retryable = retryable
        self.fbtrace_id = fbtrace_id
        self.permanent_title: str | None = None if retryable else error_title(code)
        super().__init__(
            f"Graph API error (http={status}, code={code}, subcode={subcode}, "
            f"retryable={retryable}): {message}"
        )


class MediaIntegrityError(GraphError):
    """Downloaded media does not match the sha256 Graph reported."""

    def __init__(self, message: str = "downloaded media failed the sha256 check") -> None:
        super().__init__(None, None, None, message, retryable=False)
        self.permanent_title = "media failed its integrity check"


class MediaTooLarge(GraphError):
    """Media over the cap for its type; `size` is what Graph reported (None if unknown:
    the download was cut off at `limit`)."""

    def __init__(self, limit: int, size: int | None) -> None:
        super().__init__(None, None, None, "media larger than allowed", retryable=False)
        self.limit = limit
        self.size = size
        self.permanent_title = "media larger than allowed"


def _is_retryable(status: int | None, code: int | None) -> bool:
    return status == 429 or (status is not None and status >= 500) or code in RETRYABLE_CODES


def error_from_response(status: int, payload: Any, known: Sequence[str | None] = ()
                        ) -> GraphError:
    """Build a GraphError from a Graph error answer (or whatever came back instead)."""
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        return GraphError(status, None, None, f"unexpected HTTP {status} answer",
                          retryable=_is_retryable(status, None))

    def _int(key: str) -> int | None:
        value = error.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    code, subcode = _int("code"), _int("error_subcode")
    text = error.get("message")
    message = _scrub(text, known) if isinstance(text, str) else error_title(code)
    trace = error.get("fbtrace_id")
    return GraphError(status, code, subcode, message,
                      retryable=_is_retryable(status, code),
                      fbtrace_id=trace if isinstance(trace, str) else None)


@dataclass(frozen=True, slots=True, repr=False)
class Recipient:
    """Whom to send to: a phone-based `wa_id` and/or a business-scoped `user_id`.

    The phone number is used when known: it reaches every user, while sending by BSUID
    can fail with 131062 for some users. `repr` hides both.
    """

    wa_id: str | None = None
    user_id: str | None = None

    def __post_init__(self) -> None:
        if not (self.wa_id or self.user_id):
            raise ValueError("Recipient needs a wa_id or a user_id")

    def __repr__(self) -> str:
        return "Recipient(<redacted>)"

    def fields(self) -> dict[str, str]:
        """The addressing part of a send request body."""
        if self.wa_id:
            return {"to": self.wa_id}
        assert self.user_id is not None
        return {"recipient": self.user_id}


@dataclass(frozen=True, slots=True)
class MediaInfo:
    url: str
    mime_type: str
    sha256: str
    file_size: int | None


@dataclass(frozen=True, slots=True)
class DownloadedMedia:
    """Downloaded media: one buffer, filled in place as the chunks arrived."""

    data: bytearray
    mime_type: str
    sha256: bytes  # raw digest of `data`, computed while streaming

    def matches(self, expected: str) -> bool:
        """Does `expected` (hex or base64, as in a webhook) name these bytes?"""
        return digest_equals(self.sha256, expected)


def digest_matches(data: bytes, expected: str) -> bool:
    """Graph reports sha256 as hex; webhooks have used base64. Accept either."""
    return digest_equals(hashlib.sha256(data).digest(), expected)


def digest_equals(digest: bytes, expected: str) -> bool:
    """`digest` (raw sha256) against a hex or base64 rendering of one."""
    candidate = expected.strip()
    if re.fullmatch(r"[0-9a-fA-F]{64}", candidate):
        return hmac.compare_digest(digest.hex(), candidate.lower())
    try:
        decoded = base64.b64decode(candidate, validate=True)
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(digest, decoded)


class GraphClient:
    """Sends messages and handles media for one business phone number."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        api_base: str,
        phone_number_id: str,
        access_token: str,
        timeout: aiohttp.ClientTimeout = API_TIMEOUT,
        media_timeout: aiohttp.ClientTimeout = MEDIA_TIMEOUT,
    ) -> None:
        self._session = session
        self._timeout = timeout
        self._media_timeout = media_timeout
        self._base = api_base.rstrip("/")
        self._phone_number_id = phone_number_id
        self._token = access_token

    @classmethod
    def from_config(cls, session: aiohttp.ClientSession, config: WhatsAppConfig) -> GraphClient:
        return cls(session, api_base=config.api_base, phone_number_id=config.phone_number_id,
                   access_token=config.access_token)

    # -- transport -------------------------------------------------------------------

    def _known(self, *values: str | None) -> tuple[str | None, ...]:
        return (self._token, *values)

    async def _request(
        self,
        method: str,
        url: str,
        *,
        json: dict[str, Any] | None = None,
        data: aiohttp.FormData | None = None,
        known: Sequence[str | None] = (),
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self._token}"}
        try:
            async with self._session.request(method, url, json=json, data=data,
                                             headers=headers, timeout=self._timeout) as resp:
                status = resp.status
                try:  # the bytes as they are: Graph answers UTF-8 JSON whatever it says
                    payload = jsonlib.loads(await resp.read())
                except ValueError:
                    payload = None
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("graph %s failed: network error %s", method, type(exc).__name__)
            raise GraphError(None, None, None, f"network error ({type(exc).__name__})",
                             retryable=True) from exc
        if status >= 400 or not isinstance(payload, dict):
            error = (error_from_response(status, payload, self._known(*known)) if status >= 400
                     else GraphError(status, None, None, "malformed success answer",
                                     retryable=False))
            log.warning("graph %s failed: http=%s code=%s subcode=%s retryable=%s trace=%s",
                        method, error.status, error.code, error.subcode, error.retryable,
                        error.fbtrace_id)
            raise error
        return payload

    async def _send(self, to: Recipient, kind: str, obj: dict[str, Any],
                    reply_to: str | None = None, known: Sequence[str | None] = (),
                    callback_data: str | None = None) -> str:
        body: dict[str, Any] = {"messaging_product": "whatsapp", "recipient_type": "individual",
                                **to.fields(), "type": kind, kind: obj}
        if reply_to:
            body["context"] = {"message_id": reply_to}
        if callback_data is not None:
            if not 0 < len(callback_data) <= MAX_CALLBACK_DATA:
                raise ValueError(f"callback data must be 1-{MAX_CALLBACK_DATA} characters")
            body["biz_opaque_callback_data"] = callback_data
        payload = await self._request(
            "POST", f"{self._base}/{self._phone_number_id}/messages", json=body,
            known=(to.wa_id, to.user_id, *known))
        messages = payload.get("messages")
        first = messages[0] if isinstance(messages, list) and messages else None
        wamid = first.get("id") if isinstance(first, dict) else None
        if not isinstance(wamid, str) or not wamid:
            # The message may have gone out; retrying could send it twice.
            raise GraphError(200, None, None, "send answer without a message id",
                             retryable=False)
        log.debug("graph sent type=%s", kind)
        return wamid

    # -- messages --------------------------------------------------------------------

    async def send_text(self, to: Recipient, body: str, reply_to: str | None = None,
                        *, preview_url: bool = False, callback_data: str | None = None) -> str:
        """Send a text message; returns its wamid.

        Every send method takes `callback_data` (see MAX_CALLBACK_DATA): echoed by Meta
        in the message's delivery statuses."""
        obj: dict[str, Any] = {"body": body}
        if preview_url:
            obj["preview_url"] = True
        return await self._send(to, "text", obj, reply_to, known=(body,),
                                callback_data=callback_data)

    async def send_media(self, to: Recipient, kind: str, media_id: str,
                         caption: str | None = None, filename: str | None = None,
                         reply_to: str | None = None, *, callback_data: str | None = None
                         ) -> str:
        """Send uploaded media (`kind` is image, document, audio, video or sticker)."""
        if kind not in MEDIA_KINDS:
            raise ValueError(f"unknown media kind {kind!r}")
        obj: dict[str, Any] = {"id": media_id}
        if caption:
            if kind in ("audio", "sticker"):
                raise ValueError(f"{kind} messages cannot carry a caption")
            obj["caption"] = caption
        if filename:
            if kind != "document":
                raise ValueError("only documents carry a filename")
            obj["filename"] = filename
        return await self._send(to, kind, obj, reply_to, known=(caption, filename),
                                callback_data=callback_data)

    async def send_location(self, to: Recipient, latitude: float, longitude: float,
                            name: str | None = None, address: str | None = None,
                            reply_to: str | None = None, *, callback_data: str | None = None
                            ) -> str:
        """Send a location pin (`name` and `address` optional)."""
        obj: dict[str, Any] = {"latitude": latitude, "longitude": longitude}
        if name:
            obj["name"] = name
        if address:
            obj["address"] = address
        return await self._send(to, "location", obj, reply_to, known=(name, address),
                                callback_data=callback_data)

    async def send_reaction(self, to: Recipient, message_id: str, emoji: str, *,
                            callback_data: str | None = None) -> str:
        """React to `message_id`; an empty `emoji` removes the reaction."""
        return await self._send(to, "reaction", {"message_id": message_id, "emoji": emoji},
                                callback_data=callback_data)

    async def send_template(self, to: Recipient, name: str, language: str,
                            components: Sequence[dict[str, Any]] = (), *,
                            callback_data: str | None = None) -> str:
        """Send an approved template (the only kind allowed outside the 24 h window)."""
        obj: dict[str, Any] = {"name": name,
                               "language": {"code": language, "policy": "deterministic"}}
        if components:
            obj["components"] = list(components)
        return await self._send(to, "template", obj, callback_data=callback_data)

    async def send_buttons(self, to: Recipient, body: str,
                           buttons: Sequence[tuple[str, str]],
                           reply_to: str | None = None, *,
                           callback_data: str | None = None) -> str:
        """Send a message with up to three reply buttons, each (id, title ≤ 20 chars)."""
        if not 1 <= len(buttons) <= MAX_BUTTONS:
            raise ValueError(f"between 1 and {MAX_BUTTONS} buttons are allowed")
        if len({button_id for button_id, _ in buttons}) != len(buttons):
            raise ValueError("button ids must be unique")
        if any(not title or len(title) > MAX_BUTTON_TITLE for _, title in buttons):
            raise ValueError(f"button titles must be 1-{MAX_BUTTON_TITLE} characters")
        obj = {
            "type": "button",
            "body": {"text": body},
            "action": {"buttons": [{"type": "reply", "reply": {"id": i, "title": t}}
                                   for i, t in buttons]},
        }
        return await self._send(to, "interactive", obj, reply_to, known=(body,),
                                callback_data=callback_data)

    async def send_list(self, to: Recipient, body: str, button: str, section: str,
                        rows: Sequence[tuple[str, str]], *,
                        callback_data: str | None = None) -> str:
        """Send an interactive list: one section of up to ten rows (id, title ≤ 24)."""
        if not 1 <= len(rows) <= 10:
            raise ValueError("between 1 and 10 list rows are allowed")
        obj = {
            "type": "list",
            "body": {"text": body},
            "action": {"button": button[:20], "sections": [{
                "title": section[:24],
                "rows": [{"id": i, "title": t[:24]} for i, t in rows]}]},
        }
        return await self._send(to, "interactive", obj, known=(body,),
                                callback_data=callback_data)

    async def mark_read(self, message_id: str, *, typing: bool = False) -> None:
        """Mark an inbound message read (blue ticks), optionally showing 'typing…'."""
        body: dict[str, Any] = {"messaging_product": "whatsapp", "status": "read",
                                "message_id": message_id}
        if typing:
            body["typing_indicator"] = {"type": "text"}
        payload = await self._request(
            "POST", f"{self._base}/{self._phone_number_id}/messages", json=body)
        if payload.get("success") is not True:
            raise GraphError(200, None, None, "mark-read not acknowledged", retryable=False)

    # -- media -----------------------------------------------------------------------

    async def upload_media(self, data: bytes, mime_type: str, filename: str) -> str:
        """Upload media for sending; returns the media id."""
        form = aiohttp.FormData()
        form.add_field("messaging_product", "whatsapp")
        form.add_field("type", mime_type)
        # A file-like body is streamed; raw bytes of many MiB would be copied in one go on
        # the event loop (aiohttp warns about it).
        form.add_field("file", io.BytesIO(data), filename=filename, content_type=mime_type)
        payload = await self._request("POST", f"{self._base}/{self._phone_number_id}/media",
                                      data=form, known=(filename,))
        media_id = payload.get("id")
        if not isinstance(media_id, str) or not media_id:
            raise GraphError(200, None, None, "upload answer without a media id",
                             retryable=False)
        return media_id

    async def media_info(self, media_id: str) -> MediaInfo:
        """Look up a media id: a short-lived download URL, type, sha256 and size."""
        payload = await self._request("GET", f"{self._base}/{media_id}")
        url, mime, sha = payload.get("url"), payload.get("mime_type"), payload.get("sha256")
        size = payload.get("file_size")
        if isinstance(size, str) and size.isdigit():
            size = int(size)
        if not (isinstance(url, str) and isinstance(mime, str) and isinstance(sha, str)):
            raise GraphError(200, None, None, "media lookup answer incomplete", retryable=False)
        return MediaInfo(url, mime, sha,
                         size if isinstance(size, int) and not isinstance(size, bool) else None)

    async def delete_media(self, media_id: str) -> None:
        """Delete media the bridge uploaded (Graph answers `{"success": true}`)."""
        payload = await self._request("DELETE", f"{self._base}/{media_id}")
        if payload.get("success") is not True:
            raise GraphError(200, None, None, "media delete not acknowledged", retryable=False)

    async def download_media(self, media_id: str, *, max_bytes: int = MAX_MEDIA_BYTES
                             ) -> tuple[bytes, str]:
        """Fetch media by id; returns (data, mime_type) after checking its sha256.

        Raises MediaIntegrityError when the bytes do not match what Graph reported,
        MediaTooLarge over `max_bytes`.
        """
        media = await self.fetch_media(media_id, max_bytes=max_bytes)
        return bytes(media.data), media.mime_type

    async def fetch_media(self, media_id: str, *, max_bytes: int = MAX_MEDIA_BYTES
                          ) -> DownloadedMedia:
        """Stream media into one bounded buffer, hashing as it arrives.

        The size is checked three times, so an oversize file is refused as early as
        possible and never read past `max_bytes`: Graph's `file_size`, the CDN's
        Content-Length, then the bytes actually received.
        """
        info = await self.media_info(media_id)
        if info.file_size is not None and info.file_size > max_bytes:
            raise MediaTooLarge(max_bytes, info.file_size)
        headers = {"Authorization": f"Bearer {self._token}"}
        digest = hashlib.sha256()
        try:
            async with self._session.get(info.url, headers=headers,
                                         timeout=self._media_timeout) as resp:
                if resp.status >= 400:
                    try:
                        payload = await resp.json(content_type=None)
                    except ValueError:
                        payload = None
                    raise error_from_response(resp.status, payload, self._known())
                length = resp.content_length
                if length is not None and length > max_bytes:
                    raise MediaTooLarge(max_bytes, length)
                buffer = bytearray()
                async for chunk in resp.content.iter_chunked(DOWNLOAD_CHUNK):
                    if len(buffer) + len(chunk) > max_bytes:
                        raise MediaTooLarge(max_bytes, info.file_size)
                    buffer += chunk
                    digest.update(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("graph media download failed: network error %s", type(exc).__name__)
            raise GraphError(None, None, None, f"network error ({type(exc).__name__})",
                             retryable=True) from exc
        media = DownloadedMedia(buffer, info.mime_type, digest.digest())
        if not media.matches(info.sha256):
            log.warning("graph media download failed the sha256 check")
            raise MediaIntegrityError()
        return media
