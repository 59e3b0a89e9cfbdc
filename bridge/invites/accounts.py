"""Creating citizens' accounts with Synapse's shared-secret registration.

`POST /_synapse/admin/v1/register` with an HMAC-SHA1 over nonce, username, password
and "notadmin" (keyed with `registration_shared_secret`) makes an ordinary, non-admin
user. `inhibit_login` keeps Synapse from creating a device and access token we would
only have to throw away. The password goes to Synapse and nowhere else: it is neither
stored nor logged here.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Any

import aiohttp

from bridge.types import UserID

log = logging.getLogger(__name__)
PATH = "/_synapse/admin/v1/register"


class RegistrationError(Exception):
    """Synapse did not create the account; `errcode` says why (never the password)."""

    def __init__(self, status: int, errcode: str) -> None:
        super().__init__(f"registration failed: {status} {errcode}")
        self.status = status
        self.errcode = errcode


def registration_mac(secret: str, nonce: str, username: str, password: str) -> str:
    mac = hmac.new(secret.encode("utf-8"), digestmod=hashlib.sha1)
    mac.update(b"\x00".join(p.encode("utf-8") for p in (nonce, username, password,
                                                        "notadmin")))
    return mac.hexdigest()


class SynapseRegistrar:
    """Registers normal (non-admin) users on the agency homeserver."""

    def __init__(self, http: aiohttp.ClientSession, homeserver_url: str, secret: str) -> None:
        self._http = http
        self._base = homeserver_url.rstrip("/")
        self._url = self._base + PATH
        self._secret = secret

    async def _call(self, method: str, json: dict[str, Any] | None = None) -> dict[str, Any]:
        async with self._http.request(method, self._url, json=json,
                                      timeout=aiohttp.ClientTimeout(total=30)) as resp:
            try:
                body = await resp.json(content_type=None)
            except ValueError:
                body = {}
            body = body if isinstance(body, dict) else {}
            if resp.status != 200:
                raise RegistrationError(resp.status, str(body.get("errcode", "M_UNKNOWN")))
            return body

    async def register(self, localpart: str, password: str, display_name: str) -> UserID:
        """Create `@localpart`; RegistrationError (errcode M_USER_IN_USE if taken)."""
        nonce = str((await self._call("GET")).get("nonce", ""))
        body = await self._call("POST", {
            "nonce": nonce, "username": localpart, "password": password, "admin": False,
            "displayname": display_name, "inhibit_login": True,
            "mac": registration_mac(self._secret, nonce, localpart, password),
        })
        return UserID(str(body["user_id"]))

    async def remove(self, localpart: str, password: str) -> bool:
        """Deactivate (and erase) `@localpart` if it exists with this password, as the
        account itself: a citizen's account is outside the appservice's namespace and the
        bridge holds no homeserver admin token. True if deactivated, False if there was
        no such account; RegistrationError or a network error if it could not tell."""
        login = {"type": "m.login.password", "password": password,
                 "identifier": {"type": "m.id.user", "user": localpart}}
        status, body = await self._client("POST", "/_matrix/client/v3/login", login)
        if status == 403:
            return False  # never made (or already deactivated): nothing to undo
        if status != 200:
            raise RegistrationError(status, str(body.get("errcode", "M_UNKNOWN")))
        token = str(body.get("access_token", ""))
        status, body = await self._client(
            "POST", "/_matrix/client/v3/account/deactivate",
            {"auth": {**login, "user": localpart}, "erase": True}, token)
        if status != 200:
            raise RegistrationError(status, str(body.get("errcode", "M_UNKNOWN")))
        return True

    async def _client(self, method: str, path: str, json: dict[str, Any],
                      token: str | None = None) -> tuple[int, dict[str, Any]]:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        async with self._http.request(method, self._base + path, json=json, headers=headers,
                                      timeout=aiohttp.ClientTimeout(total=30)) as resp:
            try:
                body = await resp.json(content_type=None)
            except ValueError:
                body = {}
            return resp.status, body if isinstance(body, dict) else {}
