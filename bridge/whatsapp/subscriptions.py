"""Carries out the notices consent decisions (`bridge.whatsapp.notice_consent`).

Ordered like `bridge.whatsapp.inbound`: a withdrawal or refusal is recorded first (no
notice leaves after it), a grant last (a retry after a crash redoes the idempotent
confirmation, then records). Nothing here touches Matrix: a citizen who only wants
notices gets no ghost, no portal, and nothing of theirs is mirrored.
"""

from __future__ import annotations

import logging
import re
import secrets

from bridge.config import Config
from bridge.db import Citizen, ConsentState, Database, NoticeSubscription
from bridge.errors import Conflict
from bridge.metrics import Metrics
from bridge.privacy import CODE_ALPHABET
from bridge.texts.whatsapp import default as wa_text
from bridge.types import Pseudonym, UserID, WamidHash
from bridge.whatsapp import notice_consent
from bridge.whatsapp.consent import message_evidence
from bridge.whatsapp.notice_consent import NoticeAction, NoticesIntent
from bridge.whatsapp.outbox import Outbox, reply_key

log = logging.getLogger(__name__)

# Three groups of four consonants (~52 bits): not guessable, and easy to type into the
# sede electrónica. Longer than a pseudonym code, so the two are never confused.
CODE_GROUPS = 3
SUBSCRIPTION_CODE = re.compile(rf"[{CODE_ALPHABET}]{{4}}(-[{CODE_ALPHABET}]{{4}}){{2}}")


def new_subscription_code() -> str:
    return "-".join("".join(secrets.choice(CODE_ALPHABET) for _ in range(4))
                    for _ in range(CODE_GROUPS))


class NoticeSubscriptions:
    """Citizens' consent to notices, changed over WhatsApp (or withdrawn by erasure or
    at the service desk)."""

    def __init__(self, config: Config, db: Database, outbox: Outbox, metrics: Metrics) -> None:
        self._config = config
        self._db = db
        self._outbox = outbox
        self._metrics = metrics

    async def handle(self, citizen: Citizen, intent: NoticesIntent,
                     wamid_hash: WamidHash) -> None:
        """A notices keyword or button from the citizen (the keyed hash of its wamid)."""
        sub = await self._subscription(citizen)
        decision = notice_consent.decide(sub.state, intent)
        changed = decision.state != sub.state
        evidence = message_evidence(wamid_hash)
        if changed and decision.state != "granted":
            await self._record(citizen, decision.state, "whatsapp", evidence,
                               only_from=sub.state)
        for action in decision.actions:
            await self._perform(action, citizen, sub, wamid_hash)
        if changed and decision.state == "granted":
            await self._record(citizen, decision.state, "whatsapp", evidence,
                               only_from=sub.state)

    async def withdraw(self, citizen: Citizen, evidence: str, channel: str) -> bool:
        """Withdraw notices if granted (chat opt-out keyword, erasure); True if it was.

        Also True when this same message (`evidence`) withdrew them already: a retry after
        a crash between the withdrawal and the citizen's confirmation must still say so.
        """
        sub = await self._db.subscriptions.get(citizen.id)
        if sub is None:
            return False
        if sub.state != "granted":
            records = [r for r in await self._db.consent.for_citizen(citizen.id)
                       if r.purpose == "notices"]
            return sub.state == "withdrawn" and bool(records) and \
                records[-1].evidence == evidence
        return await self._withdraw(citizen, channel, evidence)

    async def withdraw_assisted(self, citizen: Citizen, actor: str, staff_id: UserID,
                                evidence: str) -> tuple[bool, ConsentState]:
        """Withdraw notices at the citizen's request made to `staff_id` in person;
        (withdrawn now, state now). Only a `granted` consent is withdrawn, so a repeat,
        whatever its evidence, records nothing. The citizen gets no WhatsApp message:
        staff confirm in person (a free-form text may fall outside the 24-hour window).
        """
        if await self._withdraw(citizen, "in_person", evidence, actor, staff_id):
            return True, "withdrawn"
        sub = await self._db.subscriptions.get(citizen.id)
        return False, sub.state if sub else "unknown"

    async def _subscription(self, citizen: Citizen) -> NoticeSubscription:
        for _ in range(5):  # a code collision is astronomically rare; draw again
            try:
                return await self._db.subscriptions.get_or_create(citizen.id,
                                                                  new_subscription_code())
            except Conflict:
                continue
        raise Conflict("could not allocate a subscription code")

    async def _perform(self, action: NoticeAction, citizen: Citizen, sub: NoticeSubscription,
                       wamid_hash: WamidHash) -> None:
        cfg = self._config
        if action is NoticeAction.SEND_TEXT:
            await self._outbox.system_buttons(
                citizen, reply_key("notices-text", wamid_hash), notice_consent.consent_text(cfg),
                [(notice_consent.NOTICES_IN_BUTTON, wa_text.ACCEPT_BUTTON),
                 (notice_consent.NOTICES_OUT_BUTTON, wa_text.DECLINE_BUTTON)])
        elif action is NoticeAction.CONFIRM_IN:
            await self._outbox.system_buttons(
                citizen, reply_key("notices-in", wamid_hash),
                notice_consent.confirm_in(cfg, sub.code),
                [(notice_consent.NOTICES_OUT_BUTTON, wa_text.NOTICES_OUT_BUTTON)])
        elif action is NoticeAction.CONFIRM_OUT:
            await self._outbox.system_text(citizen, reply_key("notices-out", wamid_hash),
                                           notice_consent.confirm_out(cfg))
        elif action is NoticeAction.CANCEL_PENDING:
            await self._cancel(citizen)

    async def _withdraw(self, citizen: Citizen, channel: str, evidence: str,
                        actor: str = "citizen", staff_id: UserID | None = None) -> bool:
        # Only from `granted`: admin calls are not serialised with the citizen's own
        # messages, and one withdrawal must not be recorded twice.
        if not await self._record(citizen, "withdrawn", channel, evidence, actor, staff_id,
                                  only_from="granted"):
            return False
        await self._cancel(citizen)
        return True

    async def _cancel(self, citizen: Citizen) -> None:
        await self._db.outbox.cancel_for_citizen(citizen.id, notices=True)
        await self._db.notices.fail_unsent(citizen.id, "consent withdrawn")

    async def _record(self, citizen: Citizen, state: ConsentState, channel: str,
                      evidence: str, actor: str = "citizen", staff_id: UserID | None = None,
                      only_from: ConsentState | None = None) -> bool:
        async with self._db.transaction() as tx:
            if not await tx.subscriptions.set_state(citizen.id, state, only_from):
                return False
            await tx.consent.append(
                citizen_id=citizen.id, pseudonym=Pseudonym(citizen.pseudonym_code),
                purpose="notices", state=state,
                notice_version=self._config.notices.consent_version,
                notice_hash=notice_consent.consent_hash(self._config), channel=channel,
                language=self._config.notices.template_language, evidence=evidence,
                staff_id=staff_id)
            await tx.audit.append(actor, f"consent.{state}",
                                  f"pseudonym {citizen.pseudonym_code}", "ok", "notices")
        self._metrics.consent_changes.labels("notices", state).inc()
        log.info("notices consent of %s: %s", citizen.pseudonym_code, state)
        return True
