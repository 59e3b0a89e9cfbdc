"""The policy's rules as pure functions: who is a citizen, what a name may contain.

Nothing here imports Synapse, so the rules are tested without a homeserver and the
module's glue (`module.py`) stays a thin adapter around them.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["citizen", "ghost", "bridge", "staff"]
Action = Literal["create_room", "invite", "join", "room_directory", "display_name",
                 "avatar"]
ACTIONS: tuple[Action, ...] = ("create_room", "invite", "join", "room_directory",
                               "display_name", "avatar")

# Words a citizen may not put in a display name: they would pass for staff or the
# agency. Compared after folding (case, accents, punctuation), as whole words.
DEFAULT_RESERVED_WORDS: tuple[str, ...] = (
    "admin", "administrador", "administradora", "administracion", "moderador",
    "moderadora", "moderator", "staff", "personal", "soporte", "support", "oficial",
    "official", "funcionario", "funcionaria", "ayuntamiento", "bot", "sistema", "system",
)

# Written-out addresses ("juan arroba correo punto es") count as e-mail addresses.
_CONTACT_WORDS = ("arroba",)
_EMAIL = re.compile(r"[^\s@]+@[^\s@]+\.[^\s@]+")
_MIN_PHONE_DIGITS = 7  # shorter runs are house numbers, years, codes

# Refusal texts, Spanish first (the agency's language), then English, in one string:
# Matrix errors carry one `error` text and clients show it as is.
TEXTS: Mapping[str, str] = {
    "create_room": "Las cuentas de participante no pueden crear salas ni chats directos. / "
                   "Participant accounts cannot create rooms or direct chats.",
    "invite": "Las cuentas de participante no pueden invitar a nadie; pídalo al personal "
              "de la sala. / Participant accounts cannot invite anyone; ask the room's staff.",
    "join": "Solo puede entrar en las salas a las que le han invitado. / "
            "You can only join rooms you were invited to.",
    "room_directory": "Las cuentas de participante no pueden crear alias ni publicar salas. / "
                      "Participant accounts cannot create room aliases or publish rooms.",
    "display_name.contact": "El nombre visible no puede contener un número de teléfono, "
                            "una dirección de correo ni «@». / A display name cannot contain "
                            "a phone number, an e-mail address or '@'.",
    "display_name.reserved": "El nombre visible no puede contener «{word}»: está reservado al "
                             "personal. / A display name cannot contain '{word}': it is "
                             "reserved for staff.",
}


@dataclass(frozen=True)
class Refusal:
    """What to answer: always M_FORBIDDEN, with `error` in Spanish and English."""

    action: Action
    error: str

    def fields(self) -> dict[str, str]:
        """Extra fields of the Matrix error; `error` replaces Synapse's generic text."""
        return {"error": self.error, "org.civic_bridge.policy": self.action}


def refusal(action: Action, detail: str = "", word: str = "") -> Refusal:
    key = f"{action}.{detail}" if detail else action
    return Refusal(action, TEXTS[key].format(word=word))


def fold(text: str) -> str:
    """Lower case, no accents, no invisible characters, words separated by one space."""
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text))
    kept = "".join(ch for ch in text
                   if unicodedata.category(ch) not in ("Mn", "Cf", "Cc")).casefold()
    return " ".join(re.sub(r"[^\w]+", " ", kept).replace("_", " ").split())


def name_problem(name: str, reserved: tuple[str, ...]) -> tuple[str, str] | None:
    """Why `name` may not be a citizen's display name: ("contact"|"reserved", word), or None.

    Deliberately strict, as names are short: any '@' or e-mail-like text, seven or
    more digits anywhere (in any script, separated or not), or a reserved word.
    """
    normal = unicodedata.normalize("NFKC", name)
    if "@" in normal or _EMAIL.search(normal):
        return ("contact", "")
    if sum(ch.isdigit() for ch in normal) >= _MIN_PHONE_DIGITS:
        return ("contact", "")
    words = f" {fold(name)} "
    if any(f" {w} " in words for w in _CONTACT_WORDS):
        return ("contact", "")
    for phrase in reserved:
        if phrase and f" {phrase} " in words:
            return ("reserved", phrase)
    return None


def display_name_refusal(name: object, reserved: tuple[str, ...]) -> Refusal | None:
    if not isinstance(name, str) or not name:
        return None
    problem = name_problem(name, reserved)
    if problem is None:
        return None
    return refusal("display_name", problem[0], problem[1])


@dataclass(frozen=True)
class Policy:
    """The module's parsed config: how to tell citizens, ghosts, the bridge and staff apart.

    Citizens are local users whose localpart starts with a citizen prefix (the bridge's
    `invites.localpart_prefix`); ghosts, with a ghost prefix (`appservice.ghost_prefix`);
    the bridge, the local users in `bridge_localparts` (the appservice's sender and bot).
    Everyone else (staff, admins, remote users) is "staff" and is never restricted.
    `server_name` "" means "Synapse's own" (the module fills it in).
    """

    server_name: str
    citizen_prefixes: tuple[str, ...]
    ghost_prefixes: tuple[str, ...] = ()
    bridge_localparts: frozenset[str] = frozenset()
    reserved_words: tuple[str, ...] = tuple(fold(w) for w in DEFAULT_RESERVED_WORDS)
    allow_citizen_avatars: bool = False

    def kind(self, user_id: str) -> Kind:
        localpart, sep, server = user_id.removeprefix("@").partition(":")
        if not sep or server != self.server_name:
            return "staff"
        if localpart in self.bridge_localparts:
            return "bridge"
        if localpart.startswith(self.citizen_prefixes):
            return "citizen"
        if self.ghost_prefixes and localpart.startswith(self.ghost_prefixes):
            return "ghost"
        return "staff"

    def restricted(self, user_id: str) -> bool:
        """Whether `user_id`'s own actions are limited. Ghosts are not: only the bridge
        can act as them (its namespace is exclusive), and it invites and joins them."""
        return self.kind(user_id) == "citizen"

    def pseudonymous(self, user_id: str) -> bool:
        """Citizens and ghosts: hidden from directory search outside shared rooms."""
        return self.kind(user_id) in ("citizen", "ghost")

    # --- decisions: None means allowed ----------------------------------------------

    def may_create_room(self, user_id: str) -> Refusal | None:
        return refusal("create_room") if self.restricted(user_id) else None

    def may_invite(self, inviter: str) -> Refusal | None:
        return refusal("invite") if self.restricted(inviter) else None

    def may_join(self, user_id: str, is_invited: bool) -> Refusal | None:
        return refusal("join") if self.restricted(user_id) and not is_invited else None

    def may_use_room_directory(self, user_id: str) -> Refusal | None:
        return refusal("room_directory") if self.restricted(user_id) else None

    def may_set_profile(self, user_id: str, display_name: object) -> Refusal | None:
        """The display name a citizen wants (in a member event or their profile)."""
        if not self.restricted(user_id):
            return None
        return display_name_refusal(display_name, self.reserved_words)

    def strips_avatar(self, user_id: str, avatar_url: object) -> bool:
        """Whether an avatar must be left out of this user's member events: an image
        can show anything (a phone number, a staff member's face) and cannot be read."""
        return bool(avatar_url) and self.restricted(user_id) and not self.allow_citizen_avatars

    def may_see_in_directory(self, searcher: str, found: str, share_room: bool) -> bool:
        """Directory search: a citizen or ghost only shows up for (and a citizen only
        finds) people they share a joined room with."""
        if share_room or searcher == found:
            return True
        return not (self.pseudonymous(found) or self.restricted(searcher))


def _strings(raw: Mapping[str, Any], key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
    value = raw.get(key, list(default))
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{key}: must be a list of non-empty strings")
    return tuple(value)


def parse_policy(raw: Mapping[str, Any]) -> Policy:
    """Build a Policy from the module's `config:` block; ValueError names the bad key."""
    if not isinstance(raw, Mapping):
        raise ValueError("config: must be a mapping")
    known = {"server_name", "citizen_prefixes", "ghost_prefixes", "bridge_localparts",
             "reserved_words", "extra_reserved_words", "allow_citizen_avatars"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    server_name = raw.get("server_name", "")
    if not isinstance(server_name, str):
        raise ValueError("server_name: must be a string (default: Synapse's server_name)")
    citizens = _strings(raw, "citizen_prefixes")
    if not citizens:
        raise ValueError("citizen_prefixes: required, e.g. [v_] (invites.localpart_prefix)")
    ghosts = _strings(raw, "ghost_prefixes")
    overlap = [c for c in citizens for g in ghosts if c.startswith(g) or g.startswith(c)]
    if overlap:
        raise ValueError(f"citizen_prefixes: {overlap[0]!r} overlaps a ghost prefix")
    bridge = _strings(raw, "bridge_localparts")
    if any(not re.fullmatch(r"[a-z0-9._=/+-]+", u) for u in bridge):
        raise ValueError("bridge_localparts: each must be a localpart (no @ or :server)")
    reserved = _strings(raw, "reserved_words", DEFAULT_RESERVED_WORDS)
    reserved += _strings(raw, "extra_reserved_words")
    avatars = raw.get("allow_citizen_avatars", False)
    if not isinstance(avatars, bool):
        raise ValueError("allow_citizen_avatars: must be true or false")
    return Policy(server_name=server_name, citizen_prefixes=citizens, ghost_prefixes=ghosts,
                  bridge_localparts=frozenset(bridge),
                  reserved_words=tuple(dict.fromkeys(f for f in map(fold, reserved) if f)),
                  allow_citizen_avatars=avatars)
