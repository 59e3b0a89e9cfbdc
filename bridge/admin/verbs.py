"""Every admin verb, declared once: the registry the three admin surfaces are built from.

A `Verb` says what an admin can do and how each surface reaches it: the HTTP route of
`/admin/v1` (method, path, scope), the CLI subcommand (`civic-bridge admin WORD`), the
management-room word with its aliases, the arguments, the reason policy, the handler and
the management room's reply. `bridge.web.admin`, `bridge.admin.cli`,
`bridge.matrix.management` and `bridge.admin.commands` are driven by `VERBS`;
tests/unit/test_verbs.py walks it and fails for a verb reachable from one surface only.

Most room verbs fit one shape (a room, then a user or an event, then a reason or a
text, maybe a confirmation) and have a `run`: their parsing, call and answer are
generic on every surface, so adding such a verb is one declaration here. The others
(`run=None`: audit, citizens, notices, dead letters, reports...) declare their route,
scope, words and arguments here and keep their own parsing and rendering next to their
surface, keyed by the verb's name.

No I/O library is imported here (the management-room parser is core, see
tests/unit/test_core_imports.py); the services a handler calls are typed only.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from bridge.texts.management import default as mgmt_text

if TYPE_CHECKING:
    from bridge.admin.moderation import Moderation
    from bridge.admin.service import AdminService

Reason = Literal["required", "optional", "none"]
_PLACEHOLDER = re.compile(r"\{(\w+)(?::[^}]*)?\}")


@dataclass(frozen=True)
class Arg:
    """A positional argument: a `{key}` in the HTTP path or a key of the JSON body, a
    CLI positional named `cli`, a management-room token checked against `pattern` (None:
    a whole number) and shown as `usage` in the help."""

    key: str
    cli: str
    usage: str
    what: str
    pattern: re.Pattern[str] | None


ROOM = Arg("room_id", "room", "ROOM", "a room ID like !abc:server", re.compile(r"^![^\s/?#]+$"))
USER = Arg("user_id", "user", "USER", "a user ID like @name:server",
           re.compile(r"^@[^:\s]+:[A-Za-z0-9.\-]+(:\d+)?$"))
EVENT = Arg("event_id", "event", "EVENT", "an event ID like $abc", re.compile(r"^\$[^\s/?#]+$"))
NUMBER = Arg("report_id", "id", "N", "report number", None)
# A WhatsApp citizen, never by number: their portal ghost or their subscription code.
CITIZEN = Arg("citizen", "citizen", "CITIZEN",
              "a citizen's portal ghost (@…) or subscription code (XXXX-XXXX…)",
              re.compile(r"^(@[^:\s]+:[A-Za-z0-9.\-]+(:\d+)?|[A-Za-z0-9]{4}(-[A-Za-z0-9]{4})+)$"))


ID_KEYS = ("room_id", "user_id", "event_id")


@dataclass(frozen=True)
class Call:
    """One verb's arguments, however they arrived (HTTP body, CLI, management room).

    Arguments of a kind other than the three IDs (an `Arg` declared for a new verb) are
    carried in `extra`, by key; `arg(key)` reads either.
    """

    room_id: str = ""
    user_id: str = ""
    event_id: str = ""
    text: str = ""  # an announcement's body
    reason: str | None = None
    confirm: bool = False
    extra: tuple[tuple[str, str], ...] = ()

    def arg(self, key: str) -> str:
        if key in ID_KEYS:
            value: str = getattr(self, key)
            return value
        return dict(self.extra).get(key, "")


def call_of(values: Mapping[str, str], text: str = "", reason: str | None = None,
            confirm: bool = False) -> Call:
    """A call from its arguments by key (`room_id`, `user_id`, `event_id`, others)."""
    return Call(room_id=values.get("room_id", ""), user_id=values.get("user_id", ""),
                event_id=values.get("event_id", ""), text=text, reason=reason,
                confirm=confirm,
                extra=tuple((k, v) for k, v in values.items() if k not in ID_KEYS))


class Services(Protocol):
    """What a verb's handler may call (the Bridge, or the management room's parts)."""

    @property
    def admin(self) -> AdminService: ...

    @property
    def moderation(self) -> Moderation: ...


@dataclass(frozen=True)
class VerbServices:
    """The services a management room hands to the handlers."""

    admin: AdminService
    moderation: Moderation


# actor (for the audit), the call -> the HTTP answer's JSON
Run = Callable[[Services, str, Call], Awaitable[Any]]
# the call and the handler's result -> the management room's answer
Reply = Callable[[Call, Any], str]


@dataclass(frozen=True)
class Verb:
    """One admin verb and the surfaces it is reachable from.

    `http`: (method, path) under the `scope`, or None. `cli`: the `civic-bridge admin`
    subcommand, or None (several verbs may share one, e.g. `reports list|act`).
    `summary`: its management-room help line (empty: not a management-room command),
    reached by `name` and `aliases`. `reason`: whether a reason is required, optional or
    not taken; `text`: the rest of the command is a text (an announcement), not a reason.
    `run` and `reply`: the handler and the management room's answer, for verbs whose
    surfaces are generic (`status`: the HTTP answer's); None where a surface is written
    by hand.
    """

    name: str
    scope: str | None
    http: tuple[str, str] | None = None
    cli: str | None = None
    cli_help: str = ""
    summary: str = ""
    aliases: tuple[str, ...] = ()
    args: tuple[Arg, ...] = ()
    reason: Reason = "none"
    text: bool = False
    confirm: bool = False
    run: Run | None = None
    reply: Reply | None = None
    status: int = 200
    usage_line: str = ""

    @property
    def in_room(self) -> bool:
        """A management-room command."""
        return bool(self.summary)

    @property
    def usage(self) -> str:
        """How the management-room help writes it."""
        if self.usage_line:
            return self.usage_line
        words = [self.name, *(a.usage for a in self.args)]
        if self.text:
            words.append("TEXT")
        words += {"required": ["REASON"], "optional": ["[REASON]"], "none": []}[self.reason]
        return " ".join(words)

    @property
    def rest(self) -> str:
        """What the management room takes after the arguments: required, optional, text
        or nothing."""
        if self.text:
            return "text"
        return "" if self.reason == "none" else self.reason

    def path_for(self, **values: str) -> str:
        """The HTTP path with its `{key}`s (and `{key:regex}`s) filled, values already
        quoted."""
        assert self.http is not None
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.http[1])

    def in_path(self, arg: Arg) -> bool:
        return self.http is not None and "{" + arg.key + "}" in self.http[1]


def said(template: str) -> Reply:
    """A reply from a template over the call (`{room}`, `{user}`, `{event}`, other
    arguments by key) and the handler's JSON answer (its keys)."""
    def reply(call: Call, result: Any) -> str:
        fields = {**dict(call.extra), **(result if isinstance(result, dict) else {})}
        return template.format(room=call.room_id, user=call.user_id, event=call.event_id,
                               **fields)
    return reply


# --- handlers ---------------------------------------------------------------------------


async def _rooms(s: Services, actor: str, c: Call) -> Any:
    return [asdict(r) for r in await s.admin.list_rooms()]


def _rooms_reply(c: Call, rooms: list[dict[str, Any]]) -> str:
    lines = [mgmt_text.ROOM_ITEM.format(name=r["name"], kind=r["kind"], room_id=r["room_id"])
             for r in rooms]
    return "\n".join([mgmt_text.ROOMS, *lines]) if lines else mgmt_text.NO_ROOMS


async def _members(s: Services, actor: str, c: Call) -> Any:
    return await s.admin.members(c.room_id)


def _members_reply(c: Call, members: list[dict[str, Any]]) -> str:
    return "\n".join([mgmt_text.MEMBERS.format(room=c.room_id)] + [
        mgmt_text.MEMBER_ITEM.format(name=m["display_name"] or mgmt_text.NO_NAME,
                                     role=m["role"], kind=m["kind"],
                                     membership=m["membership"], user_id=m["user_id"])
        for m in members])


async def _invite(s: Services, actor: str, c: Call) -> Any:
    await s.admin.invite(actor, c.room_id, c.user_id, c.reason, c.confirm)
    return {}


def _membership(action: str) -> Run:
    async def run(s: Services, actor: str, c: Call) -> Any:
        await s.moderation.membership(actor, action, c.room_id, c.user_id, c.reason)
        return {}
    return run


async def _mute(s: Services, actor: str, c: Call) -> Any:
    await s.moderation.mute(actor, c.room_id, c.user_id, c.reason)
    return {}


async def _unmute(s: Services, actor: str, c: Call) -> Any:
    await s.moderation.unmute(actor, c.room_id, c.user_id, c.reason)
    return {}


async def _redact(s: Services, actor: str, c: Call) -> Any:
    return {"event_id": await s.moderation.redact(actor, c.room_id, c.event_id, c.reason)}


def _knock(approve: bool) -> Run:
    async def run(s: Services, actor: str, c: Call) -> Any:
        await s.moderation.knock(actor, c.room_id, c.user_id, approve, c.reason)
        return {}
    return run


async def _close(s: Services, actor: str, c: Call) -> Any:
    return {"removed": await s.moderation.close(actor, c.room_id, c.reason)}


async def _announce(s: Services, actor: str, c: Call) -> Any:
    return {"event_id": await s.moderation.announce(actor, c.room_id, c.text, c.confirm)}


# --- the registry -------------------------------------------------------------------------

_V1 = "/admin/v1"
_ROOM = _V1 + "/rooms/{room_id}"


def _member_verb(name: str, cli_help: str, summary: str, run: Run, reply: str) -> Verb:
    return Verb(name, "moderation", ("POST", f"{_ROOM}/{name}"), name, cli_help, summary,
                args=(ROOM, USER), reason="required", run=run, reply=said(reply))


# In the management room's help order; the CLI lists its own bespoke commands first. The
# reason policy of a hand-written verb is what its surfaces check (HTTP, as the API
# answers; the CLI may ask for more, e.g. `citizen erase --reason` is required there).
VERBS: tuple[Verb, ...] = (
    Verb("help", None, summary="this list", aliases=("ayuda",)),
    Verb("rooms", "rooms", ("GET", _V1 + "/rooms"), "rooms",
         summary="the agency rooms with their IDs", aliases=("salas",), run=_rooms,
         reply=_rooms_reply),
    Verb("rooms.create", "rooms", ("POST", _V1 + "/rooms"), "rooms"),
    Verb("members", "rooms", ("GET", _ROOM + "/members"), "members", "pseudonyms and roles",
         "pseudonyms and roles in a room", ("miembros",), (ROOM,), run=_members,
         reply=_members_reply),
    Verb("invite", "invites", ("POST", _ROOM + "/invite"), "invite", "invite a staff member",
         "invite a staff member", args=(ROOM, USER), reason="optional", confirm=True,
         run=_invite, reply=said(mgmt_text.INVITED)),
    Verb("link", "invites", ("POST", _ROOM + "/invite-links"), "link",
         "an invite link for citizens", "an invite link for citizens (default: 1 use)",
         ("enlace",), (ROOM,), confirm=True,
         usage_line="link ROOM [uses=N] [hours=N]"),
    _member_verb("kick", "kick a user", "remove someone from a room", _membership("kick"),
                 mgmt_text.KICKED),
    _member_verb("ban", "ban a user", "remove someone and keep them out", _membership("ban"),
                 mgmt_text.BANNED),
    _member_verb("unban", "unban a user", "lift a ban", _membership("unban"),
                 mgmt_text.UNBANNED),
    _member_verb("mute", "mute a user", "stop someone from posting", _mute, mgmt_text.MUTED),
    _member_verb("unmute", "unmute a user", "let them post again", _unmute,
                 mgmt_text.UNMUTED),
    Verb("redact", "moderation", ("POST", _ROOM + "/redact"), "redact", "remove a message",
         "remove a message", args=(ROOM, EVENT), reason="required", run=_redact,
         reply=said(mgmt_text.REDACTED)),
    Verb("approve", "moderation", ("POST", _ROOM + "/knocks/approve"), "approve",
         "let a knocking user in", "let a knocking user in", args=(ROOM, USER),
         reason="optional", run=_knock(True), reply=said(mgmt_text.KNOCK_APPROVED),
         usage_line="approve ROOM USER"),
    Verb("deny", "moderation", ("POST", _ROOM + "/knocks/deny"), "deny",
         "turn a knocking user away", "turn a knocking user away", args=(ROOM, USER),
         reason="required", run=_knock(False), reply=said(mgmt_text.KNOCK_DENIED)),
    Verb("close", "moderation", ("POST", _ROOM + "/close"), "close",
         "remove everyone and tombstone the room", "remove everyone and end the room for good",
         args=(ROOM,), reason="required", run=_close,
         reply=said(mgmt_text.CLOSED)),
    Verb("announce", "moderation", ("POST", _ROOM + "/announce"), "announce",
         "post in an announcement room", "post in an announcement room", args=(ROOM,),
         text=True, confirm=True, run=_announce, reply=said(mgmt_text.ANNOUNCED)),
    Verb("audit", "audit.read", ("GET", _V1 + "/audit"), "audit",
         summary="check the audit chain and show the last N entries", usage_line="audit [N]"),
    Verb("audit.verify", "audit.read", ("GET", _V1 + "/audit/verify"), "audit"),
    Verb("reports", "moderation", ("GET", _V1 + "/reports"), "reports",
         summary="the open reports and flags", aliases=("denuncias",)),
    Verb("report", "moderation", ("POST", _V1 + "/reports/{report_id}/{action}"), "reports",
         summary="act on report N (denuncia N borrar|silenciar|expulsar|vetar|descartar)",
         aliases=("denuncia",), args=(NUMBER,), reason="optional",
         usage_line="report N redact|mute|kick|ban|dismiss [REASON]"),
    Verb("confirm", None, summary="go ahead with the action waiting for confirmation",
         aliases=("confirmar",)),
    Verb("cancel", None, summary="drop the action waiting for confirmation",
         aliases=("cancelar",)),
    Verb("keys", "rooms", ("GET", _V1 + "/keys"), "keys"),
    Verb("template", "rooms", ("POST", _V1 + "/portals/{room_id}/templates"), "template"),
    Verb("citizen.export", "citizens.export", ("GET", _V1 + "/citizens/{user_id}/export"),
         "citizen", reason="required"),
    Verb("citizen.export-by-phone", "citizens.export", ("POST", _V1 + "/citizens/export"),
         "citizen", reason="required"),
    Verb("citizen.erase", "citizens.erase", ("DELETE", _V1 + "/citizens/{user_id}"),
         "citizen", reason="optional"),
    Verb("citizen.erase-by-phone", "citizens.erase", ("POST", _V1 + "/citizens/erase"),
         "citizen", reason="required"),
    Verb("lookup", "citizens.export", ("POST", _V1 + "/citizens/lookup"), "lookup",
         reason="required"),
    Verb("reveal", "reidentify", ("POST", _V1 + "/citizens/{user_id}/reveal"), "reveal",
         reason="required"),
    Verb("notice.send", "notices", ("POST", _V1 + "/notices"), "notice"),
    Verb("notice.withdraw", "notices", ("POST", _V1 + "/notices/withdrawals"), "notice"),
    Verb("notice.list", "notices", ("GET", _V1 + "/notices"), "notice"),
    Verb("dead-letters", "moderation", ("GET", _V1 + "/dead-letters"), "dead-letters"),
    # Rooms over WhatsApp (bridge.web.rooms_wa): handlers written by hand.
    Verb("whatsapp-members.add", "invites", ("POST", _ROOM + "/whatsapp-members"),
         "whatsapp-invite", "invite a WhatsApp citizen into an agency room",
         "invite a WhatsApp citizen into a room (they accept on WhatsApp)",
         ("whatsapp", "invitar-whatsapp"), (ROOM, CITIZEN), confirm=True),
    Verb("whatsapp-members", "rooms", ("GET", _ROOM + "/whatsapp-members")),
    Verb("whatsapp-settings", "rooms", ("POST", _ROOM + "/whatsapp-settings")),
    Verb("dead-letters.settle", "moderation",
         ("POST", _V1 + "/dead-letters/{id}/{action:retry|discard}"), "dead-letters",
         reason="required"),
)
BY_NAME: dict[str, Verb] = {v.name: v for v in VERBS}
# management-room word or alias -> verb
WORDS: dict[str, Verb] = {w: v for v in VERBS if v.in_room for w in (v.name, *v.aliases)}
