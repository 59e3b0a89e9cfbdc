"""A small client for the homeserver's client-server API, authenticated as the appservice.

Requests are sent with the as_token and, to act as a ghost, `?user_id=` (appservice
identity assertion). E2EE traffic goes through the per-device nio clients instead
(bridge.matrix.devices); this client does room administration and registration.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote

import aiohttp

from bridge.types import EventID, RoomID, UserID

log = logging.getLogger(__name__)

_DOWNLOAD_CHUNK = 256 * 1024


class MatrixError(Exception):
    """An error answer from the homeserver."""

    def __init__(self, status: int, errcode: str, error: str) -> None:
        super().__init__(f"{status} {errcode}: {error}")
        self.status = status
        self.errcode = errcode
        self.error = error


def nio_failure(resp: Any, what: str) -> MatrixError:
    """A MatrixError for a nio error response, with the HTTP status nio received (0 if
    none): `bridge.retry` can then tell a homeserver that is down (5xx, e.g. from a
    reverse proxy while Synapse restarts) from one that refused the request."""
    transport = getattr(resp, "transport_response", None)
    status = getattr(transport, "status", 0)
    errcode = getattr(resp, "status_code", None)
    return MatrixError(status if isinstance(status, int) else 0, str(errcode or "M_UNKNOWN"),
                       f"{what} failed")


def _q(value: str) -> str:
    return quote(value, safe="")


class MatrixAPI:
    """Appservice-authenticated calls to `/_matrix/client/v3`."""

    def __init__(self, session: aiohttp.ClientSession, homeserver_url: str, as_token: str) -> None:
        self._session = session
        self.url = homeserver_url.rstrip("/")
        self.as_token = as_token
        self._auth = {"Authorization": f"Bearer {as_token}"}

    async def request(
        self,
        method: str,
        path: str,
        *,
        as_user: str | None = None,
        json: Any = None,
        params: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        query = dict(params or {})
        if as_user:
            query["user_id"] = as_user
        async with self._session.request(
            method, f"{self.url}{path}", json=json, params=query, headers=self._auth,
            timeout=aiohttp.ClientTimeout(total=60),
        ) as resp:
            try:
                body = await resp.json(content_type=None)
            except ValueError:
                body = {}
            if resp.status >= 400:
                body = body if isinstance(body, dict) else {}
                raise MatrixError(resp.status, str(body.get("errcode", "M_UNKNOWN")),
                                  str(body.get("error", "")))
            return body if isinstance(body, dict) else {"chunk": body}

    async def _get_found(self, path: str) -> dict[str, Any] | None:
        """GET `path`; None when the homeserver answers 404 (there is no such thing)."""
        try:
            return await self.request("GET", path)
        except MatrixError as exc:
            if exc.status == 404:
                return None
            raise

    # --- accounts -------------------------------------------------------------

    async def register(self, localpart: str) -> None:
        """Register a user in our namespace; an existing one is fine."""
        try:
            await self.request("POST", "/_matrix/client/v3/register", json={
                "type": "m.login.application_service", "username": localpart,
                "inhibit_login": True,
            })
        except MatrixError as exc:
            if exc.errcode != "M_USER_IN_USE":
                raise

    async def create_device(self, user_id: UserID, device_id: str) -> None:
        """Make sure the user (of the bridge's namespace) has this device, with the
        as_token: MSC4190's `PUT /devices/{id}` (201 created, 200 already there).

        Synapse 1.163 accepts it from an appservice with or without
        `io.element.msc4190` in the registration. A homeserver that refuses it gets the
        device from the appservice login once, and its token is dropped: requests for
        the device use the as_token with `?user_id=&device_id=` (MSC3202) either way.
        (Never log that token out: that would delete the device.) With
        `io.element.msc4190` on, that login is refused, so the flag needs this method.
        """
        try:
            await self.request("PUT", f"/_matrix/client/v3/devices/{_q(device_id)}",
                               as_user=user_id, json={"display_name": "civic-bridge"})
            return
        except MatrixError as exc:
            if exc.status not in (400, 404, 405) or exc.errcode == "M_UNKNOWN_TOKEN":
                raise
            refused = exc
        log.warning("homeserver lacks MSC4190 device creation (%s); creating the device "
                    "with the appservice login (its access token is discarded)",
                    refused.errcode)
        try:
            await self.login_device(user_id[1:].split(":", 1)[0], device_id)
        except MatrixError as exc:
            if exc.errcode == "M_APPSERVICE_LOGIN_UNSUPPORTED":
                raise MatrixError(exc.status, exc.errcode,
                                  "the homeserver refuses both ways of creating a device: "
                                  "it needs MSC4190 (`PUT /devices/{id}` from an "
                                  "appservice)") from None
            raise

    async def login_device(self, localpart: str, device_id: str) -> str:
        """An access token for a fixed device id (keeps its keys across restarts).
        Only `create_device`'s fallback uses it."""
        body = await self.request("POST", "/_matrix/client/v3/login", json={
            "type": "m.login.application_service",
            "identifier": {"type": "m.id.user", "user": localpart},
            "device_id": device_id,
            "initial_device_display_name": "civic-bridge",
        })
        return str(body["access_token"])

    async def display_name(self, user_id: UserID) -> str | None:
        """The user's display name; None when it has none (or no profile)."""
        body = await self._get_found(f"/_matrix/client/v3/profile/{_q(user_id)}")
        name = None if body is None else body.get("displayname")
        return name if isinstance(name, str) else None

    async def set_displayname(self, user_id: UserID, name: str) -> None:
        await self.request("PUT", f"/_matrix/client/v3/profile/{_q(user_id)}/displayname",
                           as_user=user_id, json={"displayname": name})

    # --- rooms ----------------------------------------------------------------

    async def create_room(self, as_user: UserID, body: dict[str, Any]) -> RoomID:
        resp = await self.request("POST", "/_matrix/client/v3/createRoom",
                                  as_user=as_user, json=body)
        return RoomID(str(resp["room_id"]))

    async def invite(self, as_user: UserID, room_id: RoomID, user_id: str,
                     reason: str | None = None) -> None:
        body: dict[str, Any] = {"user_id": user_id}
        if reason:
            body["reason"] = reason
        await self.request("POST", f"/_matrix/client/v3/rooms/{_q(room_id)}/invite",
                           as_user=as_user, json=body)

    async def join(self, as_user: UserID, room_id: RoomID) -> None:
        await self.request("POST", f"/_matrix/client/v3/join/{_q(room_id)}", as_user=as_user,
                           json={})

    async def leave(self, as_user: UserID, room_id: RoomID) -> None:
        await self.request("POST", f"/_matrix/client/v3/rooms/{_q(room_id)}/leave",
                           as_user=as_user, json={})

    async def deactivate(self, user_id: UserID) -> None:
        """Deactivate a user in our namespace for good, marked erased (GDPR art. 17):
        the homeserver drops its profile, devices and keys, and hides its events from
        anyone who joins a room later. Appservices need no interactive auth for this."""
        await self.request("POST", "/_matrix/client/v3/account/deactivate", as_user=user_id,
                           json={"erase": True})

    async def membership_action(self, as_user: UserID, room_id: RoomID, action: str,
                                user_id: str, reason: str | None = None) -> None:
        """kick, ban or unban."""
        body: dict[str, Any] = {"user_id": user_id}
        if reason:
            body["reason"] = reason
        await self.request("POST", f"/_matrix/client/v3/rooms/{_q(room_id)}/{action}",
                           as_user=as_user, json=body)

    async def redact(self, as_user: UserID, room_id: RoomID, event_id: str, txn_id: str,
                     reason: str | None = None) -> EventID:
        resp = await self.request(
            "PUT",
            f"/_matrix/client/v3/rooms/{_q(room_id)}/redact/{_q(event_id)}/{_q(txn_id)}",
            as_user=as_user, json={"reason": reason} if reason else {})
        return EventID(str(resp["event_id"]))

    async def send_state(self, as_user: UserID, room_id: RoomID, event_type: str,
                         content: dict[str, Any], state_key: str = "") -> EventID:
        resp = await self.request(
            "PUT",
            f"/_matrix/client/v3/rooms/{_q(room_id)}/state/{_q(event_type)}/{_q(state_key)}",
            as_user=as_user, json=content)
        return EventID(str(resp["event_id"]))

    async def get_state(self, as_user: UserID, room_id: RoomID) -> list[dict[str, Any]]:
        resp = await self.request("GET", f"/_matrix/client/v3/rooms/{_q(room_id)}/state",
                                  as_user=as_user)
        return list(resp.get("chunk", []))

    async def get_state_event(self, as_user: UserID, room_id: RoomID, event_type: str,
                              state_key: str = "") -> dict[str, Any]:
        return await self.request(
            "GET",
            f"/_matrix/client/v3/rooms/{_q(room_id)}/state/{_q(event_type)}/{_q(state_key)}",
            as_user=as_user)

    async def members(self, as_user: UserID, room_id: RoomID) -> list[dict[str, Any]]:
        """m.room.member events of joined and invited members."""
        resp = await self.request("GET", f"/_matrix/client/v3/rooms/{_q(room_id)}/members",
                                  as_user=as_user, params={"not_membership": "leave"})
        return [m for m in resp.get("chunk", [])
                if m.get("content", {}).get("membership") in ("join", "invite", "knock")]

    # --- media ----------------------------------------------------------------

    async def upload(self, as_user: UserID, data: bytes | bytearray, filename: str) -> str:
        """Upload bytes (already encrypted by the caller) and return the mxc:// URI."""
        async with self._session.post(
            f"{self.url}/_matrix/media/v3/upload", data=data,
            params={"user_id": as_user, "filename": filename},
            headers={**self._auth, "Content-Type": "application/octet-stream"},
            timeout=aiohttp.ClientTimeout(total=300),
        ) as resp:
            body = await resp.json(content_type=None)
            if resp.status >= 400 or not isinstance(body, dict):
                raise MatrixError(resp.status, str(body.get("errcode", "M_UNKNOWN")
                                                   if isinstance(body, dict) else "M_UNKNOWN"),
                                  "media upload failed")
            return str(body["content_uri"])

    async def download(self, as_user: UserID, mxc: str, max_bytes: int) -> bytes:
        """Fetch media (authenticated media API), refusing more than `max_bytes`."""
        if not mxc.startswith("mxc://") or mxc.count("/") != 3:
            raise MatrixError(400, "M_INVALID_PARAM", "not an mxc:// URI")
        server, media_id = mxc[len("mxc://"):].split("/", 1)
        async with self._session.get(
            f"{self.url}/_matrix/client/v1/media/download/{_q(server)}/{_q(media_id)}",
            params={"user_id": as_user}, headers=self._auth,
            timeout=aiohttp.ClientTimeout(total=300),
        ) as resp:
            if resp.status >= 400:
                raise MatrixError(resp.status, "M_UNKNOWN", "media download failed")
            declared = resp.content_length
            if declared is not None and declared > max_bytes:
                raise MatrixError(413, "M_TOO_LARGE", "media too large")
            # `content.read(n)` answers with what is buffered so far, not n bytes: read
            # the whole body chunk by chunk, and stop as soon as it passes the cap.
            chunks: list[bytes] = []
            total = 0
            async for chunk in resp.content.iter_chunked(_DOWNLOAD_CHUNK):
                total += len(chunk)
                if total > max_bytes:
                    raise MatrixError(413, "M_TOO_LARGE", "media too large")
                chunks.append(chunk)
            return b"".join(chunks)

    async def resolve_alias(self, alias: str) -> RoomID | None:
        """The room an alias points to; None if there is no such alias."""
        body = await self._get_found(f"/_matrix/client/v3/directory/room/{_q(alias)}")
        return None if body is None else RoomID(str(body["room_id"]))

    async def delete_alias(self, as_user: UserID, alias: str) -> None:
        """Remove an alias; one that is already gone is fine."""
        try:
            await self.request("DELETE", f"/_matrix/client/v3/directory/room/{_q(alias)}",
                               as_user=as_user)
        except MatrixError as exc:
            if exc.status != 404:
                raise

    async def receipt(self, as_user: UserID, room_id: RoomID, event_id: str) -> None:
        await self.request(
            "POST",
            f"/_matrix/client/v3/rooms/{_q(room_id)}/receipt/m.read/{_q(event_id)}",
            as_user=as_user, json={})

    async def versions(self) -> dict[str, Any]:
        return await self.request("GET", "/_matrix/client/versions")

    async def ping_appservice(self, appservice_id: str) -> None:
        """Ask the homeserver to ping us (MSC2659); on success Synapse also retries its
        backlog of transactions at once instead of waiting out its backoff."""
        await self.request("POST", f"/_matrix/client/v1/appservice/{_q(appservice_id)}/ping",
                           json={})
