"""Synapse's admin API, with the token of a Synapse admin account
(`moderation.synapse_admin_token`): event reports, server notices, users' profiles, and
the accounts made through invite links (whether they were used; deactivation).

Documented in Synapse's admin API (event_reports, server_notices, user_admin_api). The
token is never logged; errors carry the errcode only.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import aiohttp

from bridge.matrix.api import MatrixAPI, MatrixError

PAGE = 100


class SynapseAdmin:
    """Admin-API calls; `MatrixAPI` does the HTTP with the admin token instead of as_token."""

    def __init__(self, http: aiohttp.ClientSession, homeserver_url: str, token: str) -> None:
        self._api = MatrixAPI(http, homeserver_url, token)

    async def event_reports(self, start: int = 0, limit: int = PAGE) -> tuple[
            list[dict[str, Any]], int | None]:
        """One page of reports, newest first, and the offset of the next page (or None)."""
        body = await self._api.request("GET", "/_synapse/admin/v1/event_reports", params={
            "from": str(start), "limit": str(limit), "dir": "b"})
        reports = [r for r in body.get("event_reports", []) if isinstance(r, dict)]
        following = body.get("next_token")
        return reports, int(following) if isinstance(following, int | str) and \
            str(following).isdigit() else None

    async def server_notice(self, user_id: str, text: str) -> None:
        """A notice in the user's server-notices room (needs `server_notices` in Synapse)."""
        await self._api.request("POST", "/_synapse/admin/v1/send_server_notice", json={
            "user_id": user_id, "content": {"msgtype": "m.text", "body": text}})

    async def set_displayname(self, user_id: str, name: str) -> None:
        """Set a local user's profile name; Synapse updates their member events in every
        room they are in."""
        await self._api.request("PUT", f"/_synapse/admin/v2/users/{quote(user_id, safe='')}",
                                json={"displayname": name})

    async def account_in_use(self, user_id: str) -> bool | None:
        """Whether a local account was ever used: it has a device (accounts made through
        invite links get none until their owner logs in) or is in a room. None if there
        is no such account or it is deactivated already."""
        path = f"/_synapse/admin/v2/users/{quote(user_id, safe='')}"
        try:
            user = await self._api.request("GET", path)
        except MatrixError as exc:
            if exc.status == 404:
                return None
            raise
        if user.get("deactivated"):
            return None
        devices = await self._api.request("GET", path + "/devices")
        rooms = await self._api.request(
            "GET", f"/_synapse/admin/v1/users/{quote(user_id, safe='')}/joined_rooms")
        return bool(devices.get("devices")) or bool(rooms.get("joined_rooms"))

    async def deactivate(self, user_id: str) -> None:
        """Deactivate a local account for good and erase it (GDPR erasure: its profile
        goes and its messages are hidden from anyone who joins later). An account that
        does not exist is not an error: there is nothing to deactivate."""
        try:
            await self._api.request(
                "POST", f"/_synapse/admin/v1/deactivate/{quote(user_id, safe='')}",
                json={"erase": True})
        except MatrixError as exc:
            if exc.status != 404:
                raise
