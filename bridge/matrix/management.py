"""Management-room commands: text in, `Command` out, no I/O.

Admins (listed in `admin.users`) DM the bridge bot; every message there is one command:

    kick !room:server @user:server spamming the room

The verb may start with `!` and is case-insensitive. IDs may be pasted as matrix.to
links or wrapped in backticks or angle brackets (what clients produce when copying).
A reply's quoted fallback (`> <@alice> ...` lines) is skipped. The reason or announcement
text is the rest of the message. `bridge.admin.commands` executes what this returns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from bridge.types import EventID, RoomID, UserID

MXID = re.compile(r"^@[^:\s]+:[A-Za-z0-9.\-]+(:\d+)?$")
ROOM = re.compile(r"^![^\s/?#]+$")
EVENT = re.compile(r"^\$[^\s/?#]+$")
MATRIX_TO = "https://matrix.to/#/"
MAX_USES = 1000
MAX_HOURS = 720
MAX_LIMIT = 50
MAX_REPORT = 10**9

# verb -> (arguments, reason/text needed, usage, summary)
#   arguments: R = room, U = user, E = event, N = a report number;
#   reason: "required", "optional", "text", ""
_SPECS: dict[str, tuple[str, str, str, str]] = {
    "help": ("", "", "help", "this list"),
    "rooms": ("", "", "rooms", "the agency rooms with their IDs"),
    "members": ("R", "", "members ROOM", "pseudonyms and roles in a room"),
    "invite": ("RU", "optional", "invite ROOM USER [REASON]", "invite a staff member"),
    "link": ("R", "", "link ROOM [uses=N] [hours=N]",
             "an invite link for citizens (default: 1 use)"),
    "kick": ("RU", "required", "kick ROOM USER REASON", "remove someone from a room"),
    "ban": ("RU", "required", "ban ROOM USER REASON", "remove someone and keep them out"),
    "unban": ("RU", "required", "unban ROOM USER REASON", "lift a ban"),
    "mute": ("RU", "required", "mute ROOM USER REASON", "stop someone from posting"),
    "unmute": ("RU", "required", "unmute ROOM USER REASON", "let them post again"),
    "redact": ("RE", "required", "redact ROOM EVENT REASON", "remove a message"),
    "approve": ("RU", "optional", "approve ROOM USER", "let a knocking user in"),
    "deny": ("RU", "required", "deny ROOM USER REASON", "turn a knocking user away"),
    "close": ("R", "required", "close ROOM REASON",
              "remove everyone and end the room for good"),
    "announce": ("R", "text", "announce ROOM TEXT", "post in an announcement room"),
    "audit": ("", "", "audit [N]", "check the audit chain and show the last N entries"),
    "reports": ("", "", "reports", "the open reports and flags"),
    "report": ("N", "text", "report N redact|mute|kick|ban|dismiss [REASON]",
               "act on report N (denuncia N borrar|silenciar|expulsar|vetar|descartar)"),
    "confirm": ("", "", "confirm", "go ahead with the action waiting for confirmation"),
    "cancel": ("", "", "cancel", "drop the action waiting for confirmation"),
}
ALIASES = {"ayuda": "help", "salas": "rooms", "miembros": "members", "enlace": "link",
           "confirmar": "confirm", "cancelar": "cancel", "denuncias": "reports",
           "denuncia": "report"}


class CommandError(ValueError):
    """The text is not a valid command; the message is safe to show to the sender."""


@dataclass(frozen=True)
class Command:
    """One parsed command. `text` is the reason (or the announcement's body)."""

    name: str
    room_id: RoomID | None = None
    user_id: UserID | None = None
    event_id: EventID | None = None
    text: str | None = None
    uses: int | None = None
    hours: int | None = None
    limit: int | None = None
    confirm: bool = False
    number: int | None = None  # a report's number


def help_text() -> str:
    width = max(len(usage) for _, _, usage, _ in _SPECS.values())
    lines = ["civic-bridge commands (ROOM = !room ID, USER = @user:server, EVENT = $event ID):"]
    lines += [f"  {usage.ljust(width)}  {summary}" for _, _, usage, summary in _SPECS.values()]
    lines.append("Actions on more than rooms.confirm_above members, and every announcement, "
                 "ask for `confirm` first.")
    return "\n".join(lines)


def _strip_reply_fallback(body: str) -> str:
    if not body.startswith("> "):
        return body
    lines = body.split("\n")
    while lines and lines[0].startswith(">"):
        lines.pop(0)
    return "\n".join(lines)


def _clean_id(token: str) -> str:
    token = token.strip("`<>")
    if token.startswith(MATRIX_TO):
        token = unquote(token[len(MATRIX_TO):].split("?", 1)[0])
    return token


def _take(rest: str) -> tuple[str, str]:
    """The next whitespace-separated token and what follows it."""
    parts = rest.split(None, 1)
    if not parts:
        return "", ""
    return parts[0], parts[1] if len(parts) > 1 else ""


def _number(value: str, what: str, top: int) -> int:
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= top:
        raise CommandError(f"{what} must be a whole number from 1 to {top}")
    return int(value)


def parse(body: str) -> Command:
    """Parse one message; raises CommandError with a message for the sender."""
    text = _strip_reply_fallback(body).strip()
    verb, rest = _take(text)
    verb = verb.lstrip("!").lower()
    verb = ALIASES.get(verb, verb)
    if verb not in _SPECS:
        shown = verb[:30] or "(empty)"
        raise CommandError(f"unknown command `{shown}`; send `help` for the list")
    args, wants, usage, _ = _SPECS[verb]
    found: dict[str, str] = {}
    for kind in args:
        token, rest = _take(rest)
        if kind == "N":
            if not token:
                raise CommandError(f"missing report number; usage: {usage}")
            found[kind] = str(_number(token.lstrip("#"), "the report number", MAX_REPORT))
            continue
        value = _clean_id(token)
        pattern, what = {"R": (ROOM, "a room ID like !abc:server"),
                         "U": (MXID, "a user ID like @name:server"),
                         "E": (EVENT, "an event ID like $abc")}[kind]
        if not token:
            raise CommandError(f"missing {what}; usage: {usage}")
        if not pattern.match(value):
            raise CommandError(f"`{token[:60]}` is not {what}; usage: {usage}")
        found[kind] = value
    rest = rest.strip()
    cmd = Command(verb, room_id=RoomID(found["R"]) if "R" in found else None,
                  user_id=UserID(found["U"]) if "U" in found else None,
                  event_id=EventID(found["E"]) if "E" in found else None)
    if verb == "link":
        return _link_options(cmd, rest, usage)
    if verb == "audit":
        limit = _number(rest, "N", MAX_LIMIT) if rest else 10
        return Command(verb, limit=limit)
    if verb == "report":
        if not rest:
            raise CommandError(f"missing action; usage: {usage}")
        return Command(verb, number=int(found["N"]), text=rest.strip())
    if wants in ("required", "text") and not rest:
        raise CommandError(f"missing {'text' if wants == 'text' else 'reason'}; usage: {usage}")
    if not wants and rest:
        raise CommandError(f"unexpected `{rest[:60]}`; usage: {usage}")
    return Command(cmd.name, cmd.room_id, cmd.user_id, cmd.event_id, text=rest or None)


def _link_options(cmd: Command, rest: str, usage: str) -> Command:
    uses: int | None = None
    hours: int | None = None
    for option in rest.split():
        key, sep, value = option.partition("=")
        if sep and key.lower() in ("uses", "usos") and uses is None:
            uses = _number(value, "uses", MAX_USES)
        elif sep and key.lower() in ("hours", "horas") and hours is None:
            hours = _number(value, "hours", MAX_HOURS)
        else:
            raise CommandError(f"unexpected `{option[:60]}`; usage: {usage}")
    return Command(cmd.name, cmd.room_id, uses=uses, hours=hours)
