"""Consent to notices of availability over WhatsApp (sans-I/O).

A purpose of its own (`notices`), independent of chat mirroring: a citizen may take
notices without ever opening a chat with staff, and the other way round. States are
the mirroring ones: unknown → prompted → granted → withdrawn, and refused.

- A notices opt-in keyword (`notices.opt_in_words`, default AVISOS) shows the consent
  text with reply buttons. Tapping «Acepto», or writing the keyword again once the text
  was shown (the keyword fallback), grants; the confirmation carries the citizen's
  subscription code for the sede electrónica and an opt-out button.
- An opt-out keyword (default BAJA AVISOS) or the opt-out button withdraws notices only.
- The chat opt-out keywords (BAJA, STOP, ...) withdraw every purpose the citizen granted,
  notices included; the chat notice's «No, gracias» button refuses the chat only.

`bridge.whatsapp.subscriptions` carries the decisions out. No network, no database.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from bridge.config import Config, NoticesConfig
from bridge.model import ConsentState
from bridge.text import fold_words
from bridge.texts.whatsapp import default as wa_text
from bridge.whatsapp.webhook_parse import InboundMessage

NOTICES_IN_BUTTON = "civic-bridge.notices.opt-in"
NOTICES_OUT_BUTTON = "civic-bridge.notices.opt-out"

NoticesIntent = Literal["opt_in", "opt_out"]



class NoticeAction(Enum):
    SEND_TEXT = "send_text"  # the notices consent text with reply buttons
    CONFIRM_IN = "confirm_in"  # the subscription code, with an opt-out button
    CONFIRM_OUT = "confirm_out"
    CANCEL_PENDING = "cancel_pending"  # unsent notices are not sent


@dataclass(frozen=True)
class NoticesDecision:
    state: ConsentState
    actions: tuple[NoticeAction, ...]


def spoken(message: InboundMessage) -> str:
    """What the citizen said, folded for keyword matching (case, accents, spacing)."""
    if message.kind not in ("text", "button"):
        return ""
    return fold_words(message.text or message.button_title or "").strip(" .!¡¿?")


def intent_of(message: InboundMessage, cfg: NoticesConfig) -> NoticesIntent | None:
    """Opt-in/out of notices by reply button or keyword; None for anything else."""
    if message.kind == "button":
        if message.button_id == NOTICES_IN_BUTTON:
            return "opt_in"
        if message.button_id == NOTICES_OUT_BUTTON:
            return "opt_out"
    said = spoken(message)
    if said and said in {fold_words(w) for w in cfg.opt_out_words}:
        return "opt_out"
    if said and said in {fold_words(w) for w in cfg.opt_in_words}:
        return "opt_in"
    return None


def decide(state: ConsentState, intent: NoticesIntent) -> NoticesDecision:
    """What to do with a notices keyword or button, given the notices consent state."""
    if intent == "opt_out":
        if state == "granted":
            return NoticesDecision("withdrawn",
                                   (NoticeAction.CANCEL_PENDING, NoticeAction.CONFIRM_OUT))
        keep: ConsentState = state if state in ("withdrawn", "refused") else "refused"
        return NoticesDecision(keep, (NoticeAction.CONFIRM_OUT,))
    if state in ("prompted", "granted"):
        # Accepting after the text was shown; while granted, the code again.
        return NoticesDecision("granted", (NoticeAction.CONFIRM_IN,))
    # A bare keyword before the text was shown is a request, not informed consent.
    return NoticesDecision("prompted", (NoticeAction.SEND_TEXT,))


def consent_text(cfg: Config) -> str:
    return cfg.notices_consent_text


def consent_hash(cfg: Config) -> str:
    """Evidence of exactly which text the citizen saw."""
    return hashlib.sha256(consent_text(cfg).encode()).hexdigest()


def confirm_in(cfg: Config, code: str) -> str:
    n = cfg.notices
    return wa_text.NOTICES_CONFIRM_IN.format(issuer=n.issuer, code=code, sede=n.sede_url,
                             stop=n.opt_out_words[0])


def confirm_out(cfg: Config) -> str:
    return wa_text.NOTICES_CONFIRM_OUT.format(sede=cfg.notices.sede_url)


def also_notices(cfg: Config) -> str:
    """Appended to the chat opt-out confirmation when it withdrew notices too."""
    return wa_text.NOTICES_ALSO_WITHDRAWN.format(start=cfg.notices.opt_in_words[0])
