"""What an agency room of each kind looks like: power levels, the createRoom body, who
is a member with which power. Pure (tests/unit/test_core_imports.py); `bridge.matrix.rooms`
does the I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


def members_from_state(state: list[dict[str, Any]]) -> list[Member]:
    """Joined, invited and knocking members of a room's state, with their effective power."""
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


def with_power(levels: dict[str, Any], user_id: str, level: int | None) -> dict[str, Any]:
    """`m.room.power_levels` content with `user_id` at `level` (None: back to the default)."""
    users = dict(levels.get("users", {}))
    if level is None:
        users.pop(user_id, None)
    else:
        users[user_id] = level
    return {**levels, "users": users}
