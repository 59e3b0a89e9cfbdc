"""Pure decisions for WhatsApp room members: no I/O, no ORM, no aiohttp, no nio.

Where a citizen's WhatsApp message goes (`route`), how a room message is labelled for
them (`prefix`, `sender_label`), whether a room may have WhatsApp members at all
(`allowed`), what a closed 24 h window means (`digest_due`, `backlog_plan`) and the
keywords they may write (`keyword`).

The routing rule, as the invitation explains it, deterministic:
1. a swipe-reply to a message of a room goes to that room (and makes it the choice);
2. else, with one conversation (a room, or the private one with staff), it goes there;
3. else it goes to the conversation chosen last (by a reply or from the list);
4. else the citizen is asked with a list, and the message waits for the answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, Literal

from bridge.text import fold
from bridge.texts.whatsapp import default as wa_text

WINDOW: Final = timedelta(hours=24)
SHORT_NAME_MAX: Final = 24  # a list row's title

# The invitation (wa_text.ROOM_INVITATION) is the consent text: its version and language
# are copied into the consent record with its sha256. Bump the version when it changes.
INVITATION_VERSION: Final = "rooms-1"
INVITATION_LANGUAGE: Final = wa_text.__name__.rpartition(".")[2]
# Ids of the buttons and list rows a member answers with (never shown to them).
ACCEPT_BUTTON: Final = "wr-acc:"  # + membership id + ":" + the text's sha256 (16 hex)
DECLINE_BUTTON: Final = "wr-dec:"  # + membership id + ":" + the text's sha256 (16 hex)
PICK_ROW: Final = "wr-pick:"  # + membership id, or PORTAL_CHOICE
PORTAL_CHOICE: Final = "portal"
Keyword = Literal["leave", "switch"]


@dataclass(frozen=True, slots=True)
class Conversation:
    """Somewhere a citizen's message may go: a room membership (`key` its id as text)
    or their private conversation with staff (`key` == "portal")."""

    key: str
    chosen_at: datetime | None


@dataclass(frozen=True, slots=True)
class Post:
    """Post in conversation `key`; `choose`: remember it as the citizen's choice."""

    key: str
    choose: bool = False


@dataclass(frozen=True, slots=True)
class Ask:
    """Several conversations and no choice: send the list; the message waits."""

    keys: tuple[str, ...]


Route = Post | Ask | None  # None: not a room member; the ordinary flow applies


def route(conversations: Sequence[Conversation], quoted: str | None) -> Route:
    """Where a message goes (module docstring); `quoted` is the key of the conversation
    of the message it swipe-replies to, if known."""
    keys = [c.key for c in conversations]
    if not any(k != "portal" for k in keys):
        return None
    if quoted is not None and quoted in keys:
        return Post(quoted, choose=True)
    if len(conversations) == 1:
        return Post(keys[0])
    chosen = [c for c in conversations if c.chosen_at is not None]
    if chosen:
        return Post(max(chosen, key=lambda c: (c.chosen_at, c.key)).key)
    return Ask(tuple(keys))


def keyword(text: str | None) -> Keyword | None:
    said = fold(text or "").strip(" .!¡¿?")
    if said in (fold(w) for w in wa_text.ROOM_LEAVE_WORDS):
        return "leave"
    if said in (fold(w) for w in wa_text.ROOM_SWITCH_WORDS):
        return "switch"
    return None


def short_name(room_name: str) -> str:
    name = " ".join(room_name.split())
    return name if len(name) <= SHORT_NAME_MAX else name[:SHORT_NAME_MAX - 1] + "…"


def sender_label(display_name: str | None, is_staff: bool, staff_label: str) -> str:
    """How a room member is named on WhatsApp: their display name in the room (never
    their Matrix ID: a missing name becomes ROOM_NAMELESS_MEMBER), staff with the label."""
    name = " ".join((display_name or "").split()) or wa_text.ROOM_NAMELESS_MEMBER
    if name.startswith("@"):  # clients fall back to the user ID; it is not shown
        name = wa_text.ROOM_NAMELESS_MEMBER
    return staff_label.replace("{name}", name) if is_staff else name


def prefix(label: str, room_name: str, several_rooms: bool) -> str:
    """The line start of a relayed room message: who wrote it, and in which room when
    the citizen is in more than one."""
    where = f"[{short_name(room_name)}] " if several_rooms else ""
    return f"{where}*{label}*: "


def room_prefix(room_name: str, several_rooms: bool) -> str:
    return f"[{short_name(room_name)}] " if several_rooms else ""


def allowed(kind: str, switch: bool | None, default: bool) -> bool:
    """Whether a room may have WhatsApp members: its switch if set; else the default,
    except `team` rooms (never by default) and rooms that are no agency rooms."""
    if kind not in ("citizen", "announcement", "team"):
        return False
    if switch is not None:
        return switch
    return default and kind != "team"


def window_open(last_inbound_at: datetime | None, now: datetime) -> bool:
    return last_inbound_at is not None and now - last_inbound_at <= WINDOW


def closure_mark(last_inbound_at: datetime | None) -> str:
    """Names one closed window: the time of the message that opened it."""
    return last_inbound_at.isoformat() if last_inbound_at else "never"


def digest_due(sent_for: str | None, last_inbound_at: datetime | None) -> bool:
    """At most one digest template per closed window."""
    return sent_for != closure_mark(last_inbound_at)


def backlog_plan(count: int, backlog_max: int) -> tuple[int, int]:
    """(how many of the oldest to leave out, how many to deliver)."""
    skipped = max(0, count - backlog_max)
    return skipped, count - skipped


def may_post(kind: str, power: int, events_default: int) -> Literal["ok", "muted",
                                                                     "announcement"]:
    """Whether a WhatsApp member's message is posted in the room."""
    if power < 0 or (power < events_default and kind != "announcement"):
        return "muted"
    if power < events_default:
        return "announcement"
    return "ok"
