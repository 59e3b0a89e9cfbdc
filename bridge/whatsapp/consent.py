"""The consent state machine for WhatsApp mirroring (sans-I/O).

States: unknown → prompted → granted → withdrawn, and refused. Only `granted` citizens
are mirrored. `decide` takes the current state and what the citizen just sent, and
returns the new state plus the actions to perform; `bridge.whatsapp.inbound` carries
them out. No network, no database: every branch is unit-tested.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from bridge.config import ConsentConfig
from bridge.model import ConsentState
from bridge.text import fold
from bridge.types import WamidHash
from bridge.whatsapp.webhook_parse import InboundMessage

OPT_IN_BUTTON = "civic-bridge.opt-in"
OPT_OUT_BUTTON = "civic-bridge.opt-out"

Intent = Literal["opt_in", "opt_out", "message"]


class Action(Enum):
    SEND_NOTICE = "send_notice"  # privacy notice with reply buttons
    HOLD = "hold"  # keep this message (encrypted) until opt-in or hold_hours
    MIRROR = "mirror"  # relay this message into the portal
    OPEN_PORTAL = "open_portal"  # ghost + portal, invite staff, relay held messages
    CONFIRM_OPT_IN = "confirm_opt_in"
    CONFIRM_OPT_OUT = "confirm_opt_out"
    CLOSE_PORTAL = "close_portal"  # cancel sends, ghost leaves, staff notified
    DROP_HELD = "drop_held"  # delete held messages


@dataclass(frozen=True)
class Decision:
    state: ConsentState
    actions: tuple[Action, ...]


def intent_of(message: InboundMessage, cfg: ConsentConfig) -> Intent:
    """Opt-in/out by reply button or keyword (case- and accent-insensitive)."""
    if message.kind == "button":
        if message.button_id == OPT_IN_BUTTON:
            return "opt_in"
        if message.button_id == OPT_OUT_BUTTON:
            return "opt_out"
    if message.kind in ("text", "button"):
        said = fold(message.text or message.button_title or "").strip(" .!¡¿?")
        if said in {fold(w) for w in cfg.opt_out_words}:
            return "opt_out"
        if said in {fold(w) for w in cfg.opt_in_words}:
            return "opt_in"
    return "message"


def decide(state: ConsentState, intent: Intent) -> Decision:
    """What to do with one inbound message, given the citizen's consent state."""
    if intent == "opt_out":
        if state == "granted":
            return Decision("withdrawn", (Action.CLOSE_PORTAL, Action.CONFIRM_OPT_OUT))
        # Saying no before (or again after) saying yes: confirm, keep nothing. Closing
        # again is a no-op normally, and finishes an opt-out a crash interrupted.
        keep: ConsentState = state if state in ("withdrawn", "refused") else "refused"
        return Decision(keep, (Action.CLOSE_PORTAL, Action.DROP_HELD, Action.CONFIRM_OPT_OUT))
    if state == "granted":
        # Opt-in words while granted are ordinary words ("sí") in the conversation.
        return Decision("granted", (Action.MIRROR,))
    if intent == "opt_in" and state == "prompted":
        return Decision("granted", (Action.OPEN_PORTAL, Action.CONFIRM_OPT_IN))
    if state == "prompted":
        return Decision("prompted", (Action.HOLD,))
    # unknown, refused, withdrawn: (re)ask. A bare "ACEPTO" before the notice was shown
    # is not informed consent, and is not content worth holding either.
    hold = () if intent == "opt_in" else (Action.HOLD,)
    return Decision("prompted", (Action.SEND_NOTICE, *hold))


def notice_text(cfg: ConsentConfig) -> str:
    return cfg.notice_text.replace("{agency}", cfg.agency_name)


def notice_hash(cfg: ConsentConfig) -> str:
    """Evidence of exactly which text the citizen saw."""
    return hashlib.sha256(notice_text(cfg).encode()).hexdigest()


EVIDENCE_PREFIX = "wamid-hmac:"


def message_evidence(wamid_hash: WamidHash) -> str:
    """A consent record's evidence when the citizen's own message is the evidence: the
    keyed hash of its wamid, never the wamid (it embeds the number). Whoever holds the
    message (WhatsApp, the citizen's phone) and the index key can show it matches."""
    return EVIDENCE_PREFIX + wamid_hash
