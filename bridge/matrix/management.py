"""Management-room commands: text in, `Command` out, no I/O.

Admins (listed in `admin.users`) DM the bridge bot; every message there is one command:

    kick !room:server @user:server spamming the room

The verb may start with `!` and is case-insensitive. IDs may be pasted as matrix.to
links or wrapped in backticks or angle brackets (what clients produce when copying).
A reply's quoted fallback (`> <@alice> ...` lines) is skipped. The reason or announcement
text is the rest of the message. `bridge.admin.commands` executes what this returns.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from urllib.parse import unquote

from bridge.admin.verbs import ID_KEYS, VERBS, WORDS, Verb
from bridge.texts.management import default as mgmt_text
from bridge.types import EventID, RoomID, UserID

MATRIX_TO = "https://matrix.to/#/"
MAX_USES = 1000
MAX_HOURS = 720
MAX_LIMIT = 50
MAX_REPORT = 10**9
# The words, arguments, reason policy and help line of each command are declared with the
# verb in bridge.admin.verbs (WORDS maps every word and alias to its verb).
SPECS: tuple[Verb, ...] = tuple(v for v in VERBS if v.in_room)


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
    extra: tuple[tuple[str, str], ...] = ()  # arguments of other kinds, by key


def help_text() -> str:
    width = max(len(v.usage) for v in SPECS)
    lines = [mgmt_text.HELP_HEAD]
    lines += [f"  {v.usage.ljust(width)}  {v.summary}" for v in SPECS]
    lines.append(mgmt_text.HELP_FOOT)
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
    word, rest = _take(text)
    word = word.lstrip("!").lower()
    spec = WORDS.get(word)
    if spec is None:
        shown = word[:30] or "(empty)"
        raise CommandError(f"unknown command `{shown}`; send `help` for the list")
    verb, usage = spec.name, spec.usage
    found: dict[str, str] = {}
    for arg in spec.args:
        token, rest = _take(rest)
        if not token:
            raise CommandError(f"missing {arg.what}; usage: {usage}")
        if arg.pattern is None:  # a number
            found[arg.key] = str(_number(token.lstrip("#"), f"the {arg.what}", MAX_REPORT))
            continue
        value = _clean_id(token)
        if not arg.pattern.match(value):
            raise CommandError(f"`{token[:60]}` is not {arg.what}; usage: {usage}")
        found[arg.key] = value
    rest = rest.strip()
    cmd = Command(verb, room_id=RoomID(found["room_id"]) if "room_id" in found else None,
                  user_id=UserID(found["user_id"]) if "user_id" in found else None,
                  event_id=EventID(found["event_id"]) if "event_id" in found else None,
                  extra=tuple((k, v) for k, v in found.items() if k not in ID_KEYS))
    if verb == "link":
        return _link_options(cmd, rest, usage)
    if verb == "audit":
        limit = _number(rest, "N", MAX_LIMIT) if rest else 10
        return Command(verb, limit=limit)
    if verb == "report":
        if not rest:
            raise CommandError(f"missing action; usage: {usage}")
        return Command(verb, number=int(found["report_id"]), text=rest.strip())
    wants = spec.rest
    if wants in ("required", "text") and not rest:
        raise CommandError(f"missing {'text' if wants == 'text' else 'reason'}; usage: {usage}")
    if not wants and rest:
        raise CommandError(f"unexpected `{rest[:60]}`; usage: {usage}")
    return dataclasses.replace(cmd, text=rest or None)


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
