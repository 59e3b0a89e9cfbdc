"""Agency-controlled rooms: what a room of each kind looks like, and creating one.

`room_create_body` is pure so the exact state it asks for is unit-tested; `Rooms` does
the I/O (homeserver, database).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from bridge.matrix.api import MatrixAPI
from bridge.types import RoomID, UserID

log = logging.getLogger(__name__)

KINDS = ("team", "citizen", "announcement", "portal", "management")
ROOM_VERSION = "12"  # creators hold top power implicitly and are not listed in `users`
MODERATOR = 50
ADMIN = 100
CREATOR = 150  # how we report a v12 creator's implicit, unlisted top power


@dataclass(frozen=True)
class RoomPolicy:
    """Agency-wide room settings from the config."""

    federate: bool = False
    admins: tuple[str, ...] = ()
    moderators: tuple[str, ...] = ()


def power_levels(kind: str, policy: RoomPolicy) -> dict[str, Any]:
    users = {u: ADMIN for u in policy.admins}
    users.update({u: MODERATOR for u in policy.moderators if u not in users})
    return {
        "users": users,
        "users_default": 0,
        # Only staff post in announcement rooms.
        "events_default": MODERATOR if kind == "announcement" else 0,
        "state_default": MODERATOR,
        "invite": MODERATOR,
        "kick": MODERATOR,
        "ban": MODERATOR,
        "redact": MODERATOR,
        "events": {
            "m.room.encryption": ADMIN,
            "m.room.history_visibility": ADMIN,
            "m.room.join_rules": ADMIN,
            "m.room.guest_access": ADMIN,
            "m.room.power_levels": ADMIN,
            "m.room.server_acl": ADMIN,
            "m.room.tombstone": ADMIN,
            "m.room.name": MODERATOR,
            "m.room.topic": MODERATOR,
            "m.room.avatar": MODERATOR,
        },
        "notifications": {"room": MODERATOR},
    }


def room_create_body(kind: str, name: str, topic: str | None, policy: RoomPolicy,
                     invite: list[str], knock: bool = False) -> dict[str, Any]:
    """The createRoom request for an agency room of `kind`."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}")
    # Portals are created when the citizen opts in and staff are invited at that moment:
    # their first messages must stay readable to staff who join later.
    history = "invited" if kind == "portal" else "joined"
    initial_state: list[dict[str, Any]] = [
        {"type": "m.room.encryption", "state_key": "",
         "content": {"algorithm": "m.megolm.v1.aes-sha2"}},
        {"type": "m.room.history_visibility", "state_key": "",
         "content": {"history_visibility": history}},
        {"type": "m.room.guest_access", "state_key": "", "content": {"guest_access": "forbidden"}},
        {"type": "m.room.join_rules", "state_key": "",
         "content": {"join_rule": "knock" if knock else "invite"}},
        {"type": "org.civicbridge.room", "state_key": "", "content": {"kind": kind}},
    ]
    body: dict[str, Any] = {
        "preset": "private_chat",
        "visibility": "private",
        "room_version": ROOM_VERSION,
        "name": name,
        "invite": invite,
        "initial_state": initial_state,
        "power_level_content_override": power_levels(kind, policy),
        "creation_content": {"m.federate": policy.federate},
    }
    if topic:
        body["topic"] = topic
    return body


def portal_state_keys() -> list[tuple[str, str]]:
    """The (type, state_key) pairs a portal's createRoom writes before its invites
    (Synapse sends power levels, the preset's rules, `initial_state`, then name and
    topic, then invites): a room missing one was cut short mid-creation."""
    body = room_create_body("portal", "-", "-", RoomPolicy(), [])
    keys = [(str(e["type"]), str(e["state_key"])) for e in body["initial_state"]]
    return [("m.room.create", ""), ("m.room.power_levels", ""), *keys,
            ("m.room.name", ""), ("m.room.topic", "")]


@dataclass(frozen=True)
class Member:
    user_id: str
    display_name: str | None
    membership: str
    power: int


class Rooms:
    """Creates and inspects rooms as the bridge bot."""

    def __init__(self, api: MatrixAPI, bot: UserID, policy: RoomPolicy) -> None:
        self._api = api
        self._bot = bot
        self.policy = policy

    async def create(self, kind: str, name: str, topic: str | None = None,
                     invite: list[str] | None = None, knock: bool = False,
                     alias_localpart: str | None = None) -> RoomID:
        """`alias_localpart` (in the bridge's alias namespace) names the room while its
        creation is not yet recorded, so that a retry can find it (bridge.whatsapp.portal)."""
        invitees = [u for u in (invite or []) if u != self._bot]
        body = room_create_body(kind, name, topic, self.policy, invitees, knock)
        if alias_localpart is not None:
            body["room_alias_name"] = alias_localpart
        room_id = await self._api.create_room(self._bot, body)
        log.info("created %s room %s", kind, room_id)
        return room_id

    async def members(self, room_id: RoomID) -> list[Member]:
        """Joined, invited and knocking members with their effective power."""
        state = await self._api.get_state(self._bot, room_id)
        by_type = {(e["type"], e.get("state_key")): e for e in state}
        levels = by_type.get(("m.room.power_levels", ""), {}).get("content", {})
        create = by_type.get(("m.room.create", ""), {})
        creators = {create.get("sender"), *create.get("content", {}).get("additional_creators", [])}
        users, default = levels.get("users", {}), int(levels.get("users_default", 0))
        out = []
        for ev in state:
            content = ev.get("content", {})
            if ev["type"] != "m.room.member" or content.get("membership") not in (
                    "join", "invite", "knock"):
                continue
            uid = ev["state_key"]
            # Room v12: creators outrank every listed power level.
            power = CREATOR if uid in creators else int(users.get(uid, default))
            out.append(Member(uid, content.get("displayname"), content["membership"], power))
        return out

    async def set_power(self, room_id: RoomID, user_id: str, level: int | None) -> None:
        levels = await self._api.get_state_event(self._bot, room_id, "m.room.power_levels")
        users = dict(levels.get("users", {}))
        if level is None:
            users.pop(user_id, None)
        else:
            users[user_id] = level
        await self._api.send_state(self._bot, room_id, "m.room.power_levels",
                                   {**levels, "users": users})
