"""Admin actions against a real Synapse, through the admin API and the management room,
with the resulting room state read back from the homeserver."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from nio import EncryptionError, MegolmEvent, RoomMessageNotice

from bridge.matrix.api import MatrixError
from bridge.types import RoomID
from tests.fixtures.bridge import BridgeHarness
from tests.fixtures.staff import StaffClient, staff_login

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class User:
    user_id: str
    token: str


async def new_user(h: BridgeHarness, name: str) -> User:
    localpart = f"{name}_{secrets.token_hex(3)}"
    password = secrets.token_urlsafe(12)
    await h.synapse.synapse.register_user(localpart, password)
    user_id, token, _ = await h.synapse.synapse.login(localpart, password)
    return User(user_id, token)


async def as_user(h: BridgeHarness, user: User, method: str, path: str,
                  body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    return await h.synapse.synapse.request(method, path, body if body is not None else {},
                                           user.token)


def q(value: str) -> str:
    return quote(value, safe="")


async def send_text(h: BridgeHarness, user: User, room_id: str, body: str) -> tuple[int, Any]:
    return await as_user(h, user, "PUT", f"/_matrix/client/v3/rooms/{q(room_id)}/send/"
                         f"m.room.message/{secrets.token_hex(6)}",
                         {"msgtype": "m.text", "body": body})


async def create_room(h: BridgeHarness, name: str, kind: str = "citizen",
                      **extra: Any) -> str:
    status, body = await h.running.call("POST", "/admin/v1/rooms",
                                        {"name": name, "kind": kind, **extra})
    assert status == 201, body
    return str(body["room_id"])


async def joined(h: BridgeHarness, room_id: str, name: str = "vecino") -> User:
    user = await new_user(h, name)
    b = h.running.bridge
    await b.api.invite(b.ghosts.bot, RoomID(room_id), user.user_id)
    status, body = await as_user(h, user, "POST", f"/_matrix/client/v3/join/{q(room_id)}")
    assert status == 200, body
    return user


async def state(h: BridgeHarness, room_id: str) -> dict[tuple[str, str], dict[str, Any]]:
    b = h.running.bridge
    return {(e["type"], e["state_key"]): e
            for e in await b.api.get_state(b.ghosts.bot, RoomID(room_id))}


async def membership(h: BridgeHarness, room_id: str, user_id: str) -> str | None:
    member = (await state(h, room_id)).get(("m.room.member", user_id))
    return None if member is None else str(member["content"]["membership"])


async def admin_call(h: BridgeHarness, room_id: str, action: str,
                     body: dict[str, Any]) -> tuple[int, Any]:
    return await h.running.call("POST", f"/admin/v1/rooms/{room_id}/{action}", body)


async def last_audit(h: BridgeHarness) -> Any:
    return (await h.running.bridge.db.audit.list(limit=1))[0]


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 20) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.2)


# --- the admin API ------------------------------------------------------------------------


async def test_kick_ban_unban(bridge: BridgeHarness) -> None:
    room = await create_room(bridge, "Moderación")
    user = await joined(bridge, room)

    status, body = await admin_call(bridge, room, "kick", {"user_id": user.user_id})
    assert status == 400 and "reason" in body["error"]
    assert await membership(bridge, room, user.user_id) == "join"

    assert (await admin_call(bridge, room, "kick",
                             {"user_id": user.user_id, "reason": "insultos"}))[0] == 200
    member = (await state(bridge, room))[("m.room.member", user.user_id)]
    assert member["content"]["membership"] == "leave"
    assert member["content"]["reason"] == "insultos"
    entry = await last_audit(bridge)
    assert (entry.actor, entry.action, entry.object, entry.result, entry.reason) == (
        "api:admin", "room.kick", f"{room} {user.user_id}", "ok", "insultos")

    assert (await admin_call(bridge, room, "ban",
                             {"user_id": user.user_id, "reason": "reincide"}))[0] == 200
    assert await membership(bridge, room, user.user_id) == "ban"
    status, _ = await as_user(bridge, user, "POST", f"/_matrix/client/v3/join/{q(room)}")
    assert status == 403
    assert (await admin_call(bridge, room, "unban",
                             {"user_id": user.user_id, "reason": "recurso"}))[0] == 200
    assert await membership(bridge, room, user.user_id) == "leave"

    # Refused by the homeserver: audited as an error, answered with its errcode.
    stranger = await new_user(bridge, "ajeno")
    status, body = await admin_call(bridge, room, "kick",
                                    {"user_id": stranger.user_id, "reason": "x"})
    assert status == 400 and body["errcode"] == "CB_HOMESERVER_REFUSED"
    assert (await last_audit(bridge)).result.startswith("error M_")

    bot = bridge.running.bridge.ghosts.bot
    for target, code in ((bot, 400), ("nobody", 400)):
        status, _ = await admin_call(bridge, room, "ban", {"user_id": target, "reason": "x"})
        assert status == code
    status, _ = await admin_call(bridge, "!unknown:localhost", "kick",
                                 {"user_id": user.user_id, "reason": "x"})
    assert status == 404


async def test_mute_and_unmute_by_power_levels(bridge: BridgeHarness) -> None:
    room = await create_room(bridge, "Silencio")
    user = await joined(bridge, room)
    assert (await send_text(bridge, user, room, "hola"))[0] == 200

    assert (await admin_call(bridge, room, "mute",
                             {"user_id": user.user_id, "reason": "flood"}))[0] == 200
    levels = (await state(bridge, room))[("m.room.power_levels", "")]["content"]
    assert levels["users"][user.user_id] == -1
    status, body = await send_text(bridge, user, room, "¿me oyen?")
    assert status == 403 and body["errcode"] == "M_FORBIDDEN"
    status, members = await bridge.running.call("GET", f"/admin/v1/rooms/{room}/members")
    assert next(m for m in members if m["user_id"] == user.user_id)["role"] == "muted"
    status, body = await admin_call(bridge, room, "mute",
                                    {"user_id": user.user_id, "reason": "flood"})
    assert status == 409

    assert (await admin_call(bridge, room, "unmute",
                             {"user_id": user.user_id, "reason": "ya está"}))[0] == 200
    levels = (await state(bridge, room))[("m.room.power_levels", "")]["content"]
    assert user.user_id not in levels["users"]
    assert (await send_text(bridge, user, room, "gracias"))[0] == 200

    # A moderator gets their level back after being unmuted.
    await bridge.running.bridge.rooms.set_power(RoomID(room), user.user_id, 50)
    await admin_call(bridge, room, "mute", {"user_id": user.user_id, "reason": "pausa"})
    await admin_call(bridge, room, "unmute", {"user_id": user.user_id, "reason": "fin"})
    levels = (await state(bridge, room))[("m.room.power_levels", "")]["content"]
    assert levels["users"][user.user_id] == 50


async def test_redact_an_event(bridge: BridgeHarness) -> None:
    room = await create_room(bridge, "Redacción")
    user = await joined(bridge, room)
    status, sent = await send_text(bridge, user, room, "mi DNI es 12345678Z")
    event_id = sent["event_id"]
    status, body = await admin_call(bridge, room, "redact",
                                    {"event_id": event_id, "reason": "dato personal"})
    assert status == 200 and body["event_id"].startswith("$")
    b = bridge.running.bridge
    event = await b.api.request(
        "GET", f"/_matrix/client/v3/rooms/{q(room)}/event/{q(event_id)}", as_user=b.ghosts.bot)
    assert event["content"] == {}
    assert event["unsigned"]["redacted_because"]["content"]["reason"] == "dato personal"
    status, _ = await admin_call(bridge, room, "redact", {"event_id": "nope", "reason": "x"})
    assert status == 400


async def test_knocks_are_approved_or_denied(bridge: BridgeHarness) -> None:
    room = await create_room(bridge, "Con llamada", join_rule="knock")
    assert (await state(bridge, room))[("m.room.join_rules", "")]["content"]["join_rule"] == "knock"
    first, second = await new_user(bridge, "llama"), await new_user(bridge, "llama")
    for user in (first, second):
        status, body = await as_user(bridge, user, "POST", f"/_matrix/client/v3/knock/{q(room)}",
                                     {"reason": "quiero participar"})
        assert status == 200, body
    status, members = await bridge.running.call("GET", f"/admin/v1/rooms/{room}/members")
    assert {m["user_id"] for m in members if m["membership"] == "knock"} == {
        first.user_id, second.user_id}

    assert (await admin_call(bridge, room, "knocks/approve",
                             {"user_id": first.user_id}))[0] == 200
    assert await membership(bridge, room, first.user_id) == "invite"
    status, _ = await as_user(bridge, first, "POST", f"/_matrix/client/v3/join/{q(room)}")
    assert status == 200

    status, body = await admin_call(bridge, room, "knocks/deny", {"user_id": second.user_id})
    assert status == 400  # denying needs a reason
    assert (await admin_call(bridge, room, "knocks/deny",
                             {"user_id": second.user_id, "reason": "no es vecino"}))[0] == 200
    assert await membership(bridge, room, second.user_id) == "leave"
    status, _ = await admin_call(bridge, room, "knocks/approve", {"user_id": second.user_id})
    assert status == 409  # not knocking any more
    actions = [e.action for e in await bridge.running.bridge.db.audit.list(limit=3)]
    assert actions[:2] == ["room.knock.deny", "room.knock.approve"]


async def test_close_removes_everyone_and_tombstones(bridge: BridgeHarness) -> None:
    room = await create_room(bridge, "Para cerrar")
    member = await joined(bridge, room)
    invited = await new_user(bridge, "invitado")
    b = bridge.running.bridge
    await b.api.invite(b.ghosts.bot, RoomID(room), invited.user_id)
    status, link = await bridge.running.call("POST", f"/admin/v1/rooms/{room}/invite-links", {})
    assert status == 201

    status, body = await admin_call(bridge, room, "close", {"reason": "fin del proceso"})
    assert status == 200 and body["removed"] == 3  # the member, the invitee, the admin
    room_state = await state(bridge, room)
    left = {k[1]: e["content"]["membership"] for k, e in room_state.items()
            if k[0] == "m.room.member"}
    assert left.pop(b.ghosts.bot) == "join"
    assert set(left.values()) == {"leave"}
    assert {member.user_id, invited.user_id, bridge.admin.user_id} <= set(left)
    tombstone = room_state[("m.room.tombstone", "")]["content"]
    assert "cerrado" in tombstone["body"]

    status, rooms = await bridge.running.call("GET", "/admin/v1/rooms")
    assert room not in {r["room_id"] for r in rooms}
    assert (await b.db.rooms.get(RoomID(room))).closed_at is not None  # type: ignore[union-attr]
    status, body = await admin_call(bridge, room, "kick",
                                    {"user_id": member.user_id, "reason": "x"})
    assert status == 409 and "closed" in body["error"]
    assert (await admin_call(bridge, room, "close", {"reason": "otra vez"}))[0] == 409
    async with aiohttp.ClientSession() as http, http.get(link["url"]) as resp:
        assert resp.status == 410
    entry = await last_audit(bridge)
    assert (entry.action, entry.object, entry.result) == ("room.close", room, "ok")


async def _crowd(h: BridgeHarness, room_id: str, n: int) -> None:
    """Invite `n` (not yet registered) users: Synapse accepts that, and it is fast."""
    b = h.running.bridge
    tag = secrets.token_hex(3)
    await asyncio.gather(*(b.api.invite(b.ghosts.bot, RoomID(room_id),
                                        f"@crowd_{tag}_{i}:localhost") for i in range(n)))


async def test_big_rooms_and_announcements_ask_for_confirmation(bridge: BridgeHarness) -> None:
    room = await create_room(bridge, "Asamblea")
    await _crowd(bridge, room, bridge.running.config.rooms.confirm_above)
    size = bridge.running.config.rooms.confirm_above + 2  # + the bot and the admin
    newcomer = await new_user(bridge, "nuevo")
    path = f"/admin/v1/rooms/{room}/invite"
    status, body = await bridge.running.call("POST", path, {"user_id": newcomer.user_id})
    assert status == 409 and body["errcode"] == "CB_CONFIRM_REQUIRED"
    assert body["error"] == f"Room 'Asamblea' has {size} members; repeat with confirm: true"
    assert await membership(bridge, room, newcomer.user_id) is None
    status, body = await bridge.running.call("POST", path,
                                             {"user_id": newcomer.user_id, "confirm": True})
    assert status == 200, body
    assert await membership(bridge, room, newcomer.user_id) == "invite"

    links = f"/admin/v1/rooms/{room}/invite-links"
    assert (await bridge.running.call("POST", links, {}))[0] == 409
    assert (await bridge.running.call("POST", links, {"confirm": True}))[0] == 201

    notices = await create_room(bridge, "Avisos", kind="announcement")
    path = f"/admin/v1/rooms/{notices}/announce"
    status, body = await bridge.running.call("POST", path, {"body": "Corte de agua mañana"})
    assert status == 409 and body["error"].startswith("Room 'Avisos' has 2 members")
    status, body = await bridge.running.call("POST", path,
                                             {"body": "Corte de agua mañana", "confirm": True})
    assert status == 200, body
    b = bridge.running.bridge
    event = await b.api.request(
        "GET", f"/_matrix/client/v3/rooms/{q(notices)}/event/{q(body['event_id'])}",
        as_user=b.ghosts.bot)
    assert event["sender"] == b.ghosts.bot and event["type"] == "m.room.encrypted"
    status, body = await bridge.running.call(
        "POST", f"/admin/v1/rooms/{room}/announce", {"body": "x", "confirm": True})
    assert status == 400  # only announcement rooms


async def test_citizens_cannot_invite_or_dm_ghosts(bridge: BridgeHarness) -> None:
    room = await create_room(bridge, "Vecindario")
    citizen = await joined(bridge, room, "v_like")
    other = await new_user(bridge, "otro")
    status, body = await as_user(bridge, citizen, "POST",
                                 f"/_matrix/client/v3/rooms/{q(room)}/invite",
                                 {"user_id": other.user_id})
    assert status == 403 and body["errcode"] == "M_FORBIDDEN"

    # A DM to a citizen's ghost: the homeserver's policy module refuses it outright
    # (tests/integration/test_policy_module.py) ...
    b = bridge.running.bridge
    ghost = await b.ghosts.create()
    dm_body = {"preset": "trusted_private_chat", "is_direct": True, "invite": [ghost]}
    status, body = await as_user(bridge, citizen, "POST", "/_matrix/client/v3/createRoom",
                                 dm_body)
    assert (status, body.get("org.civic_bridge.policy")) == (403, "create_room"), body
    # ... and the bridge's own guard holds where the module does not apply (or is not
    # installed): the ghost leaves any DM at once.
    status, body = await as_user(bridge, other, "POST", "/_matrix/client/v3/createRoom",
                                 dm_body)
    assert status == 200, body
    dm = body["room_id"]

    async def ghost_left() -> bool:
        status, member = await as_user(
            bridge, other, "GET", f"/_matrix/client/v3/rooms/{q(dm)}/state/m.room.member/"
            f"{q(ghost)}")
        return status == 200 and member.get("membership") == "leave"

    await eventually(ghost_left)

    # Members as the admin API shows them: pseudonyms and roles, no contact data.
    status, members = await bridge.running.call("GET", f"/admin/v1/rooms/{room}/members")
    assert status == 200
    for m in members:
        assert set(m) == {"user_id", "display_name", "kind", "membership", "power", "role"}


# --- the management room ------------------------------------------------------------------


class Conversation:
    """An E2EE DM between a staff member and the bridge bot."""

    def __init__(self, staff: StaffClient, room_id: str, bot: str) -> None:
        self.staff = staff
        self.room_id = room_id
        self.bot = bot

    async def say(self, text: str, timeout: float = 30) -> str:
        """Send a command and return the bot's next notice."""
        seen = len(self.staff._timeline.get(self.room_id, []))
        await self.staff.send_text(self.room_id, text)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            await self.staff.sync_once(timeout_ms=500)
            events = self.staff._timeline.get(self.room_id, [])
            for i in range(seen, len(events)):
                event = events[i]
                if isinstance(event, MegolmEvent):
                    try:
                        event = events[i] = self.staff.client.decrypt_event(event)
                    except EncryptionError:
                        continue
                if isinstance(event, RoomMessageNotice) and event.sender == self.bot:
                    del events[seen:i + 1]  # consumed
                    return str(event.body)
        raise AssertionError(f"no answer from the bot to {text!r}")


async def dm_with_bot(h: BridgeHarness, localpart: str, password: str) -> Conversation:
    b = h.running.bridge
    staff = await staff_login(h.synapse.synapse, localpart, password)
    room_id = await staff.create_room(invite=[b.ghosts.bot])

    async def bot_joined() -> bool:
        try:
            member = await b.api.get_state_event(b.ghosts.bot, RoomID(room_id),
                                                 "m.room.member", b.ghosts.bot)
        except MatrixError:
            return False  # not in the room yet
        return member.get("membership") == "join"

    await eventually(bot_joined)
    await staff.sync_once()
    return Conversation(staff, room_id, b.ghosts.bot)


async def test_management_room_commands(bridge: BridgeHarness) -> None:
    talk = await dm_with_bot(bridge, bridge.admin.localpart, bridge.admin.password)
    try:
        answer = await talk.say("help")
        assert "kick ROOM USER REASON" in answer and "close ROOM REASON" in answer

        room = await create_room(bridge, "Gestión")
        user = await joined(bridge, room)
        assert "unknown command" in await talk.say("frobnicate everything")
        assert "missing reason" in await talk.say(f"kick {room} {user.user_id}")
        assert await talk.say(f"kick {room} {user.user_id} se pasó de la raya") == (
            f"Done: kick {user.user_id}.")
        assert await membership(bridge, room, user.user_id) == "leave"
        entry = await last_audit(bridge)
        assert (entry.actor, entry.action, entry.reason) == (
            bridge.admin.user_id, "room.kick", "se pasó de la raya")

        members = await talk.say(f"members {room}")
        assert f"{bridge.admin.user_id}" in members and "admin" in members

        answer = await talk.say(f"link {room} uses=2 hours=48")
        assert "2 use(s)" in answer and f"{bridge.running.url}/invite/" in answer

        big = await create_room(bridge, "Pleno")
        await _crowd(bridge, big, bridge.running.config.rooms.confirm_above)
        newcomer = await new_user(bridge, "pleno")
        answer = await talk.say(f"invite {big} {newcomer.user_id}")
        assert f"Room 'Pleno' has {bridge.running.config.rooms.confirm_above + 2} members" in (
            answer) and "`confirm`" in answer
        assert await membership(bridge, big, newcomer.user_id) is None
        assert await talk.say("confirm") == f"Invited {newcomer.user_id}."
        assert await membership(bridge, big, newcomer.user_id) == "invite"
        assert "Nothing is waiting" in await talk.say("confirm")

        assert (await talk.say("audit 3")).startswith("Audit chain intact.")
    finally:
        await talk.staff.close()


async def test_non_admin_commands_are_refused(bridge: BridgeHarness) -> None:
    room = await create_room(bridge, "Intocable")
    user = await joined(bridge, room)
    talk = await dm_with_bot(bridge, bridge.desk.localpart, bridge.desk.password)
    try:
        answer = await talk.say(f"kick {room} {user.user_id} porque sí")
        assert "Only the bridge's admins" in answer
        assert await membership(bridge, room, user.user_id) == "join"
        entry = await last_audit(bridge)
        assert (entry.actor, entry.action, entry.result) == (
            bridge.desk.user_id, "command.kick", "denied")
        # Answered again, but not recorded again within the hour (no audit flooding).
        assert "Only the bridge's admins" in await talk.say("help")
        assert (await last_audit(bridge)).id == entry.id
    finally:
        await talk.staff.close()


async def test_management_room_moderation_commands(bridge: BridgeHarness) -> None:
    talk = await dm_with_bot(bridge, bridge.admin.localpart, bridge.admin.password)
    try:
        room = await create_room(bridge, "Plaza", join_rule="knock")
        user = await joined(bridge, room)
        status, sent = await send_text(bridge, user, room, "mensaje a retirar")
        assert status == 200

        assert await talk.say(f"mute {room} {user.user_id} flood") == f"Muted {user.user_id}."
        assert (await send_text(bridge, user, room, "¿hola?"))[0] == 403
        assert await talk.say(f"unmute {room} {user.user_id} basta") == (
            f"Unmuted {user.user_id}.")
        assert (await send_text(bridge, user, room, "gracias"))[0] == 200
        assert await talk.say(f"redact {room} {sent['event_id']} fuera de tema") == (
            f"Redacted {sent['event_id']}.")
        event = await bridge.running.bridge.api.request(
            "GET", f"/_matrix/client/v3/rooms/{q(room)}/event/{q(sent['event_id'])}",
            as_user=bridge.running.bridge.ghosts.bot)
        assert event["content"] == {}
        assert await talk.say(f"ban {room} {user.user_id} reincide") == (
            f"Done: ban {user.user_id}.")
        assert await membership(bridge, room, user.user_id) == "ban"
        assert "Refused" in await talk.say(f"ban {room} {bridge.running.bridge.ghosts.bot} x")

        knocker = await new_user(bridge, "llamante")
        assert (await as_user(bridge, knocker, "POST",
                              f"/_matrix/client/v3/knock/{q(room)}", {}))[0] == 200
        assert await talk.say(f"approve {room} {knocker.user_id}") == (
            f"Approved {knocker.user_id}'s knock.")
        assert await membership(bridge, room, knocker.user_id) == "invite"

        notices = await create_room(bridge, "Bandos", kind="announcement")
        answer = await talk.say(f"announce {notices} Fiestas del barrio el sábado")
        assert "Room 'Bandos' has 2 members" in answer
        assert await talk.say("cancel") == "Cancelled; nothing was done."
        await talk.say(f"announce {notices} Fiestas del barrio el sábado")
        assert await talk.say("confirmar") == f"Announcement posted in {notices}."

        answer = await talk.say(f"close {room} fin de la consulta")
        assert answer.startswith(f"Closed {room};")
        assert ("m.room.tombstone", "") in await state(bridge, room)
        assert "the room is closed" in await talk.say(f"kick {room} {knocker.user_id} x")
        done = {e.action: e.actor for e in await bridge.running.bridge.db.audit.list(limit=30)
                if e.object.startswith((room, notices))}
        for action in ("room.mute", "room.unmute", "room.redact", "room.ban",
                       "room.knock.approve", "room.announce", "room.close"):
            assert done[action] == bridge.admin.user_id, action
    finally:
        await talk.staff.close()
